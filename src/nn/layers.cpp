#include "nn/layers.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "ops/ops.h"

namespace moeforge::nn {

namespace {


// Gathers rows `idx[i] / div` of x [T, H] into [n, H].
// [T*k, H]: row i is token i / k's row (each pair carries its token's activations).
Tensor pair_rows(const Tensor& x, int64_t k) {
  const int64_t t = x.size(0), h = x.size(1);
  Tensor out = Tensor::empty({t * k, h}, DType::F32);
  for (int64_t i = 0; i < t * k; ++i) std::memcpy(out.f32() + i * h, x.f32() + (i / k) * h, h * sizeof(float));
  return out;
}

// Without expert parallelism the dispatch runs over a group of one (stateless, shared).
dist::Communicator& one_rank_group() {
  static const std::unique_ptr<dist::Communicator> self = dist::self_communicator("experts");
  return *self;
}

}  // namespace

void RMSNorm::init(ParamStore& ps, const std::string& name, int64_t dim, float eps_) {
  weight = ps.add(name, {dim});
  ps.all()[weight].decay = false;
  eps = eps_;
}

Tensor RMSNorm::forward(const ParamStore& ps, const Tensor& x) const { return ops::rms_norm(x, ps.at(weight), eps); }

Tensor RMSNorm::backward(ParamStore& ps, const Tensor& x, const Tensor& dy) const {
  return ops::rms_norm_backward(x, ps.at(weight), eps, dy, ps.grad(weight));
}

void Linear::init(ParamStore& ps, const std::string& prefix, int64_t in, int64_t out, bool with_bias) {
  weight = ps.add(prefix + ".weight", {out, in});
  if (with_bias) {
    bias = ps.add(prefix + ".bias", {out});
    ps.all()[*bias].decay = false;
  }
}

Tensor Linear::forward(const ParamStore& ps, const Tensor& x) const {
  Tensor y = ops::linear(x, ps.at(weight));
  if (bias) ops::add_bias_rows(y, ps.at(*bias));
  return y;
}

Tensor Linear::backward(ParamStore& ps, const Tensor& x, const Tensor& dy) const {
  ops::linear_weight_grad(dy, x, ps.grad(weight));
  if (bias) ops::bias_grad(dy, ps.grad(*bias));
  return ops::linear_input_grad(dy, ps.at(weight));
}

void Attention::init(ParamStore& ps, const std::string& prefix, int64_t hidden, int64_t heads_, int64_t kv_heads_,
                     int64_t head_dim_, const AttentionOptions& opts) {
  heads = heads_;
  kv_heads = kv_heads_;
  head_dim = head_dim_;
  window = opts.window;
  clip = opts.clip_qkv;
  q_proj.init(ps, prefix + ".q_proj", hidden, heads * head_dim, opts.qkv_bias);
  k_proj.init(ps, prefix + ".k_proj", hidden, kv_heads * head_dim, opts.qkv_bias);
  v_proj.init(ps, prefix + ".v_proj", hidden, kv_heads * head_dim, opts.qkv_bias);
  o_proj.init(ps, prefix + ".o_proj", heads * head_dim, hidden, opts.o_bias);
  if (opts.sinks) sinks = ps.add(prefix + ".sinks", {heads});
  if (opts.qk_norm != hf::ModelConfig::QkNorm::None) {
    full_qk_norm = opts.qk_norm == hf::ModelConfig::QkNorm::Full;
    q_norm.emplace();
    q_norm->init(ps, prefix + ".q_norm.weight", full_qk_norm ? heads * head_dim : head_dim, opts.eps);
    k_norm.emplace();
    k_norm->init(ps, prefix + ".k_norm.weight", full_qk_norm ? kv_heads * head_dim : head_dim, opts.eps);
  }
}

namespace {

Tensor clamp_backward(const Tensor& unclipped, const Tensor& dy, float c) {
  Tensor d = dy.clone();
  ops::clamp_backward_inplace(unclipped, d, c);
  return d;
}

}  // namespace

Tensor Attention::normalise(const ParamStore& ps, const std::optional<RMSNorm>& norm, const Tensor& x, int64_t n,
                            Tensor* unclipped) const {
  const int64_t t = x.size(0);
  Tensor y;
  if (!norm) y = x.clone();  // RoPE rotates in place; the projection's values stay as they were
  else if (full_qk_norm) y = norm->forward(ps, x);
  else y = norm->forward(ps, x.view({t, n, head_dim})).view({t, n * head_dim});
  if (clip) {
    if (unclipped) *unclipped = y.clone();
    ops::clamp_inplace(y, *clip);
  }
  return y;
}

Tensor Attention::normalise_backward(ParamStore& ps, const std::optional<RMSNorm>& norm, const Tensor& pre,
                                     const Tensor& unclipped, const Tensor& dy, int64_t n) const {
  const int64_t t = dy.size(0);
  Tensor d = clip ? clamp_backward(unclipped, dy, *clip) : dy;
  if (!norm) return d;
  if (full_qk_norm) return norm->backward(ps, pre, d);
  return norm->backward(ps, pre.view({t, n, head_dim}), d.view({t, n, head_dim})).view({t, n * head_dim});
}

Tensor Attention::forward(const ParamStore& ps, const Tensor& x, int64_t batch, int64_t seq, const Tensor& cos,
                          const Tensor& sin, const Tensor* doc_ids, Cache* cache) const {
  const int64_t t = batch * seq;
  Tensor q_pre = q_proj.forward(ps, x), k_pre = k_proj.forward(ps, x);
  Tensor v = v_proj.forward(ps, x);
  if (cache) {
    cache->x = x;
    cache->q_pre = q_pre;
    cache->k_pre = k_pre;
  }
  Tensor q = normalise(ps, q_norm, q_pre, heads, cache ? &cache->q_unclipped : nullptr).view({t, heads, head_dim});
  Tensor k = normalise(ps, k_norm, k_pre, kv_heads, cache ? &cache->k_unclipped : nullptr).view({t, kv_heads, head_dim});
  if (clip) {
    if (cache) cache->v_unclipped = v.clone();
    ops::clamp_inplace(v, *clip);
  }
  v = v.view({batch, seq, kv_heads, head_dim});
  ops::rope_inplace(q, cos, sin);
  ops::rope_inplace(k, cos, sin);
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  Tensor q4 = q.view({batch, seq, heads, head_dim}), k4 = k.view({batch, seq, kv_heads, head_dim});
  Tensor o = ops::attention(q4, k4, v, scale, window, doc_ids, sinks ? &ps.at(*sinks) : nullptr);
  if (cache) {
    cache->q = q4;
    cache->k = k4;
    cache->v = v;
    cache->o = o.view({t, heads * head_dim});
  }
  return o_proj.forward(ps, o.view({t, heads * head_dim}));
}

Tensor Attention::backward(ParamStore& ps, const Cache& c, int64_t batch, int64_t seq, const Tensor& cos,
                           const Tensor& sin, const Tensor* doc_ids, const Tensor& dy) const {
  const int64_t t = batch * seq;
  Tensor d_o = o_proj.backward(ps, c.o, dy).view({batch, seq, heads, head_dim});
  Tensor dq, dk, dv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  Tensor dsinks;
  ops::attention_backward(c.q, c.k, c.v, d_o, scale, window, doc_ids, dq, dk, dv, sinks ? &ps.at(*sinks) : nullptr,
                          sinks ? &dsinks : nullptr);
  if (sinks) ops::add_inplace(ps.grad(*sinks), dsinks);
  dq = dq.view({t, heads, head_dim});
  dk = dk.view({t, kv_heads, head_dim});
  ops::rope_inplace(dq, cos, sin, /*inverse=*/true);
  ops::rope_inplace(dk, cos, sin, /*inverse=*/true);
  dq = normalise_backward(ps, q_norm, c.q_pre, c.q_unclipped, dq.view({t, heads * head_dim}), heads);
  dk = normalise_backward(ps, k_norm, c.k_pre, c.k_unclipped, dk.view({t, kv_heads * head_dim}), kv_heads);
  dv = dv.view({t, kv_heads * head_dim});
  if (clip) dv = clamp_backward(c.v_unclipped, dv, *clip);
  Tensor dx = q_proj.backward(ps, c.x, dq);
  ops::add_inplace(dx, k_proj.backward(ps, c.x, dk));
  ops::add_inplace(dx, v_proj.backward(ps, c.x, dv));
  return dx;
}

void DenseMLP::init(ParamStore& ps, const std::string& prefix, int64_t hidden, int64_t inter, bool bias) {
  gate_proj.init(ps, prefix + ".gate_proj", hidden, inter, bias);
  up_proj.init(ps, prefix + ".up_proj", hidden, inter, bias);
  down_proj.init(ps, prefix + ".down_proj", inter, hidden, bias);
}

Tensor DenseMLP::forward(const ParamStore& ps, const Tensor& x, Cache* cache) const {
  Tensor g = gate_proj.forward(ps, x), u = up_proj.forward(ps, x);
  const int64_t t = g.size(0), inter = g.size(1);
  Tensor gu = Tensor::empty({t, 2 * inter}, DType::F32);
  for (int64_t r = 0; r < t; ++r) {
    std::memcpy(gu.f32() + r * 2 * inter, g.f32() + r * inter, inter * sizeof(float));
    std::memcpy(gu.f32() + r * 2 * inter + inter, u.f32() + r * inter, inter * sizeof(float));
  }
  Tensor act = ops::swiglu(gu);
  if (cache) *cache = {x, gu, act};
  return down_proj.forward(ps, act);
}

Tensor DenseMLP::backward(ParamStore& ps, const Cache& c, const Tensor& dy) const {
  Tensor dact = down_proj.backward(ps, c.act, dy);
  Tensor dgu = ops::swiglu_backward(c.gate_up, dact);
  const int64_t t = dgu.size(0), inter = dgu.size(1) / 2;
  Tensor dg = Tensor::empty({t, inter}, DType::F32), du = Tensor::empty({t, inter}, DType::F32);
  for (int64_t r = 0; r < t; ++r) {
    std::memcpy(dg.f32() + r * inter, dgu.f32() + r * 2 * inter, inter * sizeof(float));
    std::memcpy(du.f32() + r * inter, dgu.f32() + r * 2 * inter + inter, inter * sizeof(float));
  }
  Tensor dx = gate_proj.backward(ps, c.x, dg);
  ops::add_inplace(dx, up_proj.backward(ps, c.x, du));
  return dx;
}

void GatedSharedExpert::init(ParamStore& ps, const std::string& prefix, int64_t hidden, int64_t inter) {
  mlp.init(ps, prefix + ".shared_expert", hidden, inter);
  gate.init(ps, prefix + ".shared_expert_gate", hidden, 1, false);
}

Tensor GatedSharedExpert::forward(const ParamStore& ps, const Tensor& x, Cache* cache) const {
  Tensor y = mlp.forward(ps, x, cache ? &cache->mlp : nullptr);
  Tensor logit = gate.forward(ps, x);  // [T, 1]
  Tensor out = Tensor::zeros(y.shape(), DType::F32);
  ops::add_sigmoid_gated(out, y, logit);
  if (cache) {
    cache->y = y;
    cache->logit = logit;
  }
  return out;
}

Tensor GatedSharedExpert::backward(ParamStore& ps, const Cache& c, const Tensor& dy) const {
  Tensor dmlp, dlogit;
  ops::sigmoid_gated_backward(dy, c.y, c.logit, dmlp, dlogit);
  Tensor dx = mlp.backward(ps, c.mlp, dmlp);
  ops::add_inplace(dx, gate.backward(ps, c.mlp.x, dlogit));
  return dx;
}

void SparseMoE::init(ParamStore& ps, const std::string& prefix, int64_t hidden_, int64_t experts_, int64_t top_k_,
                     int64_t inter_, bool norm_topk, dist::Communicator* ep_group,
                     std::optional<GptOssStyle> gpt_oss_style, std::optional<GroupedSigmoid> grouped_sigmoid) {
  hidden = hidden_;
  experts = experts_;
  top_k = top_k_;
  inter = inter_;
  norm_topk_prob = norm_topk;
  gpt_oss = gpt_oss_style;
  grouped = grouped_sigmoid;
  MF_CHECK(!(gpt_oss && grouped), "internal: a MoE layer is GPT-OSS or DeepSeek style, not both");
  ep = ep_group;
  shard = ep ? dist::ExpertShard::of(experts, ep->rank(), ep->size()) : dist::ExpertShard{0, experts};
  if (!gpt_oss) {
    router = ps.add(prefix + ".gate.weight", {experts, hidden});
    if (grouped) {
      correction_bias = ps.add(prefix + ".gate.e_score_correction_bias", {experts});
      ps.all()[*correction_bias].trainable = false;
      ps.all()[*correction_bias].decay = false;
    }
    gate_up = ps.add(prefix + ".experts.gate_up_proj", {shard.count, 2 * inter, hidden});
    down = ps.add(prefix + ".experts.down_proj", {shard.count, hidden, inter});
    return;
  }
  router = ps.add(prefix + ".router.weight", {experts, hidden});
  router_bias = ps.add(prefix + ".router.bias", {experts});
  gate_up = ps.add(prefix + ".experts.gate_up_proj", {shard.count, hidden, 2 * inter});
  gate_up_bias = ps.add(prefix + ".experts.gate_up_proj_bias", {shard.count, 2 * inter});
  down = ps.add(prefix + ".experts.down_proj", {shard.count, inter, hidden});
  down_bias = ps.add(prefix + ".experts.down_proj_bias", {shard.count, hidden});
  for (size_t b : {*router_bias, *gate_up_bias, *down_bias}) ps.all()[b].decay = false;
}

int64_t SparseMoE::params_per_expert() const { return 3 * inter * hidden + (gpt_oss ? 2 * inter + hidden : 0); }

namespace {

// The tensor as F32 (CPU weights are F32 unless loaded in another compute dtype).
Tensor f32_of(const Tensor& t) { return t.dtype() == DType::F32 ? t : t.to(DType::F32); }

// y [n, N] = x [n, K] @ w [K, N] (the GPT-OSS expert layout: no transpose).
Tensor matmul_nn(const Tensor& x, const Tensor& w) {
  const int64_t n = x.size(0), k = x.size(1), cols = w.size(1);
  Tensor y = Tensor::empty({n, cols}, DType::F32);
  const Tensor wf = f32_of(w);
  ops::gemm_f32(false, false, n, cols, k, 1.f, x.f32(), k, wf.f32(), cols, 0.f, y.f32(), cols);
  return y;
}

}  // namespace

Tensor SparseMoE::forward(const ParamStore& ps, const Tensor& x, RouterOut* router_out, Cache* cache,
                          const Tensor* forced) const {
  const int64_t t = x.size(0);
  Tensor logits = ops::linear(x, ps.at(router));
  if (router_bias) ops::add_bias_rows(logits, ps.at(*router_bias));
  if (router_out) router_out->logits = logits.clone();
  // Softmax in place unless GPT-OSS's routing still needs the logits; DeepSeek-V3 scores with a
  // sigmoid (its weights come out final: renormalised and scaled).
  Tensor probs = gpt_oss ? logits.clone() : logits;
  Tensor weights, chosen;
  if (grouped) {
    ops::grouped_sigmoid_route(logits, ps.at(*correction_bias), grouped->n_group, grouped->topk_group, top_k,
                               norm_topk_prob, grouped->scaling, probs, weights, chosen, forced);
  } else {
    ops::softmax_rows_inplace(probs);
  }
  if (!grouped) {
    // The top-k (or the forced experts) of the probabilities; GPT-OSS picks by its logits and
    // softmaxes the chosen ones among themselves.
    const Tensor& by = gpt_oss ? logits : probs;
    if (forced) {
      MF_CHECK(forced->shape() == Shape({t, top_k}) && forced->dtype() == DType::I64, "forced routing must be I64 [",
               t, ", ", top_k, "], got ", shape_str(forced->shape()));
      chosen = forced->clone();
      weights = Tensor::empty({t, top_k}, DType::F32);
      for (int64_t i = 0; i < t * top_k; ++i) {
        const int64_t e = chosen.i64()[i];
        MF_CHECK(e >= 0 && e < experts, "forced routing names expert ", e, " of ", experts);
        weights.f32()[i] = by.f32()[(i / top_k) * experts + e];
      }
    } else {
      ops::topk_rows(by, top_k, weights, chosen);
    }
    if (gpt_oss) ops::softmax_rows_inplace(weights);
  }
  Tensor topk_sum = Tensor::empty({t}, DType::F32);
  float* w = weights.f32();
  for (int64_t r = 0; r < t; ++r) {
    float s = 0.f;
    for (int64_t j = 0; j < top_k; ++j) s += w[r * top_k + j];
    topk_sum.f32()[r] = s;
    if (norm_topk_prob && !gpt_oss && !grouped) {
      for (int64_t j = 0; j < top_k; ++j) w[r * top_k + j] /= s;
    }
  }
  if (router_out) router_out->chosen = chosen;
  // Every (token, slot) pair goes to its expert's rank (here, with one rank), the local experts
  // run on their rows, and the outputs come back in pair order to be summed with their weights.
  const int64_t pairs = t * top_k;
  const std::vector<int64_t> pair_expert(chosen.i64(), chosen.i64() + pairs);
  auto plan = std::make_shared<dist::ExpertDispatch>(ep ? *ep : one_rank_group(), pair_expert, experts);
  Tensor xs = plan->dispatch(pair_rows(x, top_k));
  const std::vector<int64_t>& off = plan->local_offsets();
  Tensor ys = Tensor::zeros({plan->received(), hidden}, DType::F32);
  std::vector<Tensor> hs(static_cast<size_t>(shard.count)), acts(static_cast<size_t>(shard.count));
  const Tensor& gu_all = ps.at(gate_up);
  const Tensor& dn_all = ps.at(down);
  for (int64_t e = 0; e < shard.count; ++e) {
    const int64_t n = off[e + 1] - off[e];
    if (n == 0) continue;
    Tensor y;
    if (gpt_oss) {
      hs[e] = matmul_nn(xs.slice0(off[e], n), gu_all.slice0(e, 1).view({hidden, 2 * inter}));
      ops::add_bias_rows(hs[e], ps.at(*gate_up_bias).slice0(e, 1).view({2 * inter}));
      acts[e] = ops::clamped_swiglu(hs[e], gpt_oss->alpha, gpt_oss->limit);
      y = matmul_nn(acts[e], dn_all.slice0(e, 1).view({inter, hidden}));
      ops::add_bias_rows(y, ps.at(*down_bias).slice0(e, 1).view({hidden}));
    } else {
      hs[e] = ops::linear(xs.slice0(off[e], n), gu_all.slice0(e, 1).view({2 * inter, hidden}));
      acts[e] = ops::swiglu(hs[e]);
      y = ops::linear(acts[e], dn_all.slice0(e, 1).view({hidden, inter}));
    }
    std::memcpy(ys.f32() + off[e] * hidden, y.f32(), y.nbytes());
  }
  Tensor y_pairs = plan->combine(ys);
  Tensor out = Tensor::zeros({t, hidden}, DType::F32);
  for (int64_t i = 0; i < pairs; ++i) {
    const float wi = w[i];
    float* o = out.f32() + (i / top_k) * hidden;
    const float* yi = y_pairs.f32() + i * hidden;
    for (int64_t d = 0; d < hidden; ++d) o[d] += wi * yi[d];
  }
  if (cache) {
    cache->x = x;
    cache->probs = probs;
    cache->chosen = chosen;
    cache->weights = weights;
    cache->topk_sum = topk_sum;
    cache->plan = std::move(plan);
    cache->xs = xs;
    cache->h = std::move(hs);
    cache->act = std::move(acts);
    cache->y_pairs = y_pairs;
  }
  return out;
}

Tensor SparseMoE::gpt_oss_expert_backward(ParamStore& ps, int64_t e, const Tensor& dy, const Tensor& x, const Tensor& h,
                                          const Tensor& act) const {
  const int64_t n = dy.size(0);
  const Tensor w_dn = f32_of(ps.at(down).slice0(e, 1).view({inter, hidden}));
  const Tensor w_gu = f32_of(ps.at(gate_up).slice0(e, 1).view({hidden, 2 * inter}));
  Tensor g_dn = ps.grad(down).slice0(e, 1).view({inter, hidden});
  Tensor g_gu = ps.grad(gate_up).slice0(e, 1).view({hidden, 2 * inter});
  Tensor g_dn_b = ps.grad(*down_bias).slice0(e, 1).view({hidden});
  Tensor g_gu_b = ps.grad(*gate_up_bias).slice0(e, 1).view({2 * inter});
  // y = act @ W_dn + b: dW_dn += act^T dy, db += sum(dy), d(act) = dy W_dn^T.
  ops::gemm_f32(true, false, inter, hidden, n, 1.f, act.f32(), inter, dy.f32(), hidden, 1.f, g_dn.f32(), hidden);
  ops::bias_grad(dy, g_dn_b);
  Tensor dact = Tensor::empty({n, inter}, DType::F32);
  ops::gemm_f32(false, true, n, inter, hidden, 1.f, dy.f32(), hidden, w_dn.f32(), hidden, 0.f, dact.f32(), inter);
  Tensor dh = ops::clamped_swiglu_backward(h, dact, gpt_oss->alpha, gpt_oss->limit);
  // h = x @ W_gu + b.
  ops::gemm_f32(true, false, hidden, 2 * inter, n, 1.f, x.f32(), hidden, dh.f32(), 2 * inter, 1.f, g_gu.f32(), 2 * inter);
  ops::bias_grad(dh, g_gu_b);
  Tensor dx = Tensor::empty({n, hidden}, DType::F32);
  ops::gemm_f32(false, true, n, hidden, 2 * inter, 1.f, dh.f32(), 2 * inter, w_gu.f32(), 2 * inter, 0.f, dx.f32(), hidden);
  return dx;
}

Tensor SparseMoE::backward(ParamStore& ps, const Cache& c, const Tensor& dy, const Tensor* dprobs_extra) const {
  const int64_t t = c.x.size(0);
  Tensor dx = Tensor::zeros({t, hidden}, DType::F32);
  Tensor dweights = Tensor::zeros({t, top_k}, DType::F32);  // d loss / d (routing weight of each slot)
  const Tensor& gu_all = ps.at(gate_up);
  const Tensor& dn_all = ps.at(down);
  Tensor& g_gu = ps.grad(gate_up);
  Tensor& g_dn = ps.grad(down);
  const float* w = c.weights.f32();
  // Per pair: the gradient at its expert output (weight * dy of its token) and at its weight.
  const int64_t pairs = t * top_k;
  Tensor dyw = Tensor::empty({pairs, hidden}, DType::F32);
  for (int64_t i = 0; i < pairs; ++i) {
    const float* g = dy.f32() + (i / top_k) * hidden;
    const float* y = c.y_pairs.f32() + i * hidden;
    double dw = 0;
    for (int64_t d = 0; d < hidden; ++d) {
      dw += static_cast<double>(g[d]) * y[d];
      dyw.f32()[i * hidden + d] = w[i] * g[d];
    }
    dweights.f32()[i] = static_cast<float>(dw);
  }
  // The same trip as forward: gradients to the experts' ranks, input gradients back.
  Tensor dys = c.plan->dispatch(dyw);
  const std::vector<int64_t>& off = c.plan->local_offsets();
  Tensor dxs = Tensor::zeros({c.plan->received(), hidden}, DType::F32);
  for (int64_t e = 0; e < shard.count; ++e) {
    const int64_t n = off[e + 1] - off[e];
    if (n == 0) continue;
    Tensor dy_e = dys.slice0(off[e], n);
    if (gpt_oss) {
      Tensor dx_e = gpt_oss_expert_backward(ps, e, dy_e, c.xs.slice0(off[e], n), c.h[e], c.act[e]);
      std::memcpy(dxs.f32() + off[e] * hidden, dx_e.f32(), dx_e.nbytes());
      continue;
    }
    Tensor dn_e = dn_all.slice0(e, 1).view({hidden, inter});
    Tensor g_dn_e = g_dn.slice0(e, 1).view({hidden, inter});
    ops::linear_weight_grad(dy_e, c.act[e], g_dn_e);
    Tensor dact = ops::linear_input_grad(dy_e, dn_e);
    Tensor dh = ops::swiglu_backward(c.h[e], dact);
    Tensor gu_e = gu_all.slice0(e, 1).view({2 * inter, hidden});
    Tensor g_gu_e = g_gu.slice0(e, 1).view({2 * inter, hidden});
    ops::linear_weight_grad(dh, c.xs.slice0(off[e], n), g_gu_e);
    Tensor dx_e = ops::linear_input_grad(dh, gu_e);
    std::memcpy(dxs.f32() + off[e] * hidden, dx_e.f32(), dx_e.nbytes());
  }
  Tensor dx_pairs = c.plan->combine(dxs);
  for (int64_t i = 0; i < pairs; ++i) {
    float* o = dx.f32() + (i / top_k) * hidden;
    const float* g = dx_pairs.f32() + i * hidden;
    for (int64_t d = 0; d < hidden; ++d) o[d] += g[d];
  }
  const int64_t* ch = c.chosen.i64();
  if (grouped) {
    MF_CHECK(!dprobs_extra, "internal: DeepSeek-V3 routing has no load-balancing loss");
    Tensor dlogits = ops::grouped_sigmoid_route_backward(c.probs, c.chosen, dweights, norm_topk_prob, grouped->scaling);
    ops::add_inplace(dx, ops::linear_input_grad(dlogits, ps.at(router)));
    ops::linear_weight_grad(dlogits, c.x, ps.grad(router));
    return dx;
  }
  if (gpt_oss) {
    // Weights = softmax of the chosen logits: d(logit_j) = w_j (dw_j - sum_i w_i dw_i); the
    // load-balancing loss's gradient arrives on the full softmax.
    Tensor dlogits = dprobs_extra ? ops::softmax_backward(c.probs, *dprobs_extra) : Tensor::zeros({t, experts}, DType::F32);
    for (int64_t r = 0; r < t; ++r) {
      const float* dwr = dweights.f32() + r * top_k;
      double dot = 0;
      for (int64_t j = 0; j < top_k; ++j) dot += static_cast<double>(dwr[j]) * w[r * top_k + j];
      for (int64_t j = 0; j < top_k; ++j)
        dlogits.f32()[r * experts + ch[r * top_k + j]] += static_cast<float>(w[r * top_k + j] * (dwr[j] - dot));
    }
    ops::add_inplace(dx, ops::linear_input_grad(dlogits, ps.at(router)));
    ops::linear_weight_grad(dlogits, c.x, ps.grad(router));
    ops::bias_grad(dlogits, ps.grad(*router_bias));
    return dx;
  }
  // Routing weights -> full probabilities (the discrete choice gets no gradient).
  Tensor dprobs = dprobs_extra ? dprobs_extra->clone() : Tensor::zeros({t, experts}, DType::F32);
  for (int64_t r = 0; r < t; ++r) {
    const float* dwr = dweights.f32() + r * top_k;
    if (norm_topk_prob) {
      // w_j = p_j / S with S = sum of the chosen p: dp_j = (dw_j - sum_i dw_i w_i) / S.
      double dot = 0;
      for (int64_t j = 0; j < top_k; ++j) dot += static_cast<double>(dwr[j]) * w[r * top_k + j];
      const float s = c.topk_sum.f32()[r];
      for (int64_t j = 0; j < top_k; ++j)
        dprobs.f32()[r * experts + ch[r * top_k + j]] += static_cast<float>((dwr[j] - dot) / s);
    } else {
      for (int64_t j = 0; j < top_k; ++j) dprobs.f32()[r * experts + ch[r * top_k + j]] += dwr[j];
    }
  }
  Tensor dlogits = ops::softmax_backward(c.probs, dprobs);
  ops::add_inplace(dx, ops::linear_input_grad(dlogits, ps.at(router)));
  ops::linear_weight_grad(dlogits, c.x, ps.grad(router));
  return dx;
}

namespace {
struct RoutingStats {
  std::vector<double> routed, prob;
  int64_t rows = 0;
};
RoutingStats routing_stats(const std::vector<SparseMoE::RouterOut>& routers, int64_t experts, dist::Communicator* dp) {
  RoutingStats st{std::vector<double>(experts, 0.0), std::vector<double>(experts, 0.0), 0};
  for (const auto& r : routers) {
    Tensor p = r.logits.clone();
    ops::softmax_rows_inplace(p);
    const int64_t t = p.size(0), k = r.chosen.size(1);
    for (int64_t i = 0; i < t; ++i) {
      for (int64_t e = 0; e < experts; ++e) st.prob[e] += p.f32()[i * experts + e];
      for (int64_t j = 0; j < k; ++j) st.routed[r.chosen.i64()[i * k + j]] += 1.0;
    }
    st.rows += t;
  }
  if (dp && dp->size() > 1) {
    // Sums over the ranks that split the batch (F64: the same sums the one-rank run makes).
    Tensor all = Tensor::empty({2 * experts + 1}, DType::F64);
    double* a = all.data<double>();
    for (int64_t e = 0; e < experts; ++e) {
      a[e] = st.routed[e];
      a[experts + e] = st.prob[e];
    }
    a[2 * experts] = static_cast<double>(st.rows);
    dp->all_reduce_sum(all);
    for (int64_t e = 0; e < experts; ++e) {
      st.routed[e] = a[e];
      st.prob[e] = a[experts + e];
    }
    st.rows = static_cast<int64_t>(a[2 * experts]);
  }
  return st;
}
}  // namespace

float load_balancing_loss(const std::vector<SparseMoE::RouterOut>& routers, int64_t experts, dist::Communicator* dp) {
  if (routers.empty()) return 0.f;
  const RoutingStats st = routing_stats(routers, experts, dp);
  // tokens_per_expert is a mean over rows of a [rows, top_k, E] one-hot, i.e. per slot; summing
  // over slots against the mean probability gives sum_e (routed_e / rows) * (prob_e / rows).
  double loss = 0;
  for (int64_t e = 0; e < experts; ++e) loss += (st.routed[e] / st.rows) * (st.prob[e] / st.rows);
  return static_cast<float>(loss * experts);
}

std::vector<float> load_balancing_prob_grad(const std::vector<SparseMoE::RouterOut>& routers, int64_t experts,
                                            dist::Communicator* dp) {
  std::vector<float> g(static_cast<size_t>(experts), 0.f);
  if (routers.empty()) return g;
  const RoutingStats st = routing_stats(routers, experts, dp);
  for (int64_t e = 0; e < experts; ++e) g[e] = static_cast<float>(experts * (st.routed[e] / st.rows) / st.rows);
  return g;
}

}  // namespace moeforge::nn
