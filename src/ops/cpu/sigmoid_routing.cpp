// DeepSeek-V3's router (Transformers' DeepseekV3TopkRouter): sigmoid scores; the choice adds the
// correction bias, keeps the topk_group best of n_group groups (a group's score is the sum of its
// two best) and takes the top k of what is left; the weights are the chosen scores, renormalised
// (+1e-20) when asked, times the routed scaling factor. The discrete choice gets no gradient.
#include <cmath>
#include <vector>

#include "core/error.h"
#include "ops/cpu/cpu_ops.h"

namespace moeforge::ops::cpu {

void grouped_sigmoid_route(const Tensor& logits, const Tensor& bias, int64_t n_group, int64_t topk_group, int64_t k,
                           bool normalize, float scaling, Tensor& scores, Tensor& weights, Tensor& indices,
                           const Tensor* forced) {
  const int64_t t = logits.size(0), e = logits.size(1), per_group = e / n_group;
  MF_CHECK(n_group > 0 && e % n_group == 0 && topk_group >= 1 && topk_group <= n_group && k >= 1 && k <= e &&
               bias.numel() == e,
           "grouped_sigmoid_route: ", e, " experts in ", n_group, " groups keeping ", topk_group, ", top-", k);
  scores = Tensor::empty({t, e}, DType::F32);
  const Tensor l = logits.dtype() == DType::F32 ? logits : logits.to(DType::F32);
  const Tensor b = bias.dtype() == DType::F32 ? bias : bias.to(DType::F32);
  for (int64_t i = 0; i < t * e; ++i) scores.f32()[i] = 1.f / (1.f + std::exp(-l.f32()[i]));
  if (forced) {
    MF_CHECK(forced->dtype() == DType::I64 && forced->shape() == Shape({t, k}), "forced routing must be I64 [", t, ", ",
             k, "], got ", shape_str(forced->shape()));
    indices = forced->clone();
    for (int64_t i = 0; i < t * k; ++i)
      MF_CHECK(indices.i64()[i] >= 0 && indices.i64()[i] < e, "forced routing names expert ", indices.i64()[i], " of ", e);
  } else {
    Tensor choice = Tensor::empty({t, e}, DType::F32);
    for (int64_t i = 0; i < t * e; ++i) choice.f32()[i] = scores.f32()[i] + b.f32()[i % e];
    if (n_group > 1) {
      Tensor group_scores = Tensor::empty({t, n_group}, DType::F32);
      for (int64_t r = 0; r < t; ++r)
        for (int64_t g = 0; g < n_group; ++g) {
          const float* v = choice.f32() + r * e + g * per_group;
          float a = -INFINITY, c = -INFINITY;  // the two best
          for (int64_t i = 0; i < per_group; ++i) {
            if (v[i] > a) {
              c = a;
              a = v[i];
            } else if (v[i] > c) {
              c = v[i];
            }
          }
          group_scores.f32()[r * n_group + g] = a + c;
        }
      Tensor kept_scores, kept;
      topk_rows(group_scores, topk_group, kept_scores, kept);
      for (int64_t r = 0; r < t; ++r) {
        std::vector<bool> keep(static_cast<size_t>(n_group), false);
        for (int64_t j = 0; j < topk_group; ++j) keep[kept.i64()[r * topk_group + j]] = true;
        for (int64_t i = 0; i < e; ++i)
          if (!keep[i / per_group]) choice.f32()[r * e + i] = -INFINITY;
      }
    }
    Tensor values;
    topk_rows(choice, k, values, indices);
  }
  weights = Tensor::empty({t, k}, DType::F32);
  for (int64_t r = 0; r < t; ++r) {
    float s = 0.f;
    for (int64_t j = 0; j < k; ++j) s += scores.f32()[r * e + indices.i64()[r * k + j]];
    const float mul = scaling / (normalize ? s + 1e-20f : 1.f);
    for (int64_t j = 0; j < k; ++j) weights.f32()[r * k + j] = scores.f32()[r * e + indices.i64()[r * k + j]] * mul;
  }
}

Tensor grouped_sigmoid_route_backward(const Tensor& scores, const Tensor& indices, const Tensor& d_weights,
                                      bool normalize, float scaling) {
  const int64_t t = scores.size(0), e = scores.size(1), k = indices.size(1);
  Tensor dlogits = Tensor::zeros({t, e}, DType::F32);
  const int64_t* ch = indices.i64();
  for (int64_t r = 0; r < t; ++r) {
    const float* dw = d_weights.f32() + r * k;
    float s_sum = 0.f;
    for (int64_t j = 0; j < k; ++j) s_sum += scores.f32()[r * e + ch[r * k + j]];
    // w_j = scaling * s_j / D with D = S + 1e-20 (or 1): d s_i = scaling / D * (dw_i - sum_j dw_j s_j / D).
    const float denom = normalize ? s_sum + 1e-20f : 1.f;
    double dot = 0;
    if (normalize)
      for (int64_t j = 0; j < k; ++j) dot += static_cast<double>(dw[j]) * scores.f32()[r * e + ch[r * k + j]] / denom;
    for (int64_t j = 0; j < k; ++j) {
      const float s = scores.f32()[r * e + ch[r * k + j]];
      const float ds = scaling / denom * static_cast<float>(dw[j] - dot);
      dlogits.f32()[r * e + ch[r * k + j]] += ds * s * (1.f - s);  // the sigmoid's derivative
    }
  }
  return dlogits;
}

}  // namespace moeforge::ops::cpu
