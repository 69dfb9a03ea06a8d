// One query row of masked attention probabilities, shared by the CPU attention forward and backward
// so the mask (causal, sliding window, documents) is defined in one place.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>

namespace moeforge::ops::cpu {

// Writes p[0..i] = softmax over the allowed keys j <= i of scale * q_i . k_j (0 where masked).
// `k` points at key 0 of this (batch, kv head); keys are `k_stride` floats apart. `docs` (optional)
// holds the row's document ids. `sink` (GPT-OSS; -inf: none) is one more logit in the softmax that
// belongs to no key: it takes probability `*p_sink` from the keys. Returns false when no key is
// allowed (p is all zero). `lse` (optional) receives the row's log-sum-exp of the scaled logits (the
// sink's included), as the fused kernels keep it for their backward.
inline bool attention_row_probs(const float* qi, const float* k, int64_t k_stride, int64_t d, int64_t i,
                                float scale, std::optional<int64_t> window, const int64_t* docs, float* p,
                                float sink = -std::numeric_limits<float>::infinity(), float* p_sink = nullptr,
                                float* lse = nullptr) {
  const int64_t lo = window ? std::max<int64_t>(0, i - *window + 1) : 0;
  float mx = sink;
  for (int64_t j = 0; j <= i; ++j) {
    if (j < lo || (docs && docs[j] != docs[i])) {
      p[j] = -std::numeric_limits<float>::infinity();
      continue;
    }
    const float* kj = k + j * k_stride;
    float dot = 0.f;
    for (int64_t x = 0; x < d; ++x) dot += qi[x] * kj[x];
    p[j] = dot * scale;
    mx = std::max(mx, p[j]);
  }
  const bool any = !(std::isinf(mx) && mx < 0);
  const float e_sink = any && !(std::isinf(sink) && sink < 0) ? std::exp(sink - mx) : 0.f;
  double sum = e_sink;
  bool keys = false;
  for (int64_t j = 0; j <= i; ++j) {
    p[j] = std::isinf(p[j]) && p[j] < 0 ? 0.f : std::exp(p[j] - mx);
    keys = keys || p[j] > 0.f;
    sum += p[j];
  }
  const float inv = sum > 0 ? static_cast<float>(1.0 / sum) : 0.f;
  for (int64_t j = 0; j <= i; ++j) p[j] *= inv;
  if (p_sink) *p_sink = e_sink * inv;
  if (lse) *lse = any ? mx + static_cast<float>(std::log(sum)) : -std::numeric_limits<float>::infinity();
  return keys;
}

}  // namespace moeforge::ops::cpu
