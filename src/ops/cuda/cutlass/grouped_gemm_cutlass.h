// Grouped GEMMs through CUTLASS's Hopper kernel for arrays of problems (TMA loads, WGMMA, a
// persistent scheduler that hands out the tiles of every group to the SMs as they free up), used
// by grouped_gemm.cpp for ragged experts when this build has CUTLASS (scripts/install-cutlass.sh).
// cuBLAS's grouped call, which it replaces there, ran native routing's skewed groups at 137-258
// TFLOP/s (docs/perf-notes.md).
#pragma once
#include <vector>

#include "core/dtype.h"
#include "ops/cuda/grouped_product.h"

namespace moeforge::cuda::cutlass_grouped {

// Whether run() would take these products: the build has CUTLASS, the device is sm_90, A and B
// are BF16, C is BF16 (or F32 for weight gradients), the transposes are those of the three expert
// products (forward: B transposed; input grad: none; weight grad: A transposed), and every
// pointer and row stride is 16-byte aligned (TMA's requirement). MOEFORGE_GROUPED_GEMM=cublas
// turns it off.
bool usable(const std::vector<GroupedProduct>& ps, DType ab, DType c);

// C = op(A) op(B) + beta * C for every product, in one launch on the current stream.
void run(const std::vector<GroupedProduct>& ps, DType ab, DType c, float beta);

}  // namespace moeforge::cuda::cutlass_grouped
