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

// A thread's 2V interleaved inputs (gate, up, gate, up, ...) starting at `base`, as two packs.
template <typename T, int V>
__device__ __forceinline__ void load_pairs(const T* gu, int64_t base, T (&in)[2 * V]) {
  if constexpr (V == 1) {
    in[0] = gu[base];
    in[1] = gu[base + 1];
  } else {
    *reinterpret_cast<Pack<T, V>*>(in) = reinterpret_cast<const Pack<T, V>*>(gu + base)[0];
    *reinterpret_cast<Pack<T, V>*>(in + V) = reinterpret_cast<const Pack<T, V>*>(gu + base)[1];
  }
}

// V consecutive outputs per thread: 2V interleaved inputs read as two packs of V, V outputs written as
// one (V = 16 / sizeof(T) where the rows allow, else 1). The per-element form (2-byte accesses, a
// 64-bit division per element) ran at about half the bandwidth (docs/perf-notes.md).
template <typename T, int V>
__global__ void clamped_swiglu_kernel(const T* gu, T* out, int64_t rows, int64_t inter, float alpha, float limit) {
  using P = Pack<T, V>;
  const int64_t packs = inter / V;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < rows * packs; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / packs, j = (i - r * packs) * V;  // the first of the thread's V output columns
    alignas(16) T in[2 * V];
    load_pairs<T, V>(gu, r * 2 * inter + 2 * j, in);
    P o;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float g = fminf(load(in, 2 * e), limit), u = fminf(fmaxf(load(in, 2 * e + 1), -limit), limit);
      store(o.v, e, (u + 1.f) * g / (1.f + __expf(-alpha * g)));
    }
    reinterpret_cast<P*>(out + r * inter)[j / V] = o;
  }
}

template <typename T, int V>
__global__ void clamped_swiglu_backward_kernel(const T* gu, const T* dout, T* dgu, int64_t rows, int64_t inter,
                                               float alpha, float limit) {
  using P = Pack<T, V>;
  const int64_t packs = inter / V;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < rows * packs; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / packs, j = (i - r * packs) * V;
    const int64_t base = r * 2 * inter + 2 * j;
    alignas(16) T in[2 * V];
    alignas(16) T grad[2 * V];
    load_pairs<T, V>(gu, base, in);
    const P d = reinterpret_cast<const P*>(dout + r * inter)[j / V];
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float g_raw = load(in, 2 * e), u_raw = load(in, 2 * e + 1);
      const float g = fminf(g_raw, limit), u = fminf(fmaxf(u_raw, -limit), limit);
      const float sig = 1.f / (1.f + __expf(-alpha * g)), dv = load(d.v, e);
      const float dg = dv * (u + 1.f) * (sig + alpha * g * sig * (1.f - sig));
      store(grad, 2 * e, g_raw <= limit ? dg : 0.f);
      store(grad, 2 * e + 1, (u_raw >= -limit && u_raw <= limit) ? dv * g * sig : 0.f);
    }
    if constexpr (V == 1) {
      dgu[base] = grad[0];
      dgu[base + 1] = grad[1];
    } else {
      reinterpret_cast<P*>(dgu + base)[0] = *reinterpret_cast<const P*>(grad);
      reinterpret_cast<P*>(dgu + base)[1] = *reinterpret_cast<const P*>(grad + V);
    }
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
    constexpr int V = 16 / sizeof(T);
    const bool packed = packs_fit<T>(inter, {gate_up.raw(), out.raw()});
    (packed ? clamped_swiglu_kernel<T, V> : clamped_swiglu_kernel<T, 1>)
        <<<grid_stride_blocks(rows * inter / (packed ? V : 1)), kGridStrideThreads, 0, current_stream()>>>(
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
    constexpr int V = 16 / sizeof(T);
    const bool packed = packs_fit<T>(inter, {gate_up.raw(), dout.raw(), dgu.raw()});
    (packed ? clamped_swiglu_backward_kernel<T, V> : clamped_swiglu_backward_kernel<T, 1>)
        <<<grid_stride_blocks(rows * inter / (packed ? V : 1)), kGridStrideThreads, 0, current_stream()>>>(
            gate_up.data<T>(), dout.data<T>(), dgu.data<T>(), rows, inter, alpha, limit);
  });
  MF_CUDA_CHECK_LAUNCH("clamped_swiglu_backward");
  return dgu;
}

}  // namespace moeforge::cuda
