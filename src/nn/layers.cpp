#include "nn/layers.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "ops/ops.h"

namespace moeforge::nn {

namespace {


// Without expert parallelism the dispatch runs over a group of one (stateless, shared).
parallel::Communicator& one_rank_group() {
  static const std::unique_ptr<parallel::Communicator> self = parallel::self_communicator("experts");
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
                     int64_t inter_, bool norm_topk, parallel::Communicator* ep_group,
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
  shard = ep ? parallel::ExpertShard::of(experts, ep->rank(), ep->size()) : parallel::ExpertShard{0, experts};
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

Tensor SparseMoE::forward(const ParamStore& ps, const Tensor& x, RouterOut* router_out, Cache* cache,
                          const Tensor* forced) const {
  const int64_t t = x.size(0);
  Tensor logits = ops::linear(x, ps.at(router));
  if (router_bias) ops::add_bias_rows(logits, ps.at(*router_bias));
  if (forced)
    MF_CHECK(forced->shape() == Shape({t, top_k}) && forced->dtype() == DType::I64, "forced routing must be I64 [", t,
             ", ", top_k, "], got ", shape_str(forced->shape()));
  // probs: the softmax (DeepSeek-V3: the sigmoid scores); weights come out final. GPT-OSS softmaxes
  // its top-k logits among themselves: the top-k of the softmax, renormalised, is the same.
  Tensor probs, weights, chosen;
  if (grouped)
    ops::grouped_sigmoid_route(logits, ps.at(*correction_bias), grouped->n_group, grouped->topk_group, top_k,
                               norm_topk_prob, grouped->scaling, probs, weights, chosen, forced);
  else
    ops::router_softmax_topk(logits, top_k, renormalised(), probs, weights, chosen, forced);
  if (router_out) {
    if (!grouped) router_out->probs = probs;
    router_out->chosen = chosen;
  }
  // The pairs grouped by global expert (hence by the rank holding it) go to their experts' ranks
  // (here, with one rank), the local experts run on their rows as grouped GEMMs, and the outputs
  // come back to be summed with their weights.
  ops::RoutingPlan plan = ops::plan_routing(chosen, experts);
  auto exchange = std::make_shared<parallel::ExpertExchange>(ep ? *ep : one_rank_group(), plan.offsets, x.device());
  Tensor xs = exchange->dispatch(ops::permute_tokens(x, plan));
  const std::vector<int64_t>& off = exchange->local_offsets();
  const int64_t rows = xs.size(0);
  Tensor h = ops::empty({rows, 2 * inter}, x.dtype(), x.device(), "expert gate_up output");
  Tensor y = ops::empty({rows, hidden}, x.dtype(), x.device(), "expert output");
  Tensor act;
  if (gpt_oss) {  // x @ W with W [E, H, 2I]: the input-gradient product of that layout
    ops::grouped_linear_input_grad(xs, ps.at(gate_up), off, h);
    ops::grouped_add_bias(h, ps.at(*gate_up_bias), off);
    act = ops::clamped_swiglu(h, gpt_oss->alpha, gpt_oss->limit);
    ops::grouped_linear_input_grad(act, ps.at(down), off, y);
    ops::grouped_add_bias(y, ps.at(*down_bias), off);
  } else {
    ops::grouped_linear(xs, ps.at(gate_up), off, h);
    act = ops::swiglu(h);
    ops::grouped_linear(act, ps.at(down), off, y);
  }
  Tensor y_perm = exchange->combine(y);
  Tensor out = ops::unpermute_tokens(y_perm, weights, plan);
  if (cache) {
    cache->x = x;
    cache->probs = probs;
    cache->chosen = chosen;
    cache->weights = weights;
    cache->plan = std::move(plan);
    cache->exchange = std::move(exchange);
    cache->xs = xs;
    cache->h = h;
    cache->act = act;
    cache->y_perm = y_perm;
  }
  return out;
}

Tensor SparseMoE::backward(ParamStore& ps, const Cache& c, const Tensor& dy, const Tensor* dprobs_extra) const {
  // The same trip as forward: gradients to the experts' ranks, input gradients back.
  Tensor d_yperm, dweights;
  ops::unpermute_tokens_backward(dy, c.y_perm, c.weights, c.plan, d_yperm, dweights);
  const Tensor d_y = c.exchange->dispatch(d_yperm);
  const std::vector<int64_t>& off = c.exchange->local_offsets();
  const int64_t rows = c.xs.size(0);
  const Device dev = dy.device();
  Tensor d_act = ops::empty({rows, inter}, dy.dtype(), dev, "expert activation gradient");
  Tensor d_xs = ops::empty({rows, hidden}, dy.dtype(), dev, "expert input gradient");
  if (gpt_oss) {  // y = act @ W_down + b: dW += act^T d_y, d(act) = d_y W^T; likewise for gate_up
    ops::grouped_linear_weight_grad(c.act, d_y, off, ps.grad(down), /*accumulate=*/true);
    ops::grouped_bias_grad(d_y, off, ps.grad(*down_bias));
    ops::grouped_linear(d_y, ps.at(down), off, d_act);
    const Tensor d_h = ops::clamped_swiglu_backward(c.h, d_act, gpt_oss->alpha, gpt_oss->limit);
    ops::grouped_linear_weight_grad(c.xs, d_h, off, ps.grad(gate_up), true);
    ops::grouped_bias_grad(d_h, off, ps.grad(*gate_up_bias));
    ops::grouped_linear(d_h, ps.at(gate_up), off, d_xs);
  } else {
    ops::grouped_linear_weight_grad(d_y, c.act, off, ps.grad(down), true);
    ops::grouped_linear_input_grad(d_y, ps.at(down), off, d_act);
    const Tensor d_h = ops::swiglu_backward(c.h, d_act);
    ops::grouped_linear_weight_grad(d_h, c.xs, off, ps.grad(gate_up), true);
    ops::grouped_linear_input_grad(d_h, ps.at(gate_up), off, d_xs);
  }
  Tensor dx = ops::permute_tokens_backward(c.exchange->combine(d_xs), c.plan);
  // The router: routing weights -> logits (the discrete choice gets no gradient).
  Tensor dlogits;
  if (grouped) {
    MF_CHECK(!dprobs_extra, "internal: DeepSeek-V3 routing has no load-balancing loss");
    dlogits = ops::grouped_sigmoid_route_backward(c.probs, c.chosen, dweights, norm_topk_prob, grouped->scaling);
  } else {
    dlogits = ops::router_backward(c.probs, c.chosen, c.weights, dweights, renormalised(), dprobs_extra);
  }
  ops::add_inplace(dx, ops::linear_input_grad(dlogits, ps.at(router)));
  ops::linear_weight_grad(dlogits, c.x, ps.grad(router));
  if (router_bias) ops::bias_grad(dlogits, ps.grad(*router_bias));
  return dx;
}

namespace {
struct RoutingStats {
  std::vector<double> routed, prob;
  int64_t rows = 0;
};
RoutingStats routing_stats(const std::vector<SparseMoE::RouterOut>& routers, int64_t experts, parallel::Communicator* dp) {
  RoutingStats st{std::vector<double>(experts, 0.0), std::vector<double>(experts, 0.0), 0};
  for (const auto& r : routers) {
    const Tensor& p = r.probs;
    MF_CHECK(p.defined(), "internal: the load-balancing loss needs a softmax router's probabilities");
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

float load_balancing_loss(const std::vector<SparseMoE::RouterOut>& routers, int64_t experts, parallel::Communicator* dp) {
  if (routers.empty()) return 0.f;
  const RoutingStats st = routing_stats(routers, experts, dp);
  // tokens_per_expert is a mean over rows of a [rows, top_k, E] one-hot, i.e. per slot; summing
  // over slots against the mean probability gives sum_e (routed_e / rows) * (prob_e / rows).
  double loss = 0;
  for (int64_t e = 0; e < experts; ++e) loss += (st.routed[e] / st.rows) * (st.prob[e] / st.rows);
  return static_cast<float>(loss * experts);
}

std::vector<float> load_balancing_prob_grad(const std::vector<SparseMoE::RouterOut>& routers, int64_t experts,
                                            parallel::Communicator* dp) {
  std::vector<float> g(static_cast<size_t>(experts), 0.f);
  if (routers.empty()) return g;
  const RoutingStats st = routing_stats(routers, experts, dp);
  for (int64_t e = 0; e < experts; ++e) g[e] = static_cast<float>(experts * (st.routed[e] / st.rows) / st.rows);
  return g;
}

}  // namespace moeforge::nn
