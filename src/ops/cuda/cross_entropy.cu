// Cross-entropy rows fused with their gradient (softmax - onehot, scaled, written once), for the
// fused LM head: each row's (max, sum of exponentials) and then its gradient. By default one block
// per row reads the row twice. MOEFORGE_CE_KERNEL=on-chip takes, for 16-byte aligned rows, a
// kernel that holds each row on chip in a cluster of CTAs and reads it once: it measured no faster
// with two CTAs a row (docs/perf-notes.md, session 23) and stays an opt-in until its larger
// clusters (two CTAs an SM) are measured.
#include <cooperative_groups.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
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

// 16 bytes of a row (8 BF16 or 4 F32 elements) as F32, and back.
template <typename T>
__device__ __forceinline__ void unpack16(const uint4& raw, float* o) {
  if constexpr (sizeof(T) == 2) {
    const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&raw);
#pragma unroll
    for (int k = 0; k < 8; ++k) o[k] = __bfloat162float(h[k]);
  } else {
    o[0] = __uint_as_float(raw.x), o[1] = __uint_as_float(raw.y), o[2] = __uint_as_float(raw.z), o[3] = __uint_as_float(raw.w);
  }
}
template <typename T>
__device__ __forceinline__ uint4 pack16(const float* v) {
  uint4 raw;
  if constexpr (sizeof(T) == 2) {
    __nv_bfloat16* h = reinterpret_cast<__nv_bfloat16*>(&raw);
#pragma unroll
    for (int k = 0; k < 8; ++k) h[k] = __float2bfloat16(v[k]);
  } else {
    raw = make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
  }
  return raw;
}

// The same row read once: a cluster of C CTAs holds it in their shared memory, each a slice of
// `slice` elements (a multiple of 8). Each CTA loads its slice (four 16-byte loads a thread in
// flight, the (max, sum) folded in as they arrive), the CTAs exchange their (max, sum) through
// distributed shared memory, and each writes its slice's gradient from shared memory. DRAM moves
// the row twice (read, write) instead of three times. In place is safe: a CTA writes only the
// slice it has already read whole. The loss is written by the CTA whose slice holds the target
// (+inf when no slice does: a target out of range).
constexpr int kCeOnChipThreads = 1024;
constexpr int kCeOnChipLoads = 4;
template <typename T>
__global__ void __launch_bounds__(kCeOnChipThreads) cross_entropy_on_chip_kernel(const T* logits, const int64_t* targets,
                                                                               T* dlogits, float* row_loss, int64_t v,
                                                                               int64_t slice, int64_t ignore, float scale) {
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  extern __shared__ uint4 held[];  // this CTA's slice of the row
  __shared__ float stats[2];
  constexpr int kPer = 16 / sizeof(T);
  const int64_t c = cluster.num_blocks(), rank = cluster.block_rank();
  const int64_t row = blockIdx.x / c;
  const int64_t first = rank * slice, end = first + slice < v ? first + slice : v;
  const int64_t count = end > first ? end - first : 0;
  const int64_t units = count / kPer;
  const uint4* src = reinterpret_cast<const uint4*>(logits + row * v + first);
  uint4* dst = reinterpret_cast<uint4*>(dlogits + row * v + first);
  const int64_t target = targets[row];
  if (target == ignore) {  // every CTA of the cluster sees the same target: none waits at a cluster barrier
    for (int64_t u = threadIdx.x; u < units; u += blockDim.x) dst[u] = make_uint4(0, 0, 0, 0);
    if (rank == 0 && threadIdx.x == 0) row_loss[row] = nanf("");  // marks "not counted"
    return;
  }
  float m = -INFINITY, s = 0.f;
  for (int64_t u0 = threadIdx.x; u0 < units; u0 += static_cast<int64_t>(blockDim.x) * kCeOnChipLoads) {
    uint4 raw[kCeOnChipLoads];
#pragma unroll
    for (int b = 0; b < kCeOnChipLoads; ++b) {
      const int64_t u = u0 + static_cast<int64_t>(b) * blockDim.x;
      if (u < units) raw[b] = __ldcs(src + u);  // read once: evict first
    }
#pragma unroll
    for (int b = 0; b < kCeOnChipLoads; ++b) {
      const int64_t u = u0 + static_cast<int64_t>(b) * blockDim.x;
      if (u >= units) continue;
      held[u] = raw[b];
      float e[kPer];
      unpack16<T>(raw[b], e);
#pragma unroll
      for (int k = 0; k < kPer; ++k) online_add(m, s, e[k]);
    }
  }
  block_online_merge(m, s);
  if (threadIdx.x == 0) {
    stats[0] = m;
    stats[1] = s;
  }
  cluster.sync();  // every CTA's (max, sum) is in its shared memory
  m = -INFINITY, s = 0.f;
  for (int64_t r = 0; r < c; ++r) {  // the same order in every CTA: the same (max, sum) everywhere
    const float* theirs = cluster.map_shared_rank(stats, static_cast<unsigned>(r));
    online_merge(m, s, theirs[0], theirs[1]);
  }
  cluster.sync();  // no CTA leaves (its shared memory with it) while another still reads it
  const float inv = 1.f / s;
  for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
    float e[kPer];
    unpack16<T>(held[u], e);
    const int64_t i0 = first + u * kPer;
#pragma unroll
    for (int k = 0; k < kPer; ++k) e[k] = scale * (__expf(e[k] - m) * inv - (i0 + k == target ? 1.f : 0.f));
    __stcs(dst + u, pack16<T>(e));
  }
  if (threadIdx.x == 0) {
    const bool mine = target >= first && target < first + count;
    if (mine) {
      float e[kPer];
      unpack16<T>(held[(target - first) / kPer], e);
      row_loss[row] = logf(s) + m - e[(target - first) % kPer];
    } else if (rank == 0 && (target < 0 || target >= v)) {
      row_loss[row] = INFINITY;
    }
  }
}

// Tests: -1 keeps rows on the two-pass kernel, N > 0 takes the on-chip one with the smallest
// cluster of at least N CTAs that holds a row, 0 (the default) follows MOEFORGE_CE_KERNEL.
int g_ce_cluster_override = 0;

// MOEFORGE_CE_KERNEL=on-chip: the on-chip kernel where it applies (else the two-pass one).
bool on_chip_requested() {
  static const bool on = [] {
    const char* v = std::getenv("MOEFORGE_CE_KERNEL");
    return v && std::strcmp(v, "on-chip") == 0;
  }();
  return on;
}

int64_t max_dynamic_smem() {
  static const int64_t bytes = [] {
    int dev = 0, optin = 0;
    MF_CUDA_CHECK(cudaGetDevice(&dev));
    MF_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    return static_cast<int64_t>(optin) - 1024;  // room for the kernel's static shared memory
  }();
  return bytes;
}

// Launches the on-chip kernel and returns true, or returns false where it does not apply (rows not
// 16-byte aligned, or longer than 8 CTAs' shared memory).
template <typename T>
bool cross_entropy_on_chip(const T* logits, const int64_t* targets, T* dlogits, float* losses, int64_t rows, int64_t v,
                           int64_t ignore, float scale, bool vec) {
  const bool wanted = g_ce_cluster_override > 0 || (g_ce_cluster_override == 0 && on_chip_requested());
  if (!vec || v % 8 != 0 || !wanted) return false;
  int64_t c = 0, slice = 0;
  for (int64_t cand : {1, 2, 4, 8}) {
    if (cand < g_ce_cluster_override) continue;
    const int64_t s = (v + cand - 1) / cand, s8 = (s + 7) / 8 * 8;
    if (s8 * static_cast<int64_t>(sizeof(T)) <= max_dynamic_smem()) {
      c = cand;
      slice = s8;
      break;
    }
  }
  if (c == 0) return false;
  const size_t smem = static_cast<size_t>(slice) * sizeof(T);
  auto kernel = cross_entropy_on_chip_kernel<T>;
  MF_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(rows * c));
  cfg.blockDim = dim3(kCeOnChipThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = current_stream();
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(c);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  MF_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, logits, targets, dlogits, losses, v, slice, ignore, scale));
  MF_CUDA_CHECK_LAUNCH("cross_entropy_on_chip");
  return true;
}

}  // namespace

int64_t set_cross_entropy_cluster_for_testing(int64_t ctas) {
  MF_CHECK(ctas == -1 || ctas == 0 || ctas == 1 || ctas == 2 || ctas == 4 || ctas == 8, "cross-entropy cluster size must be -1 (two-pass), 0 (MOEFORGE_CE_KERNEL), 1, 2, 4 or 8");
  const int64_t before = g_ce_cluster_override;
  g_ce_cluster_override = static_cast<int>(ctas);
  return before;
}

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
      if (cross_entropy_on_chip<T>(logits.data<T>(), targets.data<int64_t>(), dlogits.data<T>(), losses.data<float>(), rows, v,
                                   ignore_index, scale, vec))
        return;
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
