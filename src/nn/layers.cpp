#include "nn/layers.h"

#include <cmath>
#include <vector>

#include "core/error.h"
#include "ops/ops.h"

namespace moeforge::nn {

void RMSNorm::init(ParamStore& ps, const std::string& name, int64_t dim, float eps_) {
  weight = ps.add(name, {dim});
  eps = eps_;
}

Tensor RMSNorm::forward(const ParamStore& ps, const Tensor& x) const { return ops::rms_norm(x, ps.at(weight), eps); }

void Linear::init(ParamStore& ps, const std::string& prefix, int64_t in, int64_t out, bool with_bias) {
  weight = ps.add(prefix + ".weight", {out, in});
  if (with_bias) bias = ps.add(prefix + ".bias", {out});
}

Tensor Linear::forward(const ParamStore& ps, const Tensor& x) const {
  Tensor y = ops::linear(x, ps.at(weight));
  if (bias) {
    const Tensor b = ps.at(*bias).dtype() == DType::F32 ? ps.at(*bias) : ps.at(*bias).to(DType::F32);
    const int64_t n = b.numel(), rows = y.numel() / n;
    float* yp = y.f32();
    const float* bp = b.f32();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < n; ++i) yp[r * n + i] += bp[i];
  }
  return y;
}

void Attention::init(ParamStore& ps, const std::string& prefix, int64_t hidden, int64_t heads_, int64_t kv_heads_,
                     int64_t head_dim_, bool bias, bool qk_norm, float eps, std::optional<int64_t> window_) {
  heads = heads_;
  kv_heads = kv_heads_;
  head_dim = head_dim_;
  window = window_;
  q_proj.init(ps, prefix + ".q_proj", hidden, heads * head_dim, bias);
  k_proj.init(ps, prefix + ".k_proj", hidden, kv_heads * head_dim, bias);
  v_proj.init(ps, prefix + ".v_proj", hidden, kv_heads * head_dim, bias);
  o_proj.init(ps, prefix + ".o_proj", heads * head_dim, hidden, bias);
  if (qk_norm) {
    q_norm.emplace();
    q_norm->init(ps, prefix + ".q_norm.weight", head_dim, eps);
    k_norm.emplace();
    k_norm->init(ps, prefix + ".k_norm.weight", head_dim, eps);
  }
}

Tensor Attention::forward(const ParamStore& ps, const Tensor& x, int64_t batch, int64_t seq, const Tensor& cos,
                          const Tensor& sin, const Tensor* doc_ids) const {
  const int64_t t = batch * seq;
  Tensor q = q_proj.forward(ps, x).view({t, heads, head_dim});
  Tensor k = k_proj.forward(ps, x).view({t, kv_heads, head_dim});
  Tensor v = v_proj.forward(ps, x).view({batch, seq, kv_heads, head_dim});
  if (q_norm) {
    q = q_norm->forward(ps, q);
    k = k_norm->forward(ps, k);
  }
  ops::rope_inplace(q, cos, sin);
  ops::rope_inplace(k, cos, sin);
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  Tensor o = ops::attention(q.view({batch, seq, heads, head_dim}), k.view({batch, seq, kv_heads, head_dim}), v, scale,
                            window, doc_ids);
  return o_proj.forward(ps, o.view({t, heads * head_dim}));
}

void DenseMLP::init(ParamStore& ps, const std::string& prefix, int64_t hidden, int64_t inter) {
  gate_proj.init(ps, prefix + ".gate_proj", hidden, inter, false);
  up_proj.init(ps, prefix + ".up_proj", hidden, inter, false);
  down_proj.init(ps, prefix + ".down_proj", inter, hidden, false);
}

Tensor DenseMLP::forward(const ParamStore& ps, const Tensor& x) const {
  Tensor g = gate_proj.forward(ps, x), u = up_proj.forward(ps, x);
  const int64_t t = g.size(0), inter = g.size(1);
  Tensor gu = Tensor::empty({t, 2 * inter}, DType::F32);
  for (int64_t r = 0; r < t; ++r) {
    std::copy(g.f32() + r * inter, g.f32() + (r + 1) * inter, gu.f32() + r * 2 * inter);
    std::copy(u.f32() + r * inter, u.f32() + (r + 1) * inter, gu.f32() + r * 2 * inter + inter);
  }
  return down_proj.forward(ps, ops::swiglu(gu));
}

void SparseMoE::init(ParamStore& ps, const std::string& prefix, int64_t hidden_, int64_t experts_, int64_t top_k_,
                     int64_t inter_, bool norm_topk) {
  hidden = hidden_;
  experts = experts_;
  top_k = top_k_;
  inter = inter_;
  norm_topk_prob = norm_topk;
  router = ps.add(prefix + ".gate.weight", {experts, hidden});
  gate_up = ps.add(prefix + ".experts.gate_up_proj", {experts, 2 * inter, hidden});
  down = ps.add(prefix + ".experts.down_proj", {experts, hidden, inter});
}

Tensor SparseMoE::forward(const ParamStore& ps, const Tensor& x, Tensor* router_logits) const {
  const int64_t t = x.size(0);
  Tensor logits = ops::linear(x, ps.at(router));
  if (router_logits) *router_logits = logits.clone();
  Tensor probs = logits;  // softmax in place: `logits` is not needed afterwards
  ops::softmax_rows_inplace(probs);
  Tensor weights, chosen;
  ops::topk_rows(probs, top_k, weights, chosen);
  float* w = weights.f32();
  if (norm_topk_prob)
    for (int64_t r = 0; r < t; ++r) {
      float s = 0.f;
      for (int64_t j = 0; j < top_k; ++j) s += w[r * top_k + j];
      for (int64_t j = 0; j < top_k; ++j) w[r * top_k + j] /= s;
    }
  // Group the (token, slot) pairs by expert, run each expert on its rows, scatter-add weighted.
  std::vector<std::vector<int64_t>> rows(static_cast<size_t>(experts));
  const int64_t* c = chosen.i64();
  for (int64_t i = 0; i < t * top_k; ++i) rows[c[i]].push_back(i);
  Tensor out = Tensor::zeros({t, hidden}, DType::F32);
  const Tensor& gu_all = ps.at(gate_up);
  const Tensor& dn_all = ps.at(down);
  for (int64_t e = 0; e < experts; ++e) {
    const auto& r = rows[e];
    if (r.empty()) continue;
    const int64_t n = static_cast<int64_t>(r.size());
    Tensor xs = Tensor::empty({n, hidden}, DType::F32);
    for (int64_t i = 0; i < n; ++i)
      std::copy(x.f32() + (r[i] / top_k) * hidden, x.f32() + (r[i] / top_k + 1) * hidden, xs.f32() + i * hidden);
    Tensor h = ops::linear(xs, gu_all.slice0(e, 1).view({2 * inter, hidden}));
    Tensor y = ops::linear(ops::swiglu(h), dn_all.slice0(e, 1).view({hidden, inter}));
    for (int64_t i = 0; i < n; ++i) {
      const float wi = w[r[i]];
      float* o = out.f32() + (r[i] / top_k) * hidden;
      const float* yi = y.f32() + i * hidden;
      for (int64_t d = 0; d < hidden; ++d) o[d] += wi * yi[d];
    }
  }
  return out;
}

float load_balancing_loss(const std::vector<Tensor>& router_logits, int64_t experts, int64_t top_k) {
  if (router_logits.empty()) return 0.f;
  std::vector<double> routed(static_cast<size_t>(experts), 0.0), prob(static_cast<size_t>(experts), 0.0);
  int64_t rows = 0;
  for (const Tensor& l : router_logits) {
    Tensor p = l.clone();
    ops::softmax_rows_inplace(p);
    Tensor v, idx;
    ops::topk_rows(p, top_k, v, idx);
    const int64_t t = p.size(0);
    for (int64_t r = 0; r < t; ++r) {
      for (int64_t e = 0; e < experts; ++e) prob[e] += p.f32()[r * experts + e];
      for (int64_t j = 0; j < top_k; ++j) routed[idx.i64()[r * top_k + j]] += 1.0;
    }
    rows += t;
  }
  // tokens_per_expert is a mean over rows of a [rows, top_k, E] one-hot, i.e. per slot; summing
  // over slots against the mean probability gives sum_e (routed_e / rows) * (prob_e / rows).
  double loss = 0;
  for (int64_t e = 0; e < experts; ++e) loss += (routed[e] / rows) * (prob[e] / rows);
  return static_cast<float>(loss * experts);
}

}  // namespace moeforge::nn
