// Internal to the Mamba2 kernels (ops/cuda/mamba.cu, ops/cuda/ssd_scan.cu): where each token's
// sequence starts, and the F32 working copies the kernels compute on.
#pragma once
#include <cstdint>

#include "core/tensor.h"

namespace moeforge::cuda::detail {

// start[i] (device I64 [T]): the first token of the sequence token i belongs to -- its row's first
// (rows of T / batch tokens) or, with doc_ids, its document's.
Tensor segment_starts(int64_t t, int64_t batch, const Tensor* doc_ids);

// An F32 copy of a float tensor on the device (the tensor itself when it is F32 already).
Tensor f32_copy(const Tensor& t);

// `t` (F32) in `dtype` (itself when dtype is F32).
Tensor in_dtype(const Tensor& t, DType dtype);

}  // namespace moeforge::cuda::detail
