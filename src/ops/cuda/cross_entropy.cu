// Cross-entropy rows fused with their gradient (softmax - onehot, scaled, written once), for the
// fused LM head: one block per row finds the row's (max, sum of exponentials) in one read and
// writes its gradient in a second. (A kernel that held each row on chip in a cluster of 2, 4 or 8
// CTAs, reading it once, measured no faster: docs/perf-notes.md, sessions 23 and 24.)
#include <cmath>
#include <vector>

#include "ops/cuda/check.h"
#include "ops/cuda/kernel_util.cuh"
#include "ops/cuda/ops_cuda.h"
#include "ops/cuda/runtime.h"

namespace moeforge::cuda {

using namespace detail;

namespace {

// Eight elements at a 16-byte aligned position as F32, and back.
__device__ __forceinline__ void load8(const float* p, float* o) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  o[0] = a.x, o[1] = a.y, o[2] = a.z, o[3] = a.w, o[4] = b.x, o[5] = b.y, o[6] = b.z, o[7] = b.w;
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float* o) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&raw);
#pragma unroll
  for (int k = 0; k < 8; ++k) o[k] = __bfloat162float(h[k]);
}
__device__ __forceinline__ void store8(float* p, const float* v) {
  reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void store8(__nv_bfloat16* p, const float* v) {
  uint4 raw;
  __nv_bfloat16* h = reinterpret_cast<__nv_bfloat16*>(&raw);
#pragma unroll
  for (int k = 0; k < 8; ++k) h[k] = __float2bfloat16(v[k]);
  *reinterpret_cast<uint4*>(p) = raw;
}

// Running (max, sum of exp(x - max)) pairs: adding x, and merging two pairs.
__device__ __forceinline__ void online_add(float& m, float& s, float x) {
  if (x > m) {
    s = s * __expf(m - x) + 1.f;
    m = x;
  } else {
    s += __expf(x - m);
  }
}
__device__ __forceinline__ void online_merge(float& m, float& s, float m2, float s2) {
  const float mm = fmaxf(m, m2);
  if (mm == -INFINITY) return;
  s = s * __expf(m - mm) + s2 * __expf(m2 - mm);
  m = mm;
}

// The (max, sum) of a block's threads, merged in warp order; every thread gets the result.
__device__ __forceinline__ void block_online_merge(float& m, float& s) {
  __shared__ float wm[32], ws[32];
  for (int o = 16; o > 0; o >>= 1) online_merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    wm[warp] = m;
    ws[warp] = s;
  }
  __syncthreads();
  m = lane < (blockDim.x >> 5) ? wm[lane] : -INFINITY;
  s = lane < (blockDim.x >> 5) ? ws[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) online_merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
}

// One block per row, two passes over it: the online (max, sum) in one read, then the gradient
// written once. `dlogits` may alias `logits` (in place): the target's logit is read before any
// write. With VEC, rows are 16-byte aligned and a multiple of 8 elements: 16-byte accesses.
template <typename T, bool VEC>
__global__ void cross_entropy_kernel(const T* logits, const int64_t* targets, T* dlogits, float* row_loss, int64_t v,
                                     int64_t ignore, float scale) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * v;
  T* dx = dlogits + row * v;
  const int64_t target = targets[row];
  if (target == ignore) {
    for (int64_t i = threadIdx.x; i < v; i += blockDim.x) store(dx, i, 0.f);
    if (threadIdx.x == 0) row_loss[row] = nanf("");  // marks "not counted"
    return;
  }
  float m = -INFINITY, s = 0.f;
  if constexpr (VEC) {
    for (int64_t i = threadIdx.x * 8; i < v; i += blockDim.x * 8) {
      float e[8];
      load8(x + i, e);
#pragma unroll
      for (int k = 0; k < 8; ++k) online_add(m, s, e[k]);
    }
  } else {
    for (int64_t i = threadIdx.x; i < v; i += blockDim.x) online_add(m, s, load(x, i));
  }
  // Thread 0 alone writes the loss; it reads the target's logit before the merge's barrier, so
  // before any thread writes the gradient over it (in place).
  const float x_target = threadIdx.x == 0 ? load(x, target) : 0.f;
  block_online_merge(m, s);
  const float inv = 1.f / s;
  if constexpr (VEC) {
    for (int64_t i = threadIdx.x * 8; i < v; i += blockDim.x * 8) {
      float e[8];
      load8(x + i, e);
#pragma unroll
      for (int k = 0; k < 8; ++k) e[k] = scale * (__expf(e[k] - m) * inv - (i + k == target ? 1.f : 0.f));
      store8(dx + i, e);
    }
  } else {
    for (int64_t i = threadIdx.x; i < v; i += blockDim.x) {
      const float pr = __expf(load(x, i) - m) * inv;
      store(dx, i, scale * (pr - (i == target ? 1.f : 0.f)));
    }
  }
  if (threadIdx.x == 0) row_loss[row] = logf(s) + m - x_target;
}

}  // namespace

void cross_entropy_backward_rows(const Tensor& logits, const Tensor& targets, int64_t ignore_index, float scale,
                                 Tensor& dlogits, Tensor& losses) {
  require_float(logits, "cross_entropy");
  MF_CHECK(targets.dtype() == DType::I64, "cross_entropy: targets must be I64");
  const int64_t v = logits.shape().back(), rows = logits.numel() / v;
  MF_CHECK(targets.numel() == rows, "cross_entropy: ", targets.numel(), " targets for ", rows, " rows");
  MF_CHECK(losses.dtype() == DType::F32 && losses.numel() == rows, "cross_entropy: row losses must be F32 [", rows, "]");
  const bool in_place = dlogits.defined() && dlogits.raw() == logits.raw() && dlogits.numel() == logits.numel() &&
                        dlogits.dtype() == logits.dtype();
  if (!in_place) dlogits = empty(logits.shape(), logits.dtype(), "cross-entropy logit gradient");
  if (rows > 0) {
    dispatch_float(logits.dtype(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
      const bool vec = (v * static_cast<int64_t>(sizeof(T))) % 16 == 0 && aligned(logits.raw()) && aligned(dlogits.raw());
      auto kernel = vec ? cross_entropy_kernel<T, true> : cross_entropy_kernel<T, false>;
      kernel<<<rows, 1024, 0, current_stream()>>>(logits.data<T>(), targets.data<int64_t>(), dlogits.data<T>(),
                                                 losses.data<float>(), v, ignore_index, scale);
    });
    MF_CUDA_CHECK_LAUNCH("cross_entropy");
  }
}

double sum_row_losses(const Tensor& losses, int64_t* counted) {
  const int64_t rows = losses.numel();
  std::vector<float> host(static_cast<size_t>(rows));
  if (rows > 0)
    MF_CUDA_CHECK(cudaMemcpyAsync(host.data(), losses.raw(), rows * sizeof(float), cudaMemcpyDeviceToHost, current_stream()));
  MF_CUDA_CHECK(cudaStreamSynchronize(current_stream()));
  double total = 0;
  int64_t n = 0;
  for (float l : host)
    if (!std::isnan(l)) {
      total += l;
      ++n;
    }
  if (counted) *counted = n;
  return total;
}

double cross_entropy_backward(const Tensor& logits, const Tensor& targets, int64_t ignore_index, float scale,
                              Tensor& dlogits, int64_t* counted) {
  const int64_t v = logits.shape().back(), rows = v > 0 ? logits.numel() / v : 0;
  Tensor losses = empty({rows}, DType::F32, "cross-entropy row losses");
  cross_entropy_backward_rows(logits, targets, ignore_index, scale, dlogits, losses);
  return sum_row_losses(losses, counted);
}

Tensor cross_entropy_rows(const Tensor& logits, const Tensor& targets, int64_t ignore_index, int64_t* counted) {
  // The fused kernel with a zero gradient scale into a scratch buffer: its row losses are what the
  // forward needs (an evaluation path, where the V-wide scratch costs what the logits already do).
  const int64_t v = logits.shape().back(), rows = logits.numel() / v;
  Tensor scratch = empty(logits.shape(), logits.dtype(), "cross-entropy scratch");
  Tensor losses = empty({rows}, DType::F32, "cross-entropy row losses");
  if (rows > 0) {
    dispatch_float(logits.dtype(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      cross_entropy_kernel<T, false><<<rows, 1024, 0, current_stream()>>>(
          logits.data<T>(), targets.data<int64_t>(), scratch.data<T>(), losses.data<float>(), v, ignore_index, 0.f);
    });
    MF_CUDA_CHECK_LAUNCH("cross_entropy_rows");
  }
  Tensor host = to_host_f32(losses);  // ignored rows come back NaN: 0 and not counted, as on the CPU
  int64_t n = 0;
  for (int64_t i = 0; i < rows; ++i) {
    if (std::isnan(host.f32()[i])) host.f32()[i] = 0.f;
    else ++n;
  }
  if (counted) *counted = n;
  return to_device(host, DType::F32);
}

}  // namespace moeforge::cuda
