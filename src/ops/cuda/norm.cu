// RMSNorm forward (optionally fused with the residual add) and backward: one block per row, the
// row's sum of squares reduced in F32. Memory-bound: forward reads x and w and writes y (plus the
// residual when fused), so its floor is those bytes at HBM bandwidth.
#include "ops/cuda/check.h"
#include "ops/cuda/kernel_util.cuh"
#include "ops/cuda/ops_cuda.h"
#include "ops/cuda/runtime.h"

namespace moeforge::cuda {

using namespace detail;

namespace {

template <typename T, typename W>
__global__ void rms_norm_kernel(const T* x, T* residual, const W* w, T* y, float* rstd, int64_t d, float eps,
                                bool fused_add) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * d;
  T* rr = fused_add ? residual + row * d : nullptr;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    float v = load(xr, i);
    if (fused_add) {
      v += load(rr, i);
      store(rr, i, v);
    }
    ss += v * v;
  }
  ss = block_sum(ss);
  const float r = rsqrtf(ss / static_cast<float>(d) + eps);
  if (threadIdx.x == 0 && rstd) rstd[row] = r;
  const T* src = fused_add ? rr : xr;
  // Transformers: (x * rstd).to(input dtype) * weight. With BF16 activations the normalised value
  // is rounded before the weight multiplies it.
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    float n = load(src, i) * r;
    if constexpr (!std::is_same_v<T, float>) n = __bfloat162float(__float2bfloat16(n));
    store(y + row * d, i, n * load(w, i));
  }
}

// Backward: each block walks rows blockIdx.x, +gridDim.x, ... and keeps its share of dw in
// registers (element i belongs to thread i % blockDim.x), so dw receives one atomic add per block
// and element instead of one per row (per-head q/k norms have T*heads rows of 128).
constexpr int kMaxPerThread = 8;  // d <= 8 * 1024

template <typename T, typename W>
__global__ void rms_norm_backward_kernel(const T* x, const W* w, const float* rstd, const T* dy, T* dx, float* dw,
                                         int64_t rows, int64_t d) {
  float dw_part[kMaxPerThread];
#pragma unroll
  for (int j = 0; j < kMaxPerThread; ++j) dw_part[j] = 0.f;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const float r = rstd[row];
    float dot = 0.f;
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) dot += load(dy + row * d, i) * load(w, i) * load(x + row * d, i);
    dot = block_sum(dot);
    // dx = r * (dy*w) - x * r^3 * mean(dy*w*x)
    const float c = dot * r * r * r / static_cast<float>(d);
#pragma unroll
    for (int j = 0; j < kMaxPerThread; ++j) {
      const int64_t i = threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
      if (i < d) {
        const float xi = load(x + row * d, i), g = load(dy + row * d, i);
        store(dx + row * d, i, r * g * load(w, i) - xi * c);
        dw_part[j] += g * xi * r;
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kMaxPerThread; ++j) {
    const int64_t i = threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
    if (i < d) atomicAdd(dw + i, dw_part[j]);
  }
}

template <typename Fn>
void with_weight(const Tensor& w, Fn&& fn) {
  MF_CHECK(w.dtype() == DType::F32 || w.dtype() == DType::BF16, "rms_norm: weight must be F32 or BF16");
  if (w.dtype() == DType::F32) fn(w.data<float>());
  else fn(w.data<__nv_bfloat16>());
}

Tensor norm_impl(const Tensor& x, Tensor* residual, const Tensor& w, float eps, Tensor* rstd_out) {
  require_float(x, "rms_norm");
  const int64_t d = x.shape().back(), rows = x.numel() / d;
  MF_CHECK(w.numel() == d, "rms_norm: weight has ", w.numel(), " elements for rows of ", d);
  if (residual) MF_CHECK(residual->shape() == x.shape() && residual->dtype() == x.dtype(), "add_rms_norm: residual must match x");
  Tensor y = empty(x.shape(), x.dtype(), "rms_norm output");
  Tensor rstd = empty({rows}, DType::F32, "rms_norm rstd");
  if (rows == 0) return y;
  const int threads = std::min(threads_for(d), 1024);
  dispatch_float(x.dtype(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    with_weight(w, [&](auto* wp) {
      rms_norm_kernel<<<rows, threads, 0, current_stream()>>>(x.data<T>(), residual ? residual->data<T>() : nullptr, wp,
                                                              y.data<T>(), rstd.data<float>(), d, eps, residual != nullptr);
    });
  });
  MF_CUDA_CHECK_LAUNCH("rms_norm");
  if (rstd_out) *rstd_out = rstd;
  return y;
}

}  // namespace

Tensor rms_norm(const Tensor& x, const Tensor& weight, float eps, Tensor* rstd) {
  return norm_impl(x, nullptr, weight, eps, rstd);
}

Tensor add_rms_norm(const Tensor& x, Tensor& residual, const Tensor& weight, float eps, Tensor* rstd) {
  return norm_impl(x, &residual, weight, eps, rstd);
}

Tensor rms_norm_backward(const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& dy, Tensor& dw) {
  require_float(x, "rms_norm_backward");
  MF_CHECK(dy.shape() == x.shape() && dy.dtype() == x.dtype(), "rms_norm_backward: dy must match x");
  MF_CHECK(dw.dtype() == DType::F32 && dw.numel() == x.shape().back(), "rms_norm_backward: dw must be F32 [d]");
  const int64_t d = x.shape().back(), rows = x.numel() / d;
  Tensor dx = empty(x.shape(), x.dtype(), "rms_norm input gradient");
  if (rows == 0) return dx;
  const int threads = std::min(threads_for(d), 1024);
  MF_CHECK(d <= static_cast<int64_t>(kMaxPerThread) * threads, "rms_norm_backward: rows of ", d, " are too long");
  const int64_t blocks = std::min<int64_t>(rows, 1024);
  dispatch_float(x.dtype(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    with_weight(weight, [&](auto* wp) {
      rms_norm_backward_kernel<<<blocks, threads, 0, current_stream()>>>(x.data<T>(), wp, rstd.data<float>(), dy.data<T>(),
                                                                         dx.data<T>(), dw.data<float>(), rows, d);
    });
  });
  MF_CUDA_CHECK_LAUNCH("rms_norm_backward");
  return dx;
}

}  // namespace moeforge::cuda
