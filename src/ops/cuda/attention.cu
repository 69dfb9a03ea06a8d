// Attention forward and backward, flash-style (online softmax, scores never written to memory).
// Each query (or key) row is owned by 4 threads holding D/4 of its dimensions; dot products finish
// with two warp shuffles. Key/value (or query/dout) tiles of 32 rows are staged in shared memory in
// F32. This is the straightforward CUDA-core version: correct for every mask the model uses, and
// the reference the tensor-core (WGMMA) kernels will be tested against. perf-notes.md has its speed.
#include <cmath>

#include "ops/cuda/check.h"
#include "ops/cuda/cudnn/attention_cudnn.h"
#include "ops/cuda/kernel_util.cuh"
#include "ops/cuda/ops_cuda.h"
#include "ops/cuda/runtime.h"

namespace moeforge::cuda {

using namespace detail;

namespace {

constexpr int kLanesPerRow = 4;
constexpr int kRowsPerBlock = 32;
constexpr int kTile = 32;
constexpr int kThreads = kRowsPerBlock * kLanesPerRow;

struct Shape4 {
  int64_t b, s, hq, hkv, d, dv;  // d: q/k head dim; dv: v (and output) head dim (MLA: 192 / 128)
  // Keys (the forward only: a generation step's queries are the last s of sk positions, so query i
  // sits at position i + sk - s); the backward needs sk == s.
  int64_t sk;
};

__device__ __forceinline__ float row_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  return v;
}

__device__ __forceinline__ bool visible(int64_t i, int64_t j, int64_t window, const int64_t* docs) {
  if (j > i) return false;
  if (window > 0 && i - j >= window) return false;
  if (docs && docs[i] != docs[j]) return false;
  return true;
}

// The first key tile any query of the block starting at q0 can see (all of them without a window).
__device__ __forceinline__ int64_t first_key_tile(int64_t q0, int64_t window) {
  return window > 0 ? max((int64_t)0, q0 - window + 1) / kTile * kTile : 0;
}

// Loads rows [r0, r0 + kTile) of a [B,rows,H,D] tensor at (b, h) into smem as F32 (zeros past rows).
template <typename T, int D>
__device__ void load_tile(const T* x, float* smem, int64_t b, int64_t h, int64_t r0, int64_t rows, int64_t heads) {
  for (int idx = threadIdx.x; idx < kTile * D; idx += blockDim.x) {
    const int r = idx / D, c = idx % D;
    const int64_t row = r0 + r;
    smem[idx] = row < rows ? load(x, ((b * rows + row) * heads + h) * D + c) : 0.f;
  }
}

template <typename T, int D, int DV>
__global__ void attention_fwd_kernel(const T* q, const T* k, const T* v, T* out, float* lse, const int64_t* doc_ids,
                                     Shape4 sh, float scale, int64_t window) {
  constexpr int DPT = D / kLanesPerRow, VPT = DV / kLanesPerRow;
  __shared__ float ks[kTile * D], vs[kTile * DV];
  const int64_t b = blockIdx.z, h = blockIdx.y, kh = h / (sh.hq / sh.hkv);
  const int row_in_block = threadIdx.x / kLanesPerRow, lane = threadIdx.x % kLanesPerRow;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock, i = q0 + row_in_block;
  const int64_t offset = sh.sk - sh.s;  // query i's position among the keys (0 but in generation)
  const bool active = i < sh.s;
  const int64_t* docs = doc_ids ? doc_ids + b * sh.s : nullptr;
  float qr[DPT], acc[VPT];
  for (int x = 0; x < DPT; ++x) qr[x] = active ? load(q, ((b * sh.s + i) * sh.hq + h) * D + lane * DPT + x) * scale : 0.f;
  for (int x = 0; x < VPT; ++x) acc[x] = 0.f;
  float m = -INFINITY, l = 0.f;
  const int64_t last_q = min(q0 + (int64_t)kRowsPerBlock, sh.s) - 1 + offset;
  const int64_t first_k = first_key_tile(q0 + offset, window);
  for (int64_t k0 = first_k; k0 <= last_q; k0 += kTile) {
    __syncthreads();
    load_tile<T, D>(k, ks, b, kh, k0, sh.sk, sh.hkv);
    load_tile<T, DV>(v, vs, b, kh, k0, sh.sk, sh.hkv);
    __syncthreads();
    for (int jj = 0; jj < kTile; ++jj) {
      const int64_t j = k0 + jj;
      // Every lane takes part in the shuffles (a full-warp mask), masked rows just drop the result.
      const bool vis = active && j < sh.sk && visible(i + offset, j, window, docs);
      float s = 0.f;
      for (int x = 0; x < DPT; ++x) s += qr[x] * ks[jj * D + lane * DPT + x];
      s = row_sum(s);
      if (!vis) continue;
      const float m_new = fmaxf(m, s), corr = exp_for<T>(m - m_new), p = exp_for<T>(s - m_new);
      l = l * corr + p;
      for (int x = 0; x < VPT; ++x) acc[x] = acc[x] * corr + p * vs[jj * DV + lane * VPT + x];
      m = m_new;
    }
  }
  if (!active) return;
  const float inv = l > 0.f ? 1.f / l : 0.f;
  for (int x = 0; x < VPT; ++x) store(out, ((b * sh.s + i) * sh.hq + h) * DV + lane * VPT + x, acc[x] * inv);
  if (lane == 0 && lse) lse[(b * sh.hq + h) * sh.s + i] = m + logf(l);
}

// delta[b,h,i] = sum_d dout * out (the softmax backward's row term).
template <typename T, int DV>
__global__ void attention_delta_kernel(const T* out, const T* dout, float* delta, Shape4 sh) {
  const int64_t n = sh.b * sh.s * sh.hq;
  for (int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; r < n; r += (int64_t)gridDim.x * blockDim.x) {
    float acc = 0.f;
    for (int x = 0; x < DV; ++x) acc += load(out, r * DV + x) * load(dout, r * DV + x);
    const int64_t h = r % sh.hq, i = (r / sh.hq) % sh.s, b = r / (sh.hq * sh.s);
    delta[(b * sh.hq + h) * sh.s + i] = acc;
  }
}

// dq for a block of query rows: dq_i = scale * sum_j p_ij (dout_i . v_j - delta_i) k_j.
template <typename T, int D, int DV>
__global__ void attention_dq_kernel(const T* q, const T* k, const T* v, const T* dout, const float* lse,
                                    const float* delta, T* dq, const int64_t* doc_ids, Shape4 sh, float scale,
                                    int64_t window) {
  constexpr int DPT = D / kLanesPerRow, VPT = DV / kLanesPerRow;
  __shared__ float ks[kTile * D], vs[kTile * DV];
  const int64_t b = blockIdx.z, h = blockIdx.y, kh = h / (sh.hq / sh.hkv);
  const int row_in_block = threadIdx.x / kLanesPerRow, lane = threadIdx.x % kLanesPerRow;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock, i = q0 + row_in_block;
  const bool active = i < sh.s;
  const int64_t* docs = doc_ids ? doc_ids + b * sh.s : nullptr;
  float qr[DPT], dor[VPT], acc[DPT];
  for (int x = 0; x < DPT; ++x) {
    qr[x] = active ? load(q, ((b * sh.s + i) * sh.hq + h) * D + lane * DPT + x) * scale : 0.f;
    acc[x] = 0.f;
  }
  for (int x = 0; x < VPT; ++x) dor[x] = active ? load(dout, ((b * sh.s + i) * sh.hq + h) * DV + lane * VPT + x) : 0.f;
  const float li = active ? lse[(b * sh.hq + h) * sh.s + i] : 0.f, di = active ? delta[(b * sh.hq + h) * sh.s + i] : 0.f;
  const int64_t last_q = min(q0 + (int64_t)kRowsPerBlock, sh.s) - 1;
  const int64_t first_k = first_key_tile(q0, window);
  for (int64_t k0 = first_k; k0 <= last_q; k0 += kTile) {
    __syncthreads();
    load_tile<T, D>(k, ks, b, kh, k0, sh.s, sh.hkv);
    load_tile<T, DV>(v, vs, b, kh, k0, sh.s, sh.hkv);
    __syncthreads();
    for (int jj = 0; jj < kTile; ++jj) {
      const int64_t j = k0 + jj;
      const bool vis = active && j < sh.s && visible(i, j, window, docs);
      float s = 0.f, dp = 0.f;
      for (int x = 0; x < DPT; ++x) s += qr[x] * ks[jj * D + lane * DPT + x];
      for (int x = 0; x < VPT; ++x) dp += dor[x] * vs[jj * DV + lane * VPT + x];
      s = row_sum(s);
      dp = row_sum(dp);
      if (!vis) continue;
      const float ds = exp_for<T>(s - li) * (dp - di);
      for (int x = 0; x < DPT; ++x) acc[x] += ds * ks[jj * D + lane * DPT + x];
    }
  }
  if (!active) return;
  for (int x = 0; x < DPT; ++x) store(dq, ((b * sh.s + i) * sh.hq + h) * D + lane * DPT + x, acc[x] * scale);
}

// dk, dv for a block of key rows of one kv head, summed over every query head of its group and
// every query that sees the key: dv_j = sum p_ij dout_i; dk_j = scale * sum p_ij (dout_i.v_j - delta_i) q_i.
template <typename T, int D, int DV>
__global__ void attention_dkv_kernel(const T* q, const T* k, const T* v, const T* dout, const float* lse,
                                     const float* delta, T* dk, T* dv, const int64_t* doc_ids, Shape4 sh, float scale,
                                     int64_t window) {
  constexpr int DPT = D / kLanesPerRow, VPT = DV / kLanesPerRow;
  __shared__ float qs[kTile * D], dos[kTile * DV];
  __shared__ float ls[kTile], ds_[kTile];
  const int64_t b = blockIdx.z, kh = blockIdx.y, group = sh.hq / sh.hkv;
  const int row_in_block = threadIdx.x / kLanesPerRow, lane = threadIdx.x % kLanesPerRow;
  const int64_t k0b = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock, j = k0b + row_in_block;
  const bool active = j < sh.s;
  const int64_t* docs = doc_ids ? doc_ids + b * sh.s : nullptr;
  float kr[DPT], vr[VPT], dka[DPT], dva[VPT];
  for (int x = 0; x < DPT; ++x) {
    kr[x] = active ? load(k, ((b * sh.s + j) * sh.hkv + kh) * D + lane * DPT + x) : 0.f;
    dka[x] = 0.f;
  }
  for (int x = 0; x < VPT; ++x) {
    vr[x] = active ? load(v, ((b * sh.s + j) * sh.hkv + kh) * DV + lane * VPT + x) : 0.f;
    dva[x] = 0.f;
  }
  int64_t last_q = sh.s - 1;
  if (window > 0) last_q = min(sh.s - 1, min(k0b + (int64_t)kRowsPerBlock, sh.s) - 1 + window - 1);
  for (int64_t hh = 0; hh < group; ++hh) {
    const int64_t h = kh * group + hh;
    for (int64_t i0 = k0b / kTile * kTile; i0 <= last_q; i0 += kTile) {
      __syncthreads();
      load_tile<T, D>(q, qs, b, h, i0, sh.s, sh.hq);
      load_tile<T, DV>(dout, dos, b, h, i0, sh.s, sh.hq);
      for (int r = threadIdx.x; r < kTile; r += blockDim.x) {
        const int64_t i = i0 + r;
        ls[r] = i < sh.s ? lse[(b * sh.hq + h) * sh.s + i] : 0.f;
        ds_[r] = i < sh.s ? delta[(b * sh.hq + h) * sh.s + i] : 0.f;
      }
      __syncthreads();
      for (int ii = 0; ii < kTile; ++ii) {
        const int64_t i = i0 + ii;
        const bool vis = active && i < sh.s && visible(i, j, window, docs);
        float s = 0.f, dp = 0.f;
        for (int x = 0; x < DPT; ++x) s += qs[ii * D + lane * DPT + x] * kr[x];
        for (int x = 0; x < VPT; ++x) dp += dos[ii * DV + lane * VPT + x] * vr[x];
        s = row_sum(s) * scale;
        dp = row_sum(dp);
        if (!vis) continue;
        const float p = exp_for<T>(s - ls[ii]), dsc = p * (dp - ds_[ii]) * scale;
        for (int x = 0; x < VPT; ++x) dva[x] += p * dos[ii * DV + lane * VPT + x];
        for (int x = 0; x < DPT; ++x) dka[x] += dsc * qs[ii * D + lane * DPT + x];
      }
    }
  }
  if (!active) return;
  for (int x = 0; x < DPT; ++x) store(dk, ((b * sh.s + j) * sh.hkv + kh) * D + lane * DPT + x, dka[x]);
  for (int x = 0; x < VPT; ++x) store(dv, ((b * sh.s + j) * sh.hkv + kh) * DV + lane * VPT + x, dva[x]);
}

// Attention sinks (GPT-OSS), applied to a finished forward without sinks: a row's output is
// rescaled by the keys' share exp(lse) / (exp(lse) + exp(sink)) = sigmoid(lse - sink) and its
// log-sum-exp grows to include the sink, so the standard backward (probabilities from the lse, the
// row term from out) yields the sink-aware gradients.
template <typename T, typename S, int V>
__global__ void attention_sink_fixup_kernel(T* out, const float* lse, float* lse_sink, const S* sinks, Shape4 sh) {
  using P = Pack<T, V>;
  const int64_t per_row = sh.dv / V, rows = sh.b * sh.s * sh.hq;
  for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < rows * per_row; j += (int64_t)gridDim.x * blockDim.x) {
    const int64_t m = j / per_row, p = j - m * per_row;  // m: the (b, i, h) row of out, in its order
    const int64_t h = m % sh.hq, bi = m / sh.hq, b = bi / sh.s, i = bi - b * sh.s;
    const int64_t r = (b * sh.hq + h) * sh.s + i;  // the same row in lse's [B, H, S] order
    const float l = lse[r], sink = load(sinks, h);
    const float share = 1.f / (1.f + exp_for<T>(sink - l));
    if (p == 0) lse_sink[r] = fmaxf(l, sink) + log1pf(exp_for<T>(-fabsf(l - sink)));
    P* o = reinterpret_cast<P*>(out + m * sh.dv) + p;
    P v = *o;
#pragma unroll
    for (int e = 0; e < V; ++e) store(v.v, e, load(v.v, e) * share);
    *o = v;
  }
}

// d(sink_h) = -sum over (b, i) of p_sink * (dout . out), p_sink = exp(sink_h - lse): one block per
// head, its threads over the head's rows in packs (consecutive threads, consecutive 16 bytes of a row).
constexpr int kSinkGradThreads = 1024;

template <typename T, typename S, int V>
__global__ void attention_sink_grad_kernel(const T* out, const T* dout, const float* lse, const S* sinks, float* dsinks,
                                           Shape4 sh) {
  using P = Pack<T, V>;
  const int64_t h = blockIdx.x, per_row = sh.dv / V, rows = sh.b * sh.s;
  const float sink = load(sinks, h);
  float acc = 0.f;
  for (int64_t j = threadIdx.x; j < rows * per_row; j += blockDim.x) {
    const int64_t bi = j / per_row, p = j - bi * per_row, b = bi / sh.s, i = bi - b * sh.s;
    const int64_t off = (bi * sh.hq + h) * sh.dv + p * V;
    const P a = *reinterpret_cast<const P*>(out + off), g = *reinterpret_cast<const P*>(dout + off);
    float d = 0.f;
#pragma unroll
    for (int e = 0; e < V; ++e) d += load(a.v, e) * load(g.v, e);
    acc -= exp_for<T>(sink - lse[(b * sh.hq + h) * sh.s + i]) * d;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) dsinks[h] = acc;
}

// `more_keys`: k and v may have more positions than q (a generation step's queries are the last ones).
Shape4 check_shapes(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor* doc_ids, bool more_keys = false) {
  MF_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention: expected [B,S,H,D] tensors");
  Shape4 sh{q.shape()[0], q.shape()[1], q.shape()[2], k.shape()[2], q.shape()[3], v.shape()[3], k.shape()[1]};
  MF_CHECK(k.shape()[0] == sh.b && (sh.sk == sh.s || (more_keys && sh.sk > sh.s)) && k.shape()[3] == sh.d &&
               v.shape()[0] == sh.b && v.shape()[1] == sh.sk && v.shape()[2] == sh.hkv && sh.hkv > 0 &&
               sh.hq % sh.hkv == 0 &&
               k.dtype() == q.dtype() && v.dtype() == q.dtype(),
           "attention: q ", shape_str(q.shape()), ", k ", shape_str(k.shape()), " and v ", shape_str(v.shape()),
           " do not agree");
  if (doc_ids) MF_CHECK(doc_ids->dtype() == DType::I64 && doc_ids->shape() == Shape({sh.b, sh.s}) && sh.sk == sh.s,
                        "attention: doc_ids must be I64 [B, S] (and keys as many as queries)");
  require_float(q, "attention");
  return sh;
}

// The (q/k, v) head dims the kernels are built for: equal ones, MLA's (192, 128), and the MLA test
// fixtures' (24, 12) and (12, 8).
template <typename F>
void dispatch_head_dims(int64_t d, int64_t dv, F&& f) {
  auto pair = [&](auto a, auto b) { f(std::integral_constant<int, decltype(a)::value>{}, std::integral_constant<int, decltype(b)::value>{}); };
  using I64 = std::integral_constant<int, 64>;
  using I128 = std::integral_constant<int, 128>;
  if (d == dv) {
    switch (d) {
      case 64: pair(I64{}, I64{}); return;
      case 128: pair(I128{}, I128{}); return;
      case 32: pair(std::integral_constant<int, 32>{}, std::integral_constant<int, 32>{}); return;
      case 16: pair(std::integral_constant<int, 16>{}, std::integral_constant<int, 16>{}); return;  // tiny test models
      case 8: pair(std::integral_constant<int, 8>{}, std::integral_constant<int, 8>{}); return;
      case 96: pair(std::integral_constant<int, 96>{}, std::integral_constant<int, 96>{}); return;
      default: break;
    }
  } else if (d == 192 && dv == 128) {  // 40 KB of F32 tiles: within the 48 KB of static shared memory
    pair(std::integral_constant<int, 192>{}, I128{});
    return;
  } else if (d == 24 && dv == 12) {
    pair(std::integral_constant<int, 24>{}, std::integral_constant<int, 12>{});
    return;
  } else if (d == 12 && dv == 8) {
    pair(std::integral_constant<int, 12>{}, std::integral_constant<int, 8>{});
    return;
  }
  // Equal 192/256 need more than the 48 KB of static shared memory these tiles use; they come with
  // the tensor-core kernels.
  MF_THROW("attention: head_dim ", d, (d == dv ? std::string() : " (v " + std::to_string(dv) + ")"),
           " is not supported on the GPU yet (8, 16, 32, 64, 96, 128; MLA 192 with v 128)");
}

}  // namespace

namespace {

bool use_cudnn(const Shape4& sh, const Tensor& q, int64_t window, const Tensor* doc_ids) {
  return sh.d == sh.dv && cudnn_attention::usable(q, window, doc_ids);  // cuDNN graphs here take one head dim
}

void check_sinks(const Tensor* sinks, const Shape4& sh) {
  if (!sinks) return;
  require_float(*sinks, "attention sinks");
  MF_CHECK(sinks->numel() == sh.hq, "attention: sinks must have one value per query head (", sh.hq, "), got ",
           sinks->numel());
}

}  // namespace

Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, float scale, int64_t window, const Tensor* doc_ids,
                 Tensor* lse_out, const Tensor* sinks) {
  const Shape4 sh = check_shapes(q, k, v, doc_ids, /*more_keys=*/true);
  check_sinks(sinks, sh);
  Tensor out = empty({sh.b, sh.s, sh.hq, sh.dv}, q.dtype(), "attention output");
  Tensor lse = empty({sh.b, sh.hq, sh.s}, DType::F32, "attention log-sum-exp");
  if (sh.b * sh.s * sh.hq == 0) return out;
  if (sh.sk == sh.s && use_cudnn(sh, q, window, doc_ids)) {  // generation steps (fewer queries) run natively
    cudnn_attention::forward(q, k, v, scale, window, out, lse);
  } else {
    const dim3 grid(static_cast<unsigned>((sh.s + kRowsPerBlock - 1) / kRowsPerBlock), static_cast<unsigned>(sh.hq),
                    static_cast<unsigned>(sh.b));
    dispatch_float(q.dtype(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      dispatch_head_dims(sh.d, sh.dv, [&](auto dc, auto dvc) {
        constexpr int D = decltype(dc)::value, DV = decltype(dvc)::value;
        attention_fwd_kernel<T, D, DV><<<grid, kThreads, 0, current_stream()>>>(
            q.data<T>(), k.data<T>(), v.data<T>(), out.data<T>(), lse.data<float>(),
            doc_ids ? doc_ids->data<int64_t>() : nullptr, sh, scale, window);
      });
    });
    MF_CUDA_CHECK_LAUNCH("attention forward");
  }
  if (sinks) {
    // The sink-aware log-sum-exp goes to its own buffer: the fixup's threads of one row all read
    // the row's attention-only value.
    Tensor lse_sink = empty({sh.b, sh.hq, sh.s}, DType::F32, "attention log-sum-exp with sinks");
    dispatch_float(q.dtype(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      dispatch_float(sinks->dtype(), [&](auto* stag) {
        using S = std::remove_pointer_t<decltype(stag)>;
        // A thread per 16 bytes of the output where rows allow (else per element), in its order.
        constexpr int V = 16 / sizeof(T);
        const bool packed = packs_fit<T>(sh.dv, {out.raw()});
        const int64_t work = sh.b * sh.hq * sh.s * (packed ? sh.dv / V : sh.dv);
        (packed ? attention_sink_fixup_kernel<T, S, V> : attention_sink_fixup_kernel<T, S, 1>)
            <<<grid_stride_blocks(work), kGridStrideThreads, 0, current_stream()>>>(out.data<T>(), lse.data<float>(),
                                                                                  lse_sink.data<float>(), sinks->data<S>(), sh);
      });
    });
    MF_CUDA_CHECK_LAUNCH("attention sinks");
    lse = lse_sink;
  }
  if (lse_out) *lse_out = lse;
  return out;
}

const char* attention_backend(const Tensor& q, int64_t window, const Tensor* doc_ids) {
  return cudnn_attention::usable(q, window, doc_ids) ? "cudnn" : "native";
}

void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                        const Tensor& dout, float scale, int64_t window, const Tensor* doc_ids, Tensor& dq, Tensor& dk,
                        Tensor& dv, const Tensor* sinks, Tensor* dsinks) {
  const Shape4 sh = check_shapes(q, k, v, doc_ids);
  check_sinks(sinks, sh);
  const Shape out_shape{sh.b, sh.s, sh.hq, sh.dv};
  MF_CHECK(out.shape() == out_shape && dout.shape() == out_shape && dout.dtype() == q.dtype(),
           "attention_backward: out/dout must be ", shape_str(out_shape));
  dq = empty(q.shape(), q.dtype(), "attention dq");
  dk = empty(k.shape(), k.dtype(), "attention dk");
  dv = empty(v.shape(), v.dtype(), "attention dv");
  if (sinks && dsinks) *dsinks = empty({sh.hq}, DType::F32, "attention sink gradient");
  if (sh.b * sh.s * sh.hq == 0) return;
  if (sinks && dsinks) {
    dispatch_float(q.dtype(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      dispatch_float(sinks->dtype(), [&](auto* stag) {
        using S = std::remove_pointer_t<decltype(stag)>;
        constexpr int V = 16 / sizeof(T);
        (packs_fit<T>(sh.dv, {out.raw(), dout.raw()}) ? attention_sink_grad_kernel<T, S, V> : attention_sink_grad_kernel<T, S, 1>)
            <<<static_cast<unsigned>(sh.hq), kSinkGradThreads, 0, current_stream()>>>(
                out.data<T>(), dout.data<T>(), lse.data<float>(), sinks->data<S>(), dsinks->data<float>(), sh);
      });
    });
    MF_CUDA_CHECK_LAUNCH("attention sink gradient");
  }
  // With sinks, `out` and `lse` are the sink-aware ones forward returned: the backward below needs
  // nothing else.
  if (use_cudnn(sh, q, window, doc_ids)) {
    cudnn_attention::backward(q, k, v, out, lse, dout, scale, window, dq, dk, dv);
    return;
  }
  Tensor delta = empty({sh.b, sh.hq, sh.s}, DType::F32, "attention backward row terms");
  const int64_t rows = sh.b * sh.s * sh.hq;
  const dim3 qgrid(static_cast<unsigned>((sh.s + kRowsPerBlock - 1) / kRowsPerBlock), static_cast<unsigned>(sh.hq),
                   static_cast<unsigned>(sh.b));
  const dim3 kgrid(static_cast<unsigned>((sh.s + kRowsPerBlock - 1) / kRowsPerBlock), static_cast<unsigned>(sh.hkv),
                   static_cast<unsigned>(sh.b));
  const int64_t* docs = doc_ids ? doc_ids->data<int64_t>() : nullptr;
  dispatch_float(q.dtype(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dispatch_head_dims(sh.d, sh.dv, [&](auto dc, auto dvc) {
      constexpr int D = decltype(dc)::value, DV = decltype(dvc)::value;
      attention_delta_kernel<T, DV><<<grid_stride_blocks(rows), kGridStrideThreads, 0, current_stream()>>>(
          out.data<T>(), dout.data<T>(), delta.data<float>(), sh);
      attention_dq_kernel<T, D, DV><<<qgrid, kThreads, 0, current_stream()>>>(
          q.data<T>(), k.data<T>(), v.data<T>(), dout.data<T>(), lse.data<float>(), delta.data<float>(), dq.data<T>(), docs,
          sh, scale, window);
      attention_dkv_kernel<T, D, DV><<<kgrid, kThreads, 0, current_stream()>>>(
          q.data<T>(), k.data<T>(), v.data<T>(), dout.data<T>(), lse.data<float>(), delta.data<float>(), dk.data<T>(),
          dv.data<T>(), docs, sh, scale, window);
    });
  });
  MF_CUDA_CHECK_LAUNCH("attention backward");
}

}  // namespace moeforge::cuda
