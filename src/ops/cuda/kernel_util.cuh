// Internal to ops/cuda kernels: element loads/stores as F32 whatever the storage dtype, block
// reductions, and dispatch over the activation dtypes (F32, BF16).
#pragma once
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "core/error.h"
#include "core/tensor.h"

namespace moeforge::cuda::detail {

__device__ __forceinline__ float load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void store(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16(v); }

// Sum over a block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const int warps = blockDim.x >> 5;
  v = lane < warps ? partial[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float block_max(float v) {
  __shared__ float partial[32];
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const int warps = blockDim.x >> 5;
  v = lane < warps ? partial[lane] : -INFINITY;
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// exp for a kernel computing on T: the accurate expf for F32 (the parity runs), __expf for BF16.
// The attention kernels take it: with __expf, llama_b's key-bias gradient (a cancellation-dominated
// sum) flipped an Adam step in the fp32 three-step parity test. (Taking it in the router, SwiGLU
// and cross-entropy kernels as well moved mixtral_b's step-1 loss by 2e-3 instead of 3e-5 -- a
// routing near-tie in that fixture -- so they keep __expf; docs/testing.md.)
template <typename T>
__device__ __forceinline__ float exp_for(float x) {
  if constexpr (std::is_same_v<T, float>) return expf(x);
  else return __expf(x);
}

inline void require_float(const Tensor& t, const char* op) {
  MF_CHECK(t.dtype() == DType::F32 || t.dtype() == DType::BF16, op, ": activations must be F32 or BF16, got ",
           dtype_name(t.dtype()));
  MF_CHECK(!t.device().is_cpu(), op, ": tensor is on the CPU; move it with cuda::to_device");
}

template <typename F>
void dispatch_float(DType t, F&& f) {
  if (t == DType::F32) f(static_cast<float*>(nullptr));
  else f(static_cast<__nv_bfloat16*>(nullptr));
}

// Launch shape of the element-wise grid-stride kernels.
constexpr int kGridStrideThreads = 256;
inline int grid_stride_blocks(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kGridStrideThreads - 1) / kGridStrideThreads, 65535));
}

// V elements of T moved as one load or store (16 bytes for V = 16 / sizeof(T)).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Whether rows of width h at these addresses can move in 16-byte packs of T.
template <typename T>
bool packs_fit(int64_t h, std::initializer_list<const void*> rows) {
  bool fit = h % (16 / sizeof(T)) == 0;
  for (const void* q : rows) fit = fit && reinterpret_cast<uintptr_t>(q) % 16 == 0;
  return fit;
}

// V consecutive elements of T from p (aligned to the loads' size) as F32, in loads of at most 16 bytes.
template <int V, typename T>
__device__ __forceinline__ void load_f32(const T* p, float (&out)[V]) {
  constexpr int C = static_cast<int>(16 / sizeof(T)) < V ? static_cast<int>(16 / sizeof(T)) : V;
#pragma unroll
  for (int c = 0; c < V / C; ++c) {
    const Pack<T, C> q = reinterpret_cast<const Pack<T, C>*>(p)[c];
#pragma unroll
    for (int e = 0; e < C; ++e) out[c * C + e] = load(q.v, e);
  }
}

// RoPE on the pair (a, b) = (x[i], x[i + rot/2]) (Transformers' rotate_half), sign -1 for the
// inverse (the backward): a' = a cos - sign b sin, b' = b cos' + sign a sin' (cos' and sin' at
// i + rot/2). Each product rounded on its own (no contraction into FMAs), so the fused norm + RoPE
// kernels and rope_kernel give the same bits.
__device__ __forceinline__ float rope_first(float a, float b, float c, float s, float sign) {
  return __fsub_rn(__fmul_rn(a, c), __fmul_rn(__fmul_rn(sign, b), s));
}
__device__ __forceinline__ float rope_second(float a, float b, float c, float s, float sign) {
  return __fadd_rn(__fmul_rn(b, c), __fmul_rn(__fmul_rn(sign, a), s));
}

inline int threads_for(int64_t n) {
  int t = 32;
  while (t < n && t < 1024) t <<= 1;
  return t;
}

}  // namespace moeforge::cuda::detail
