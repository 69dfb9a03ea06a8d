// LoRA's ops: the fused gate|up B kept block-diagonal (ops::zero_off_diagonal_blocks) and the
// adapters' input dropout (ops::dropout_scaled, the CPU's mask: ops/dropout_hash.h).
#include "ops/dropout_hash.h"
#include "ops/cuda/check.h"
#include "ops/cuda/kernel_util.cuh"
#include "ops/cuda/ops_cuda.h"
#include "ops/cuda/runtime.h"

namespace moeforge::cuda {

using namespace detail;

namespace {

template <typename T>
__global__ void zero_off_diagonal_kernel(T* b, int64_t total, int64_t rows, int64_t cols, int64_t n, int64_t r) {
  for (int64_t at = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; at < total; at += (int64_t)gridDim.x * blockDim.x) {
    const int64_t j = at % cols, i = (at / cols) % rows;
    if (i / n != j / r) store(b, at, 0.f);
  }
}

template <typename T>
__global__ void dropout_kernel(const T* x, T* y, int64_t n, float p, float keep_scale, uint64_t seed) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    store(y, i, ops::dropout_keeps(seed, i, p) ? load(x, i) * keep_scale : 0.f);
}

}  // namespace

Tensor dropout_scaled(const Tensor& x, float p, uint64_t seed) {
  require_float(x, "dropout_scaled");
  Tensor y = empty(x.shape(), x.dtype(), "dropout output");
  if (x.numel() == 0) return y;
  dispatch_float(x.dtype(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dropout_kernel<<<grid_stride_blocks(x.numel()), kGridStrideThreads, 0, current_stream()>>>(
        x.data<T>(), y.data<T>(), x.numel(), p, 1.f / (1.f - p), seed);
  });
  MF_CUDA_CHECK_LAUNCH("dropout_scaled");
  return y;
}

void zero_off_diagonal_blocks(Tensor& b, int64_t parts) {
  require_float(b, "zero_off_diagonal_blocks");
  const int64_t rows = b.size(1), cols = b.size(2);
  if (b.numel() == 0) return;
  dispatch_float(b.dtype(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    zero_off_diagonal_kernel<<<grid_stride_blocks(b.numel()), kGridStrideThreads, 0, current_stream()>>>(
        b.data<T>(), b.numel(), rows, cols, rows / parts, cols / parts);
  });
  MF_CUDA_CHECK_LAUNCH("zero_off_diagonal_blocks");
}

}  // namespace moeforge::cuda
