// Grouped GEMMs through CUTLASS's Hopper kernel for arrays of problems (TMA loads, WGMMA, a
// persistent scheduler that hands out the tiles of every group to the SMs as they free up), used
// by grouped_gemm.cpp for ragged experts when this build has CUTLASS (scripts/install-cutlass.sh).
// cuBLAS's grouped call, which it replaces there, ran native routing's skewed groups at 137-258
// TFLOP/s (docs/perf-notes.md).
#pragma once
#include <cstdint>
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

// The experts' weight gradients when their rows are consecutive ranges of two tensors:
// dW[e] = dY[offsets[e]:offsets[e+1]]^T X[offsets[e]:offsets[e+1]], written (not accumulated);
// experts without rows are left as they are (the caller zeroes them). One descriptor per operand
// for all experts (no per-expert descriptor rewrites, ragged_weight_grad_kernel.cuh).
struct RaggedWeightGradArgs {
  const void* dy;  // rows x n, row stride ld_dy
  int64_t ld_dy;
  const void* x;   // rows x k, row stride ld_x
  int64_t ld_x;
  void* dw;        // experts x n x k, contiguous
  int64_t rows, n, k;
  std::vector<int64_t> offsets;  // experts + 1, from 0 to rows
  // Optional, ragged_weight_grad_square_slots(*this) floats: partial sums of the squares of dW as
  // stored (rounded to its dtype), which add up to its sum of squares. Computed from the
  // accumulators each tile already holds, so the gradient norm need not read dW again
  // (docs/perf-notes.md, session 27). Experts without rows add nothing (their dW is zeros).
  float* squares = nullptr;
};

// Tiles of dW are 128 x 256 per expert with rows; each tile leaves one partial sum per consumer warp.
constexpr int kRaggedTileM = 128, kRaggedTileN = 256, kRaggedSquaresPerTile = 8;
int64_t ragged_weight_grad_square_slots(const RaggedWeightGradArgs& a);

// Whether ragged_weight_grad takes these: the build has CUTLASS, the device is sm_90, dY and X
// are BF16, dW BF16 or F32, every pointer and stride 16-byte aligned, 1 <= rows < 2^31, and
// MOEFORGE_RAGGED_WGRAD is not 0 (the switch measures it against the grouped path).
bool ragged_weight_grad_usable(const RaggedWeightGradArgs& a, DType ab, DType dw);
void ragged_weight_grad(const RaggedWeightGradArgs& a, DType dw);

}  // namespace moeforge::cuda::cutlass_grouped
