// The softmax router fused with its top-k (the reference for ops/cuda/router_loss.cu's kernel) and
// its backward through the renormalisation and the softmax.
#include "core/error.h"
#include "ops/cpu/cpu_ops.h"

namespace moeforge::ops::cpu {

void router_softmax_topk(const Tensor& logits, int64_t k, bool normalize, Tensor& probs, Tensor& weights,
                         Tensor& indices, const Tensor* forced) {
  MF_CHECK(logits.dim() == 2, "router: logits must be [T, E], got ", shape_str(logits.shape()));
  const int64_t rows = logits.size(0), e = logits.size(1);
  MF_CHECK(k >= 1 && k <= e, "router: top-", k, " of ", e, " experts");
  probs = logits.to(DType::F32);
  softmax_rows_inplace(probs);
  if (forced) {
    MF_CHECK(forced->dtype() == DType::I64 && forced->numel() == rows * k, "router: the forced routing must be I64 [",
             rows, ", ", k, "]");
    indices = forced->clone().view({rows, k});
    weights = Tensor::empty({rows, k}, DType::F32);
    for (int64_t i = 0; i < rows * k; ++i) {
      const int64_t x = indices.i64()[i];
      MF_CHECK(x >= 0 && x < e, "router: forced expert ", x, " outside [0, ", e, ")");
      weights.f32()[i] = probs.f32()[(i / k) * e + x];
    }
  } else {
    topk_rows(probs, k, weights, indices);
  }
  if (!normalize) return;
  for (int64_t r = 0; r < rows; ++r) {
    float s = 0.f;  // summed in slot order in F32, as the kernel's one thread does
    for (int64_t j = 0; j < k; ++j) s += weights.f32()[r * k + j];
    for (int64_t j = 0; j < k; ++j) weights.f32()[r * k + j] /= s;
  }
}

Tensor router_backward(const Tensor& probs, const Tensor& indices, const Tensor& weights, const Tensor& d_weights,
                       bool normalize, const Tensor* dprobs_extra) {
  const int64_t rows = probs.size(0), e = probs.size(1), k = indices.size(1);
  MF_CHECK(d_weights.numel() == rows * k && weights.numel() == rows * k, "router_backward: ", rows, " rows of top-", k,
           " do not fit the weight gradient ", shape_str(d_weights.shape()));
  if (dprobs_extra) MF_CHECK(dprobs_extra->numel() == e, "router_backward: dprobs_extra must be [E]");
  Tensor dprobs = Tensor::zeros({rows, e}, DType::F32);
  const float* p = probs.f32();
  const int64_t* ch = indices.i64();
  const float* w = weights.f32();
  const float* dw = d_weights.f32();
  for (int64_t r = 0; r < rows; ++r) {
    float* dp = dprobs.f32() + r * e;
    if (dprobs_extra)
      for (int64_t x = 0; x < e; ++x) dp[x] = dprobs_extra->f32()[x];
    if (normalize) {
      // w_j = p_j / S with S the sum of the chosen p: dp_j = (dw_j - sum_i dw_i w_i) / S.
      double dot = 0, s = 0;
      for (int64_t j = 0; j < k; ++j) {
        dot += static_cast<double>(dw[r * k + j]) * w[r * k + j];
        s += p[r * e + ch[r * k + j]];
      }
      for (int64_t j = 0; j < k; ++j) dp[ch[r * k + j]] += static_cast<float>((dw[r * k + j] - dot) / s);
    } else {
      for (int64_t j = 0; j < k; ++j) dp[ch[r * k + j]] += dw[r * k + j];
    }
  }
  return softmax_backward(probs, dprobs);
}

}  // namespace moeforge::ops::cpu
