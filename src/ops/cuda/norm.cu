// RMSNorm forward (optionally fused with the residual add) and backward. Memory-bound: the forward
// reads x and w and writes y (plus the residual when fused), the backward reads x, dy and w and
// writes dx, so their floors are those bytes at HBM bandwidth.
//
// Rows that move in 16-byte packs take the row-group kernels: a group of L lanes per row (L a power
// of two, from 1 for short rows to 1024), each lane holding its packs in registers, so x is read
// once. Forward, the per-head q/k norms (rows of 128) get 2 lanes a row and the hidden norm (2048) a
// warp; backward, where a lane also holds dy and its share of dw, 16 and 128 lanes (one and two
// packs a lane, for occupancy); a block per row with one element per thread, as before, spent 3-5x
// its floor on these shapes (docs/perf-notes.md). Other rows (odd widths, unaligned views) keep the
// element kernels.
#include <cuda_runtime.h>

#include <cstdlib>
#include <string>

#include "ops/cuda/check.h"
#include "ops/cuda/kernel_util.cuh"
#include "ops/cuda/ops_cuda.h"
#include "ops/cuda/runtime.h"

namespace moeforge::cuda {

using namespace detail;

namespace {

template <typename T, typename W>
__global__ void rms_norm_kernel(const T* x, const T* residual, T* sum, const W* w, T* y, float* rstd, int64_t d,
                                float eps, bool fused_add) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * d;
  const T* rr = fused_add ? residual + row * d : nullptr;
  T* sr = fused_add ? sum + row * d : nullptr;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    float v = load(xr, i);
    if (fused_add) {
      store(sr, i, v + load(rr, i));
      v = load(sr, i);  // the sum as stored (rounded to T): Transformers normalises that tensor
    }
    ss += v * v;
  }
  ss = block_sum(ss);
  const float r = rsqrtf(ss / static_cast<float>(d) + eps);
  if (threadIdx.x == 0 && rstd) rstd[row] = r;
  const T* src = fused_add ? sr : xr;
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

// ---- row-group kernels -------------------------------------------------------------------------

// Sum over the `lanes` lanes of a row group (groups are aligned runs of lanes). Up to a warp: xor
// shuffles; wider: shuffles, then the group's warps through `scratch` (blockDim.x / 32 floats).
// Every thread of the block calls it (the wide case synchronises the block).
__device__ __forceinline__ float group_sum(float v, int lanes, float* scratch) {
  for (int o = (lanes < 32 ? lanes : 32) / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (lanes > 32) {
    const int warp = threadIdx.x >> 5, first = warp & ~(lanes / 32 - 1);
    __syncthreads();  // scratch is free again after the previous call
    if ((threadIdx.x & 31) == 0) scratch[warp] = v;
    __syncthreads();
    v = 0.f;
    for (int i = 0; i < lanes / 32; ++i) v += scratch[first + i];
  }
  return v;
}

// RoPE after a per-head norm (Qwen3's q_norm and k_norm), read by the kernels' ROPE instances:
// cos and sin [tokens, d] F32, `heads` consecutive norm rows per token.
struct RopeTable {
  const float* cos = nullptr;
  const float* sin = nullptr;
  int64_t heads = 1;
};

template <typename T>
__device__ __forceinline__ float rounded_to(float v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else return __bfloat162float(__float2bfloat16(v));
}

// One row per group of `lanes` lanes; lane l holds packs l, l + lanes, ... (at most NP of them).
// ROPE: the normalised row, rounded to T as stored, is rotated before it is stored (the launcher
// checks NP * lanes == packs with NP even, so pack j's partner half a row away is pack j + NP/2 of
// the same lane).
template <typename T, typename W, int NP, bool ROPE = false>
__global__ void rms_norm_rows_kernel(const T* x, const T* residual, T* sum, const W* w, T* y, float* rstd,
                                     int64_t rows, int64_t d, int lanes, float eps, RopeTable rope = {}) {
  extern __shared__ float scratch[];
  constexpr int V = 16 / sizeof(T);
  using P = Pack<T, V>;
  const int64_t packs = d / V;
  const int lane = threadIdx.x & (lanes - 1);
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x / lanes) + threadIdx.x / lanes;
  const bool live = row < rows;
  float v[NP][V];
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < NP; ++j) {
    const int64_t p = lane + static_cast<int64_t>(j) * lanes;
    if (!live || p >= packs) continue;
    const P xp = reinterpret_cast<const P*>(x + row * d)[p];
    if (residual) {
      const P r0 = reinterpret_cast<const P*>(residual + row * d)[p];
      P sp;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        store(sp.v, e, load(xp.v, e) + load(r0.v, e));
        v[j][e] = load(sp.v, e);  // rounded to T, as stored and as Transformers normalises it
      }
      reinterpret_cast<P*>(sum + row * d)[p] = sp;
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) v[j][e] = load(xp.v, e);
    }
#pragma unroll
    for (int e = 0; e < V; ++e) ss += v[j][e] * v[j][e];
  }
  ss = group_sum(ss, lanes, scratch);
  const float r = rsqrtf(ss / static_cast<float>(d) + eps);
  if (live && lane == 0 && rstd) rstd[row] = r;
  if constexpr (ROPE && NP % 2 == 0) {
    if (!live) return;
#pragma unroll
    for (int j = 0; j < NP; ++j) {
      float wv[V];
      load_f32<V>(w + (lane + static_cast<int64_t>(j) * lanes) * V, wv);
#pragma unroll
      for (int e = 0; e < V; ++e) v[j][e] = rounded_to<T>(rounded_to<T>(v[j][e] * r) * wv[e]);  // the norm's output
    }
    const float* cr = rope.cos + (row / rope.heads) * d;
    const float* sr = rope.sin + (row / rope.heads) * d;
#pragma unroll
    for (int j = 0; j < NP / 2; ++j) {
      const int64_t p = lane + static_cast<int64_t>(j) * lanes, q = p + packs / 2;
      float cl[V], ch[V], sl[V], sh[V];
      load_f32<V>(cr + p * V, cl);
      load_f32<V>(cr + q * V, ch);
      load_f32<V>(sr + p * V, sl);
      load_f32<V>(sr + q * V, sh);
      P oa, ob;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        store(oa.v, e, rope_first(v[j][e], v[j + NP / 2][e], cl[e], sl[e], 1.f));
        store(ob.v, e, rope_second(v[j][e], v[j + NP / 2][e], ch[e], sh[e], 1.f));
      }
      reinterpret_cast<P*>(y + row * d)[p] = oa;
      reinterpret_cast<P*>(y + row * d)[q] = ob;
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < NP; ++j) {
    const int64_t p = lane + static_cast<int64_t>(j) * lanes;
    if (!live || p >= packs) continue;
    float wv[V];
    load_f32<V>(w + p * V, wv);
    P o;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      float n = v[j][e] * r;
      if constexpr (!std::is_same_v<T, float>) n = __bfloat162float(__float2bfloat16(n));  // as the element kernel
      store(o.v, e, n * wv[e]);
    }
    reinterpret_cast<P*>(y + row * d)[p] = o;
  }
}

// Backward: the block's row groups walk rows block-strided, each lane keeping its elements' share of
// dw in registers; at the end the groups' shares are summed in shared memory and added to dw with one
// atomic per block and element. Shared memory: max(blockDim.x / 32, rows per block * d) floats.
// ROPE: dy is in the rotated space and is rotated back first, rounded to T as rope_inplace stores it
// (the launcher checks NP == 1 and lanes == packs <= 32, so a pack's partner half a row away is in
// lane ^ lanes/2 of the same warp).
template <typename T, typename W, int NP, bool ROPE = false>
__global__ void rms_norm_backward_rows_kernel(const T* x, const W* w, const float* rstd, const T* dy, const T* plus, T* dx,
                                              float* dw, int64_t rows, int64_t d, int lanes, RopeTable rope = {}) {
  extern __shared__ float scratch[];
  constexpr int V = 16 / sizeof(T);
  using P = Pack<T, V>;
  const int64_t packs = d / V;
  const int per_block = blockDim.x / lanes, group = threadIdx.x / lanes, lane = threadIdx.x & (lanes - 1);
  float dw_part[NP][V];
#pragma unroll
  for (int j = 0; j < NP; ++j)
#pragma unroll
    for (int e = 0; e < V; ++e) dw_part[j][e] = 0.f;
  for (int64_t first = blockIdx.x * static_cast<int64_t>(per_block); first < rows;
       first += static_cast<int64_t>(gridDim.x) * per_block) {
    const int64_t row = first + group;
    const bool live = row < rows;
    const float r = live ? rstd[row] : 0.f;
    float xv[NP][V], gv[NP][V];
    float dot = 0.f;
    if constexpr (ROPE && NP == 1) {
      // Every lane shuffles (rows past the end with zeros), so the warp's shuffles stay converged.
      float g[V], other[V], c[V], sn[V];
      P gp;
      if (live) gp = reinterpret_cast<const P*>(dy + row * d)[lane];
#pragma unroll
      for (int e = 0; e < V; ++e) {
        g[e] = live ? load(gp.v, e) : 0.f;
        other[e] = __shfl_xor_sync(0xffffffffu, g[e], lanes / 2);
      }
      if (live) {
        load_f32<V>(rope.cos + (row / rope.heads) * d + lane * V, c);
        load_f32<V>(rope.sin + (row / rope.heads) * d + lane * V, sn);
        const P xp = reinterpret_cast<const P*>(x + row * d)[lane];
        float wv[V];
        load_f32<V>(w + lane * V, wv);
        const bool first_half = lane < lanes / 2;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const float back = first_half ? rope_first(g[e], other[e], c[e], sn[e], -1.f)
                                        : rope_second(other[e], g[e], c[e], sn[e], -1.f);
          xv[0][e] = load(xp.v, e);
          gv[0][e] = rounded_to<T>(back);
          dot += gv[0][e] * wv[e] * xv[0][e];
        }
      }
    } else {
#pragma unroll
      for (int j = 0; j < NP; ++j) {
        const int64_t p = lane + static_cast<int64_t>(j) * lanes;
        if (!live || p >= packs) continue;
        const P xp = reinterpret_cast<const P*>(x + row * d)[p], gp = reinterpret_cast<const P*>(dy + row * d)[p];
        float wv[V];
        load_f32<V>(w + p * V, wv);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          xv[j][e] = load(xp.v, e);
          gv[j][e] = load(gp.v, e);
          dot += gv[j][e] * wv[e] * xv[j][e];
        }
      }
    }
    dot = group_sum(dot, lanes, scratch);
    // dx = r * (dy*w) - x * r^3 * mean(dy*w*x)
    const float c = dot * r * r * r / static_cast<float>(d);
#pragma unroll
    for (int j = 0; j < NP; ++j) {
      const int64_t p = lane + static_cast<int64_t>(j) * lanes;
      if (!live || p >= packs) continue;
      float wv[V];
      load_f32<V>(w + p * V, wv);
      P o, pp;
      if (plus) pp = reinterpret_cast<const P*>(plus + row * d)[p];
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float g = r * gv[j][e] * wv[e] - xv[j][e] * c;
        // With `plus`: the gradient rounded to T as it would be stored, then the addend (the
        // residual branch's gradient), as rms_norm_backward followed by add_inplace.
        store(o.v, e, plus ? rounded_to<T>(g) + load(pp.v, e) : g);
        dw_part[j][e] += gv[j][e] * xv[j][e] * r;
      }
      reinterpret_cast<P*>(dx + row * d)[p] = o;
    }
  }
  if (per_block == 1) {
#pragma unroll
    for (int j = 0; j < NP; ++j) {
      const int64_t p = lane + static_cast<int64_t>(j) * lanes;
      if (p >= packs) continue;
#pragma unroll
      for (int e = 0; e < V; ++e) atomicAdd(dw + p * V + e, dw_part[j][e]);
    }
    return;
  }
  __syncthreads();  // scratch held group_sum's partials
#pragma unroll
  for (int j = 0; j < NP; ++j) {
    const int64_t p = lane + static_cast<int64_t>(j) * lanes;
    if (p >= packs) continue;
#pragma unroll
    for (int e = 0; e < V; ++e) scratch[group * d + p * V + e] = dw_part[j][e];
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    float s = 0.f;
    for (int g = 0; g < per_block; ++g) s += scratch[g * d + i];
    atomicAdd(dw + i, s);
  }
}

// Launch shape of the row-group kernels: the fewest lanes per row (a power of two) that leave each
// lane at most `max_packs` packs, and blocks of at least 256 threads.
struct RowGroups {
  int lanes, threads, packs_per_lane;
  int64_t rows_per_block;
};

RowGroups row_groups(int64_t packs, int max_packs) {
  RowGroups g{};
  g.lanes = 1;
  while (g.lanes < 1024 && static_cast<int64_t>(g.lanes) * max_packs < packs) g.lanes <<= 1;
  g.packs_per_lane = static_cast<int>((packs + g.lanes - 1) / g.lanes);
  g.threads = std::max(g.lanes, 256);
  g.rows_per_block = g.threads / g.lanes;
  return g;
}

// Calls fn with the compile-time packs per lane (1, 2, 4 or 8, at most Max) that covers `need`.
template <int Max, typename Fn>
void with_packs_per_lane(int need, Fn&& fn) {
  if (need <= 1) fn(std::integral_constant<int, 1>{});
  else if (need <= 2) fn(std::integral_constant<int, 2>{});
  else if (need <= 4 || Max < 8) fn(std::integral_constant<int, 4>{});
  else if constexpr (Max >= 8) fn(std::integral_constant<int, 8>{});
}

// Per lane at most 8 packs forward (only x is held) and 4 backward (x, dy and dw's share).
constexpr int kForwardPacks = 8, kBackwardPacks = 4;  // the most; the backward picks fewer per shape

template <typename Fn>
void with_weight(const Tensor& w, Fn&& fn) {
  MF_CHECK(w.dtype() == DType::F32 || w.dtype() == DType::BF16, "rms_norm: weight must be F32 or BF16");
  if (w.dtype() == DType::F32) fn(w.data<float>());
  else fn(w.data<__nv_bfloat16>());
}

// y = rms_norm(x), or with `residual`: *sum = residual + x (a new tensor; residual is left as it
// is), y = rms_norm(*sum).
Tensor norm_impl(const Tensor& x, const Tensor* residual, Tensor* sum, const Tensor& w, float eps, Tensor* rstd_out) {
  require_float(x, "rms_norm");
  const int64_t d = x.shape().back(), rows = x.numel() / d;
  MF_CHECK(w.numel() == d, "rms_norm: weight has ", w.numel(), " elements for rows of ", d);
  if (residual) {
    MF_CHECK(residual->shape() == x.shape() && residual->dtype() == x.dtype(), "add_rms_norm: residual must match x");
    *sum = empty(x.shape(), x.dtype(), "add_rms_norm sum");
  }
  Tensor y = empty(x.shape(), x.dtype(), "rms_norm output");
  Tensor rstd = empty({rows}, DType::F32, "rms_norm rstd");
  if (rows == 0) return y;
  dispatch_float(x.dtype(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* rp = residual ? residual->data<T>() : nullptr;
    T* sp = residual ? sum->data<T>() : nullptr;
    with_weight(w, [&](auto* wp) {
      const int64_t packs = d / (16 / sizeof(T));
      if (packs_fit<T>(d, {x.raw(), w.raw(), y.raw(), rp, sp}) && packs <= 1024 * kForwardPacks) {
        const RowGroups g = row_groups(packs, kForwardPacks);
        const auto blocks = static_cast<unsigned>((rows + g.rows_per_block - 1) / g.rows_per_block);
        with_packs_per_lane<kForwardPacks>(g.packs_per_lane, [&](auto np) {
          rms_norm_rows_kernel<T, std::remove_const_t<std::remove_pointer_t<decltype(wp)>>, decltype(np)::value>
              <<<blocks, g.threads, g.threads / 32 * sizeof(float), current_stream()>>>(
                  x.data<T>(), rp, sp, wp, y.data<T>(), rstd.data<float>(), rows, d, g.lanes, eps);
        });
        return;
      }
      // The element kernel: a block per row.
      rms_norm_kernel<<<rows, std::min(threads_for(d), 1024), 0, current_stream()>>>(
          x.data<T>(), rp, sp, wp, y.data<T>(), rstd.data<float>(), d, eps, residual != nullptr);
    });
  });
  MF_CUDA_CHECK_LAUNCH("rms_norm");
  if (rstd_out) *rstd_out = rstd;
  return y;
}

// MOEFORGE_NORM_ROPE=0 keeps the two kernels (for A/B runs of the fusion).
bool norm_rope_fusion_on() {
  static const bool on = [] {
    const char* v = std::getenv("MOEFORGE_NORM_ROPE");
    return !(v && std::string(v) == "0");
  }();
  return on;
}

// The fused launches' shapes: rows of d elements whose packs the norm's row groups cover exactly,
// with cos and sin [tokens, d] (a rotation over the whole head) in 16-byte packs.
bool rope_fits(const Tensor& x, const Tensor& w, const Tensor& cos, const Tensor& sin, std::initializer_list<const void*> rows) {
  const int64_t d = x.shape().back();
  if (cos.shape().back() != d) return false;
  if (!packs_fit<float>(d, {cos.raw(), sin.raw()})) return false;
  bool fit = false;
  dispatch_float(x.dtype(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    fit = packs_fit<T>(d, rows) && packs_fit<T>(d, {w.raw()});
  });
  return fit;
}

}  // namespace

Tensor rms_norm_rope(const Tensor& x, const Tensor& weight, float eps, const Tensor& cos, const Tensor& sin, Tensor* rstd_out) {
  require_float(x, "rms_norm_rope");
  MF_CHECK(x.dim() == 3, "rms_norm_rope: expected [T, H, D], got ", shape_str(x.shape()));
  const int64_t t = x.shape()[0], heads = x.shape()[1], d = x.shape()[2], rows = t * heads;
  MF_CHECK(weight.numel() == d, "rms_norm_rope: weight has ", weight.numel(), " elements for heads of ", d);
  MF_CHECK(cos.dtype() == DType::F32 && sin.dtype() == DType::F32 && cos.shape()[0] == t && sin.shape() == cos.shape(),
           "rms_norm_rope: cos/sin ", shape_str(cos.shape()), " do not fit x ", shape_str(x.shape()));
  // Whether the fused kernel takes this shape is settled before anything is allocated (fresh
  // allocations are 512-byte aligned, so only the inputs' alignment is in question): rows whose
  // packs the row groups cover exactly, an even number of packs a lane (a lane holds both halves).
  bool fused = rows > 0 && norm_rope_fusion_on() && rope_fits(x, weight, cos, sin, {x.raw()});
  RowGroups g{};
  if (fused) {
    const int64_t packs = d / (16 / static_cast<int64_t>(dtype_size(x.dtype())));
    g = row_groups(packs, kForwardPacks);
    const int np = g.packs_per_lane;  // 2, 4 or 8: what with_packs_per_lane instantiates exactly
    fused = packs <= 1024 * kForwardPacks && (np == 2 || np == 4 || np == 8) &&
            static_cast<int64_t>(np) * g.lanes == packs;
  }
  if (fused) {
    Tensor y = empty(x.shape(), x.dtype(), "rms_norm_rope output");
    Tensor rstd = empty({rows}, DType::F32, "rms_norm rstd");
    dispatch_float(x.dtype(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      with_packs_per_lane<kForwardPacks>(g.packs_per_lane, [&](auto np) {
        constexpr int NP = decltype(np)::value;
        if constexpr (NP % 2 == 0) {
          with_weight(weight, [&](auto* wp) {
            const auto blocks = static_cast<unsigned>((rows + g.rows_per_block - 1) / g.rows_per_block);
            rms_norm_rows_kernel<T, std::remove_const_t<std::remove_pointer_t<decltype(wp)>>, NP, true>
                <<<blocks, g.threads, g.threads / 32 * sizeof(float), current_stream()>>>(
                    x.data<T>(), nullptr, nullptr, wp, y.data<T>(), rstd.data<float>(), rows, d, g.lanes, eps,
                    RopeTable{cos.data<float>(), sin.data<float>(), heads});
          });
        }
      });
    });
    MF_CUDA_CHECK_LAUNCH("rms_norm_rope");
    if (rstd_out) *rstd_out = rstd;
    return y;
  }
  // Other shapes (partial rotation, rows the row groups do not cover exactly): the two kernels.
  Tensor y = rms_norm(x.view({rows, d}), weight, eps, rstd_out).view(x.shape());
  rope_inplace(y, cos, sin);
  return y;
}

Tensor rms_norm_rope_backward(const Tensor& x, const Tensor& weight, const Tensor& rstd, Tensor& dy, const Tensor& cos,
                              const Tensor& sin, Tensor& dw) {
  require_float(x, "rms_norm_rope_backward");
  MF_CHECK(x.dim() == 3 && dy.shape() == x.shape() && dy.dtype() == x.dtype(),
           "rms_norm_rope_backward: dy ", shape_str(dy.shape()), " must match x ", shape_str(x.shape()));
  const int64_t t = x.shape()[0], heads = x.shape()[1], d = x.shape()[2], rows = t * heads;
  MF_CHECK(dw.dtype() == DType::F32 && dw.numel() == d && weight.numel() == d, "rms_norm_rope_backward: dw must be F32 [", d, "]");
  MF_CHECK(cos.dtype() == DType::F32 && sin.dtype() == DType::F32 && cos.shape()[0] == t && sin.shape() == cos.shape(),
           "rms_norm_rope_backward: cos/sin ", shape_str(cos.shape()), " do not fit x ", shape_str(x.shape()));
  MF_CHECK(rstd.dtype() == DType::F32 && rstd.numel() == rows, "rms_norm_rope_backward: rstd must be F32 [", rows, "]");
  // One pack a lane, a row within a warp, its halves in lanes l and l ^ packs/2; settled before dx
  // is allocated (fresh allocations are 512-byte aligned).
  const int64_t packs = d / (16 / static_cast<int64_t>(dtype_size(x.dtype())));
  const bool fused = rows > 0 && norm_rope_fusion_on() && packs >= 2 && packs <= 32 && (packs & (packs - 1)) == 0 &&
                     rope_fits(x, weight, cos, sin, {x.raw(), dy.raw()});
  if (fused) {
    Tensor dx = empty(x.shape(), x.dtype(), "rms_norm_rope input gradient");
    dispatch_float(x.dtype(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      const RowGroups g = row_groups(packs, 1);
      const int64_t smem_floats = std::max<int64_t>(g.threads / 32, g.rows_per_block * d);
      const size_t smem = sizeof(float) * static_cast<size_t>(smem_floats);
      with_weight(weight, [&](auto* wp) {
        const auto kernel = rms_norm_backward_rows_kernel<T, std::remove_const_t<std::remove_pointer_t<decltype(wp)>>, 1, true>;
        const auto grid = static_cast<unsigned>(std::min<int64_t>(
            (rows + g.rows_per_block - 1) / g.rows_per_block, resident_grid(reinterpret_cast<const void*>(kernel), g.threads, smem)));
        kernel<<<grid, g.threads, smem, current_stream()>>>(
                x.data<T>(), wp, rstd.data<float>(), dy.data<T>(), nullptr, dx.data<T>(), dw.data<float>(), rows, d,
                g.lanes, RopeTable{cos.data<float>(), sin.data<float>(), heads});
      });
    });
    MF_CUDA_CHECK_LAUNCH("rms_norm_rope_backward");
    return dx;
  }
  rope_inplace(dy, cos, sin, /*inverse=*/true);
  return rms_norm_backward(x.view({rows, d}), weight, rstd, dy.view({rows, d}), dw).view(x.shape());
}

Tensor rms_norm(const Tensor& x, const Tensor& weight, float eps, Tensor* rstd) {
  return norm_impl(x, nullptr, nullptr, weight, eps, rstd);
}

Tensor add_rms_norm(const Tensor& x, const Tensor& residual, const Tensor& weight, float eps, Tensor& sum, Tensor* rstd) {
  return norm_impl(x, &residual, &sum, weight, eps, rstd);
}

Tensor rms_norm_backward(const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& dy, Tensor& dw,
                         const Tensor* plus) {
  require_float(x, "rms_norm_backward");
  MF_CHECK(dy.shape() == x.shape() && dy.dtype() == x.dtype(), "rms_norm_backward: dy must match x");
  MF_CHECK(dw.dtype() == DType::F32 && dw.numel() == x.shape().back(), "rms_norm_backward: dw must be F32 [d]");
  if (plus)
    MF_CHECK(plus->shape() == x.shape() && plus->dtype() == x.dtype(), "rms_norm_backward: the addend ",
             shape_str(plus->shape()), " must match x ", shape_str(x.shape()));
  const int64_t d = x.shape().back(), rows = x.numel() / d;
  Tensor dx = empty(x.shape(), x.dtype(), "rms_norm input gradient");
  if (rows == 0) return dx;
  bool fused_plus = false;  // whether the kernel added `plus` (the element kernel does not)
  dispatch_float(x.dtype(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    with_weight(weight, [&](auto* wp) {
      const int64_t packs = d / (16 / sizeof(T));
      // Registers bound this kernel (a lane holds x, dy and dw's share of each of its packs: at 4
      // packs a lane, 156 registers left one 256-thread block per SM, 12.5% occupancy): one pack a
      // lane while a row fits in a warp, else two (measured against 1, 2 and 4 on q30's shapes,
      // docs/perf-notes.md), four only for rows too long for 1024 lanes of two.
      const int max_packs = packs <= 32 ? 1 : packs <= 2048 ? 2 : kBackwardPacks;
      if (packs_fit<T>(d, {x.raw(), dy.raw(), dx.raw(), weight.raw(), plus ? plus->raw() : nullptr}) &&
          packs <= 1024 * max_packs) {
        const RowGroups g = row_groups(packs, max_packs);
        // One row per block adds its share to dw directly; more rows sum theirs in shared memory first.
        const int64_t smem_floats = g.rows_per_block == 1 ? g.threads / 32 : std::max<int64_t>(g.threads / 32, g.rows_per_block * d);
        const size_t smem = sizeof(float) * static_cast<size_t>(smem_floats);
        with_packs_per_lane<kBackwardPacks>(g.packs_per_lane, [&](auto np) {
          const auto kernel =
              rms_norm_backward_rows_kernel<T, std::remove_const_t<std::remove_pointer_t<decltype(wp)>>, decltype(np)::value>;
          // One wave of resident blocks: more would only add atomics on dw and, past what fits, a
          // partial wave (a grid of 4 blocks an SM where registers let 3 fit ran a fourth wave a
          // quarter full, session 21's kernel table).
          const auto grid = static_cast<unsigned>(std::min<int64_t>(
              (rows + g.rows_per_block - 1) / g.rows_per_block, resident_grid(reinterpret_cast<const void*>(kernel), g.threads, smem)));
          kernel<<<grid, g.threads, smem, current_stream()>>>(x.data<T>(), wp, rstd.data<float>(), dy.data<T>(),
                                                            plus ? plus->data<T>() : nullptr, dx.data<T>(),
                                                            dw.data<float>(), rows, d, g.lanes, RopeTable{});
        });
        fused_plus = plus != nullptr;
        return;
      }
      // The element kernel: each thread holds at most kMaxPerThread of a row's dw shares.
      const int threads = std::min(threads_for(d), 1024);
      MF_CHECK(d <= static_cast<int64_t>(kMaxPerThread) * threads, "rms_norm_backward: rows of ", d, " are too long");
      rms_norm_backward_kernel<<<std::min<int64_t>(rows, 1024), threads, 0, current_stream()>>>(
          x.data<T>(), wp, rstd.data<float>(), dy.data<T>(), dx.data<T>(), dw.data<float>(), rows, d);
    });
  });
  MF_CUDA_CHECK_LAUNCH("rms_norm_backward");
  if (plus && !fused_plus) add_inplace(dx, *plus);
  return dx;
}

}  // namespace moeforge::cuda
