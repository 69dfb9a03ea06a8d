// GPT-OSS's expert activation on the device (CPU reference: ops/cpu/clamped_swiglu.cpp): gate and
// up interleaved in gate_up [T, 2I]; out = (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha g),
// g = min(gate, limit). Memory-bound like SwiGLU: one read of gate_up, one write.
#include "ops/cuda/check.h"
#include "ops/cuda/kernel_util.cuh"
#include "ops/cuda/ops_cuda.h"
#include "ops/cuda/runtime.h"

namespace moeforge::cuda {

using namespace detail;

namespace {

template <typename T>
__global__ void clamped_swiglu_kernel(const T* gu, T* out, int64_t rows, int64_t inter, float alpha, float limit) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < rows * inter; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / inter, j = i % inter;
    const float g = fminf(load(gu, r * 2 * inter + 2 * j), limit);
    const float u = fminf(fmaxf(load(gu, r * 2 * inter + 2 * j + 1), -limit), limit);
    store(out, i, (u + 1.f) * g / (1.f + __expf(-alpha * g)));
  }
}

template <typename T>
__global__ void clamped_swiglu_backward_kernel(const T* gu, const T* dout, T* dgu, int64_t rows, int64_t inter,
                                               float alpha, float limit) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < rows * inter; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / inter, j = i % inter;
    const float g_raw = load(gu, r * 2 * inter + 2 * j), u_raw = load(gu, r * 2 * inter + 2 * j + 1);
    const float g = fminf(g_raw, limit), u = fminf(fmaxf(u_raw, -limit), limit);
    const float sig = 1.f / (1.f + __expf(-alpha * g)), d = load(dout, i);
    const float dg = d * (u + 1.f) * (sig + alpha * g * sig * (1.f - sig));
    store(dgu, r * 2 * inter + 2 * j, g_raw <= limit ? dg : 0.f);
    store(dgu, r * 2 * inter + 2 * j + 1, (u_raw >= -limit && u_raw <= limit) ? d * g * sig : 0.f);
  }
}

}  // namespace

Tensor clamped_swiglu(const Tensor& gate_up, float alpha, float limit) {
  require_float(gate_up, "clamped_swiglu");
  MF_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "clamped_swiglu: gate_up must be [T, 2I], got ",
           shape_str(gate_up.shape()));
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  Tensor out = empty({rows, inter}, gate_up.dtype(), "clamped SwiGLU output");
  if (rows * inter == 0) return out;
  dispatch_float(gate_up.dtype(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    clamped_swiglu_kernel<<<grid_stride_blocks(rows * inter), kGridStrideThreads, 0, current_stream()>>>(
        gate_up.data<T>(), out.data<T>(), rows, inter, alpha, limit);
  });
  MF_CUDA_CHECK_LAUNCH("clamped_swiglu");
  return out;
}

Tensor clamped_swiglu_backward(const Tensor& gate_up, const Tensor& dout, float alpha, float limit) {
  require_float(gate_up, "clamped_swiglu_backward");
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  MF_CHECK(dout.dtype() == gate_up.dtype() && dout.numel() == rows * inter, "clamped_swiglu_backward: dout must be [",
           rows, ", ", inter, "] in gate_up's dtype");
  Tensor dgu = empty(gate_up.shape(), gate_up.dtype(), "clamped SwiGLU input gradient");
  if (rows * inter == 0) return dgu;
  dispatch_float(gate_up.dtype(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    clamped_swiglu_backward_kernel<<<grid_stride_blocks(rows * inter), kGridStrideThreads, 0, current_stream()>>>(
        gate_up.data<T>(), dout.data<T>(), dgu.data<T>(), rows, inter, alpha, limit);
  });
  MF_CUDA_CHECK_LAUNCH("clamped_swiglu_backward");
  return dgu;
}

}  // namespace moeforge::cuda
