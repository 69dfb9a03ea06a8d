// The MoE routers: softmax + top-k (a warp per token up to 1,024 experts, else a block; k rounds of
// an arg-max, ties to the lower expert index as torch.topk), DeepSeek-V3's grouped sigmoid routing,
// and their backwards. (The cross-entropy rows are in cross_entropy.cu.)
#include <algorithm>
#include <vector>

#include "ops/cuda/check.h"
#include "ops/cuda/kernel_util.cuh"
#include "ops/cuda/ops_cuda.h"
#include "ops/cuda/runtime.h"

namespace moeforge::cuda {

using namespace detail;

namespace {

__device__ __forceinline__ bool better(float a, int ia, float b, int ib) {
  return a > b || (a == b && ia != -1 && (ib == -1 || ia < ib));
}

__device__ __forceinline__ void warp_argmax(float& v, int& idx) {
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, idx, o);
    if (better(ov, oi, v, idx)) {
      v = ov;
      idx = oi;
    }
  }
}

// Block arg-max of (value, index) with ties to the lower index; -inf/-1 for threads without data.
__device__ void block_argmax(float& v, int& idx) {
  __shared__ float sv[32];
  __shared__ int si[32];
  warp_argmax(v, idx);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) {
    sv[warp] = v;
    si[warp] = idx;
  }
  __syncthreads();
  const int warps = blockDim.x >> 5;
  v = lane < warps ? sv[lane] : -INFINITY;
  idx = lane < warps ? si[lane] : -1;
  warp_argmax(v, idx);
}

// A forced routing's choices for one row (one thread): the given experts (range-checked on the
// host, clamped here) with the router's probabilities as weights; returns their sum.
__device__ float take_forced_choices(const int64_t* forced, const float* p, float* weights, int64_t* indices, int64_t row,
                                     int e, int k) {
  float chosen_sum = 0.f;
  for (int j = 0; j < k; ++j) {
    int64_t idx = forced[row * k + j];
    idx = idx < 0 ? 0 : (idx >= e ? e - 1 : idx);
    weights[row * k + j] = p[idx];
    indices[row * k + j] = idx;
    chosen_sum += p[idx];
  }
  return chosen_sum;
}

// The best of p[first], p[first + stride], ... (ties to the lower index; -inf values still give an
// index), a thread's share of one arg-max round.
__device__ __forceinline__ void best_of_strided(const float* p, int first, int stride, int e, float& v, int& idx) {
  v = -INFINITY;
  idx = -1;
  for (int i = first; i < e; i += stride) {
    const float x = p[i];
    if (x > v || (x == v && idx == -1)) {
      v = x;
      idx = i;
    }
  }
}

template <typename T>
__global__ void router_kernel(const T* logits, const int64_t* forced, float* probs, float* weights, int64_t* indices, int e,
                              int k, bool normalize) {
  extern __shared__ float p[];  // this row's probabilities
  const int64_t row = blockIdx.x;
  float m = -INFINITY;
  for (int i = threadIdx.x; i < e; i += blockDim.x) {
    p[i] = load(logits, row * e + i);
    m = fmaxf(m, p[i]);
  }
  m = block_max(m);
  float s = 0.f;
  for (int i = threadIdx.x; i < e; i += blockDim.x) {
    p[i] = __expf(p[i] - m);
    s += p[i];
  }
  s = block_sum(s);
  for (int i = threadIdx.x; i < e; i += blockDim.x) {
    p[i] /= s;
    probs[row * e + i] = p[i];
  }
  __syncthreads();
  __shared__ float chosen_sum;
  if (threadIdx.x == 0) chosen_sum = 0.f;
  if (forced) {  // the assignment is given (balanced or replayed routing); the weights are still the router's
    __syncthreads();
    if (threadIdx.x == 0) chosen_sum = take_forced_choices(forced, p, weights, indices, row, e, k);
    __syncthreads();
    if (normalize && threadIdx.x < k) weights[row * k + threadIdx.x] /= chosen_sum;
    return;
  }
  for (int j = 0; j < k; ++j) {
    float v;
    int idx;
    best_of_strided(p, threadIdx.x, blockDim.x, e, v, idx);
    block_argmax(v, idx);
    if (threadIdx.x == 0) {
      weights[row * k + j] = v;
      indices[row * k + j] = idx;
      chosen_sum += v;
      p[idx] = -INFINITY;  // taken
    }
    __syncthreads();
  }
  if (normalize && threadIdx.x < k) weights[row * k + threadIdx.x] /= chosen_sum;
}

// The same router with a warp per token (for up to kWarpRouterMaxExperts experts): a block per
// token spent most of its time in the k rounds' block-wide barriers (47 us per q30 layer for 4,096
// tokens of 128 experts; 13.6 us this way). Bit for bit router_kernel's results: the sum of
// exponentials is taken in block_sum's order (each 32-wide chunk by a shuffle tree, then the
// chunks' sums by a second tree with chunk c's sum in lane c), and the arg-max rounds keep ties to
// the lower index.
constexpr int kWarpRouterMaxExperts = 1024;  // rows of probabilities in 32 KB of shared memory per block
constexpr int kWarpRouterWarps = 8;
int64_t g_router_warp_max_experts = kWarpRouterMaxExperts;

__device__ __forceinline__ float warp_sum_tree(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__global__ void router_warp_kernel(const T* logits, const int64_t* forced, float* probs, float* weights,
                                   int64_t* indices, int64_t rows, int e, int k, bool normalize) {
  extern __shared__ float rows_p[];  // each warp's row of probabilities
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t row = blockIdx.x * static_cast<int64_t>(kWarpRouterWarps) + warp;
  if (row >= rows) return;
  float* p = rows_p + static_cast<int64_t>(warp) * e;
  float m = -INFINITY;
  for (int i = lane; i < e; i += 32) {
    p[i] = load(logits, row * e + i);
    m = fmaxf(m, p[i]);
  }
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  float chunk_sum_here = 0.f;
  for (int c = 0; c * 32 < e; ++c) {
    const int i = c * 32 + lane;
    float x = 0.f;
    if (i < e) {
      x = __expf(p[i] - m);
      p[i] = x;
    }
    x = warp_sum_tree(x);
    if (lane == c) chunk_sum_here = x;
  }
  const float s = warp_sum_tree(chunk_sum_here);
  for (int i = lane; i < e; i += 32) {
    p[i] /= s;
    probs[row * e + i] = p[i];
  }
  __syncwarp();
  float chosen_sum = 0.f;  // lane 0's
  if (forced) {  // the assignment is given (balanced or replayed routing); the weights are still the router's
    if (lane == 0) chosen_sum = take_forced_choices(forced, p, weights, indices, row, e, k);
  } else {
    for (int j = 0; j < k; ++j) {
      float v;
      int idx;
      best_of_strided(p, lane, 32, e, v, idx);
      warp_argmax(v, idx);
      if (lane == 0) {
        weights[row * k + j] = v;
        indices[row * k + j] = idx;
        chosen_sum += v;
        p[idx] = -INFINITY;  // taken
      }
      __syncwarp();
    }
  }
  chosen_sum = __shfl_sync(0xffffffffu, chosen_sum, 0);
  __syncwarp();  // lane 0's weights are visible to the lanes that divide them
  if (normalize)
    for (int t = lane; t < k; t += 32) weights[row * k + t] /= chosen_sum;
}

// DeepSeek-V3's router, one block per token (ops::grouped_sigmoid_route): sigmoid scores; the choice
// (scores + bias) keeps the topk_group best groups (thread 0 scores the few groups serially), then k
// block arg-maxes; weights are the chosen scores, renormalised and scaled.
template <typename T, typename B>
__global__ void grouped_sigmoid_kernel(const T* logits, const B* bias, const int64_t* forced, float* scores,
                                       float* weights, int64_t* indices, int e, int k, int n_group, int topk_group,
                                       bool normalize, float scaling) {
  extern __shared__ float smem[];
  float* sc = smem;      // this row's scores
  float* ch = smem + e;  // this row's choice values (-inf once dropped or taken)
  const int64_t row = blockIdx.x;
  for (int i = threadIdx.x; i < e; i += blockDim.x) {
    const float s = 1.f / (1.f + __expf(-load(logits, row * e + i)));
    sc[i] = s;
    scores[row * e + i] = s;
    ch[i] = s + load(bias, i);
  }
  __syncthreads();
  if (forced) {
    if (threadIdx.x < k) {
      int64_t idx = forced[row * k + threadIdx.x];
      idx = idx < 0 ? 0 : (idx >= e ? e - 1 : idx);  // range-checked on the host
      indices[row * k + threadIdx.x] = idx;
      weights[row * k + threadIdx.x] = sc[idx];
    }
  } else {
    if (n_group > 1 && threadIdx.x == 0) {
      const int per = e / n_group;
      float gs[64];
      bool keep[64];
      for (int g = 0; g < n_group; ++g) {
        float a = -INFINITY, b = -INFINITY;
        for (int i = g * per; i < (g + 1) * per; ++i) {
          if (ch[i] > a) {
            b = a;
            a = ch[i];
          } else if (ch[i] > b) {
            b = ch[i];
          }
        }
        gs[g] = a + b;
        keep[g] = false;
      }
      for (int j = 0; j < topk_group; ++j) {  // the best remaining group, ties to the lower index
        int best = -1;
        for (int g = 0; g < n_group; ++g)
          if (!keep[g] && (best < 0 || gs[g] > gs[best])) best = g;
        keep[best] = true;
      }
      for (int i = 0; i < e; ++i)
        if (!keep[i / per]) ch[i] = -INFINITY;
    }
    __syncthreads();
    for (int j = 0; j < k; ++j) {
      float v = -INFINITY;
      int idx = -1;
      for (int i = threadIdx.x; i < e; i += blockDim.x)
        if (ch[i] > v || (ch[i] == v && idx == -1)) {
          v = ch[i];
          idx = i;
        }
      block_argmax(v, idx);
      if (threadIdx.x == 0) {
        indices[row * k + j] = idx;
        weights[row * k + j] = sc[idx];
        ch[idx] = -INFINITY;  // taken
      }
      __syncthreads();
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.f;
    for (int j = 0; j < k; ++j) s += weights[row * k + j];
    const float mul = scaling / (normalize ? s + 1e-20f : 1.f);
    for (int j = 0; j < k; ++j) weights[row * k + j] *= mul;
  }
}

template <typename T>
__global__ void grouped_sigmoid_backward_kernel(const float* scores, const int64_t* indices, const float* dw, T* dlogits,
                                                int e, int k, bool normalize, float scaling) {
  const int64_t row = blockIdx.x;
  for (int i = threadIdx.x; i < e; i += blockDim.x) store(dlogits, row * e + i, 0.f);
  __syncthreads();
  if (threadIdx.x != 0) return;
  float s_sum = 0.f;
  for (int j = 0; j < k; ++j) s_sum += scores[row * e + indices[row * k + j]];
  const float denom = normalize ? s_sum + 1e-20f : 1.f;
  float dot = 0.f;
  if (normalize)
    for (int j = 0; j < k; ++j) dot += dw[row * k + j] * scores[row * e + indices[row * k + j]] / denom;
  for (int j = 0; j < k; ++j) {
    const int64_t idx = indices[row * k + j];
    const float s = scores[row * e + idx];
    const float ds = scaling / denom * (dw[row * k + j] - dot);
    store(dlogits, row * e + idx, load(dlogits, row * e + idx) + ds * s * (1.f - s));
  }
}

}  // namespace

// One block per token: the gradient at the chosen probabilities (through the renormalisation
// w_j = p_j / S: dp_j = (dw_j - sum_i dw_i w_i) / S), plus `extra` [E] when given (the
// load-balancing loss's gradient, the same for every row), then the softmax backward
// dl_e = p_e (dp_e - sum_i p_i dp_i).
template <typename T>
__global__ void router_backward_kernel(const float* probs, const int64_t* indices, const float* weights, const float* dw,
                                       const float* extra, T* dlogits, int e, int k, bool normalize) {
  const int64_t row = blockIdx.x;
  __shared__ float dp_chosen[64];
  if (threadIdx.x == 0) {
    float dot = 0.f, sum = 0.f;
    for (int j = 0; j < k; ++j) {
      dot += dw[row * k + j] * weights[row * k + j];
      sum += probs[row * e + indices[row * k + j]];
    }
    for (int j = 0; j < k; ++j) dp_chosen[j] = normalize ? (dw[row * k + j] - dot) / sum : dw[row * k + j];
  }
  __syncthreads();
  extern __shared__ float dp[];  // this row's dp, E floats
  float pdp = 0.f;
  for (int i = threadIdx.x; i < e; i += blockDim.x) {
    float d = extra ? extra[i] : 0.f;
    for (int j = 0; j < k; ++j)
      if (indices[row * k + j] == i) d += dp_chosen[j];
    dp[i] = d;
    pdp += probs[row * e + i] * d;
  }
  pdp = block_sum(pdp);
  for (int i = threadIdx.x; i < e; i += blockDim.x) store(dlogits, row * e + i, probs[row * e + i] * (dp[i] - pdp));
}

namespace {
// A forced routing (balanced or replayed) is a device I64 [rows, k] tensor.
void check_forced(const Tensor* forced, int64_t rows, int64_t k) {
  if (forced)
    MF_CHECK(forced->dtype() == DType::I64 && forced->numel() == rows * k && !forced->device().is_cpu(),
             "router: forced routing must be a device I64 [", rows, ", ", k, "] tensor");
}
}  // namespace

int64_t set_router_warp_max_experts(int64_t experts) {
  const int64_t before = g_router_warp_max_experts;
  g_router_warp_max_experts = std::min<int64_t>(experts, kWarpRouterMaxExperts);
  return before;
}

void router_softmax_topk(const Tensor& logits, int64_t k, bool normalize, Tensor& probs, Tensor& weights, Tensor& indices,
                         const Tensor* forced) {
  require_float(logits, "router");
  const int64_t e = logits.shape().back(), rows = logits.numel() / e;
  MF_CHECK(k >= 1 && k <= e && k <= 1024 && e <= 16384, "router: top-", k, " of ", e, " experts is not supported");
  probs = empty({rows, e}, DType::F32, "router probabilities");
  weights = empty({rows, k}, DType::F32, "router weights");
  indices = empty({rows, k}, DType::I64, "router expert indices");
  check_forced(forced, rows, k);
  if (rows == 0) return;
  if (e <= g_router_warp_max_experts) {
    const int64_t blocks = (rows + kWarpRouterWarps - 1) / kWarpRouterWarps;
    dispatch_float(logits.dtype(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      router_warp_kernel<<<blocks, 32 * kWarpRouterWarps, kWarpRouterWarps * e * sizeof(float), current_stream()>>>(
          logits.data<T>(), forced ? forced->data<int64_t>() : nullptr, probs.data<float>(), weights.data<float>(),
          indices.data<int64_t>(), rows, static_cast<int>(e), static_cast<int>(k), normalize);
    });
    MF_CUDA_CHECK_LAUNCH("router");
    return;
  }
  const int threads = threads_for(std::max<int64_t>(e, k));
  dispatch_float(logits.dtype(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    router_kernel<<<rows, threads, e * sizeof(float), current_stream()>>>(logits.data<T>(),
                                                                         forced ? forced->data<int64_t>() : nullptr,
                                                                         probs.data<float>(),
                                                                         weights.data<float>(), indices.data<int64_t>(),
                                                                         static_cast<int>(e), static_cast<int>(k), normalize);
  });
  MF_CUDA_CHECK_LAUNCH("router");
}

void grouped_sigmoid_route(const Tensor& logits, const Tensor& bias, int64_t n_group, int64_t topk_group, int64_t k,
                           bool normalize, float scaling, Tensor& scores, Tensor& weights, Tensor& indices,
                           const Tensor* forced) {
  require_float(logits, "grouped_sigmoid_route");
  require_float(bias, "grouped_sigmoid_route");
  const int64_t e = logits.shape().back(), rows = logits.numel() / e;
  MF_CHECK(n_group >= 1 && n_group <= 64 && e % n_group == 0 && topk_group >= 1 && topk_group <= n_group && k >= 1 &&
               k <= 64 && k <= e && e <= 1024 && bias.numel() == e,
           "grouped_sigmoid_route: ", e, " experts in ", n_group, " groups keeping ", topk_group, ", top-", k,
           " is not supported on the GPU");
  scores = empty({rows, e}, DType::F32, "router scores");
  weights = empty({rows, k}, DType::F32, "router weights");
  indices = empty({rows, k}, DType::I64, "router expert indices");
  check_forced(forced, rows, k);
  if (rows == 0) return;
  dispatch_float(logits.dtype(), [&](auto* tl) {
    using T = std::remove_pointer_t<decltype(tl)>;
    dispatch_float(bias.dtype(), [&](auto* tb) {
      using B = std::remove_pointer_t<decltype(tb)>;
      grouped_sigmoid_kernel<<<rows, threads_for(std::max<int64_t>(e, k)), 2 * e * sizeof(float), current_stream()>>>(
          logits.data<T>(), bias.data<B>(), forced ? forced->data<int64_t>() : nullptr, scores.data<float>(),
          weights.data<float>(), indices.data<int64_t>(), static_cast<int>(e), static_cast<int>(k),
          static_cast<int>(n_group), static_cast<int>(topk_group), normalize, scaling);
    });
  });
  MF_CUDA_CHECK_LAUNCH("grouped_sigmoid_route");
}

Tensor grouped_sigmoid_route_backward(const Tensor& scores, const Tensor& indices, const Tensor& d_weights,
                                      bool normalize, float scaling, DType dtype) {
  const int64_t e = scores.shape().back(), rows = scores.numel() / e, k = indices.shape().back();
  MF_CHECK(scores.dtype() == DType::F32 && d_weights.dtype() == DType::F32 && indices.dtype() == DType::I64 &&
               indices.numel() == rows * k && d_weights.numel() == rows * k,
           "grouped_sigmoid_route_backward: expects F32 scores [T,E], I64 indices and F32 d_weights [T,k]");
  Tensor dlogits = empty({rows, e}, dtype, "router logit gradient");
  if (rows == 0) return dlogits;
  dispatch_float(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    grouped_sigmoid_backward_kernel<<<rows, threads_for(e), 0, current_stream()>>>(
        scores.data<float>(), indices.data<int64_t>(), d_weights.data<float>(), dlogits.data<T>(), static_cast<int>(e),
        static_cast<int>(k), normalize, scaling);
  });
  MF_CUDA_CHECK_LAUNCH("grouped_sigmoid_route_backward");
  return dlogits;
}

Tensor router_backward(const Tensor& probs, const Tensor& indices, const Tensor& weights, const Tensor& d_weights,
                       bool normalize, DType dtype, const Tensor* dprobs_extra) {
  const int64_t e = probs.shape().back(), rows = probs.numel() / e, k = indices.shape().back();
  MF_CHECK(probs.dtype() == DType::F32 && weights.dtype() == DType::F32 && d_weights.dtype() == DType::F32 &&
               indices.dtype() == DType::I64 && indices.numel() == rows * k && weights.numel() == rows * k &&
               d_weights.numel() == rows * k && k <= 64,
           "router_backward: expects F32 probs [T,E], I64 indices and F32 weights/d_weights [T,k] (k <= 64)");
  if (dprobs_extra)
    MF_CHECK(dprobs_extra->dtype() == DType::F32 && dprobs_extra->numel() == e, "router_backward: dprobs_extra must be F32 [E]");
  Tensor dlogits = empty({rows, e}, dtype, "router logit gradient");
  if (rows == 0) return dlogits;
  dispatch_float(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    router_backward_kernel<<<rows, threads_for(e), e * sizeof(float), current_stream()>>>(
        probs.data<float>(), indices.data<int64_t>(), weights.data<float>(), d_weights.data<float>(),
        dprobs_extra ? dprobs_extra->data<float>() : nullptr, dlogits.data<T>(), static_cast<int>(e),
                                                                          static_cast<int>(k), normalize);
  });
  MF_CUDA_CHECK_LAUNCH("router_backward");
  return dlogits;
}

}  // namespace moeforge::cuda
