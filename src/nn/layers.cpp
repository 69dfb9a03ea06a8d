#include "nn/layers.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "ops/ops.h"

namespace moeforge::nn {

namespace {

// dW (+)= dy^T x for a weight: the step's first contribution writes the gradient (no zeroing pass,
// no read of it; ParamAccess::grad_for_write), later ones add.
void weight_grad(ParamAccess& ps, size_t weight, const Tensor& dy, const Tensor& x) {
  bool accumulate = true;
  Tensor& dw = ps.grad_for_write(weight, accumulate);
  ops::linear_weight_grad(dy, x, dw, accumulate);
}

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

Tensor RMSNorm::forward(const ParamAccess& ps, const Tensor& x, Tensor* rstd) const {
  return ops::rms_norm(x, ps.value(weight), eps, rstd);
}

// Where the norm's backward adds the weight's gradient: the parameter's, or `scratch` (zeros) for a
// frozen weight.
Tensor& RMSNorm::grad_target(ParamAccess& ps, Tensor& scratch, Device device) const {
  if (ps.trainable(weight)) return ps.grad(weight);
  scratch = ops::zeros({ps.value(weight).numel()}, DType::F32, device);
  return scratch;
}

Tensor RMSNorm::backward(ParamAccess& ps, const Tensor& x, const Tensor& dy, const Tensor* rstd,
                         const Tensor* residual_grad) const {
  Tensor scratch;
  return ops::rms_norm_backward(x, ps.value(weight), eps, dy, grad_target(ps, scratch, x.device()), rstd, residual_grad);
}

Tensor RMSNorm::forward_rope(const ParamAccess& ps, const Tensor& x, const Tensor& cos, const Tensor& sin,
                             Tensor* rstd) const {
  return ops::rms_norm_rope(x, ps.value(weight), eps, cos, sin, rstd);
}

Tensor RMSNorm::backward_rope(ParamAccess& ps, const Tensor& x, Tensor& dy, const Tensor& cos, const Tensor& sin,
                              const Tensor* rstd) const {
  Tensor scratch;
  return ops::rms_norm_rope_backward(x, ps.value(weight), eps, dy, cos, sin, grad_target(ps, scratch, x.device()), rstd);
}

void Linear::init(ParamStore& ps, const std::string& prefix, int64_t in, int64_t out, bool with_bias) {
  weight = ps.add(prefix + ".weight", {out, in});
  if (with_bias) {
    bias = ps.add(prefix + ".bias", {out});
    ps.all()[*bias].decay = false;
  }
}

Tensor Linear::forward(const ParamAccess& ps, const Tensor& x) const {
  Tensor y = ops::linear(x, ps.value(weight));
  if (bias) ops::add_bias_rows(y, ps.value(*bias));
  if (lora) lora->forward_add(ps, x, y);
  return y;
}

Tensor Linear::backward(ParamAccess& ps, const Tensor& x, const Tensor& dy) const {
  Tensor dx = ops::linear_input_grad(dy, ps.value(weight));
  weight_grads(ps, x, dy);
  if (lora) lora->backward(ps, x, dy, dx);
  return dx;
}

void Linear::backward_into(ParamAccess& ps, const Tensor& x, const Tensor& dy, Tensor& dx, bool accumulate) const {
  ops::gemm(dy, false, ps.value(weight), false, dx, accumulate);
  weight_grads(ps, x, dy);
  if (lora) lora->backward(ps, x, dy, dx);
}

Tensor Linear::input_grad(const ParamAccess& ps, const Tensor& dy) const {
  MF_CHECK(!lora, "Linear::input_grad: a LoRA-adapted projection needs backward (its adapter's gradients)");
  return ops::linear_input_grad(dy, ps.value(weight));
}

void Linear::weight_grads(ParamAccess& ps, const Tensor& x, const Tensor& dy) const {
  if (ps.trainable(weight)) weight_grad(ps, weight, dy, x);
  if (bias && ps.trainable(*bias)) ops::bias_grad(dy, ps.grad(*bias));
}

void Attention::init(ParamStore& ps, const std::string& prefix, int64_t hidden, int64_t heads_, int64_t kv_heads_,
                     int64_t head_dim_, const AttentionOptions& opts) {
  heads = heads_;
  kv_heads = kv_heads_;
  head_dim = head_dim_;
  window = opts.window;
  clip = opts.clip_qkv;
  rope = opts.rope;
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

float Attention::scale() const { return 1.0f / std::sqrt(static_cast<float>(head_dim)); }

Tensor Attention::normalise(const ParamAccess& ps, const std::optional<RMSNorm>& norm, const Tensor& x, int64_t n,
                            Tensor* rstd, Tensor* unclipped) const {
  const int64_t t = x.size(0);
  Tensor y = x;
  if (norm && full_qk_norm) y = norm->forward(ps, x, rstd);
  else if (norm) y = norm->forward(ps, x.view({t * n, head_dim}), rstd).view({t, n * head_dim});
  if (clip) {
    if (unclipped) *unclipped = ops::copy(y);
    ops::clamp_inplace(y, *clip);
  }
  return y;
}

Tensor Attention::normalise_backward(ParamAccess& ps, const std::optional<RMSNorm>& norm, const Tensor& pre,
                                     const Tensor& rstd, const Tensor& unclipped, Tensor dy, int64_t n) const {
  const int64_t t = dy.size(0);
  if (clip) ops::clamp_backward_inplace(unclipped, dy, *clip);
  if (!norm) return dy;
  const Tensor* r = rstd.defined() ? &rstd : nullptr;
  if (full_qk_norm) return norm->backward(ps, pre, dy, r);
  return norm->backward(ps, pre.view({t * n, head_dim}), dy.view({t * n, head_dim}), r).view({t, n * head_dim});
}

Tensor Attention::forward(const ParamAccess& ps, const Tensor& x, int64_t batch, int64_t seq, const Tensor& cos,
                          const Tensor& sin, const Tensor* doc_ids, Cache* cache, const KvCaches* kv) const {
  const int64_t t = batch * seq;
  Tensor q_pre = q_proj.forward(ps, x), k_pre = k_proj.forward(ps, x);
  Tensor v = v_proj.forward(ps, x);
  Cache* c = cache;
  if (c) {
    c->x = x;
    if (q_norm) {  // without norms RoPE rotates the projections in place and backward needs neither
      c->q_pre = q_pre;
      c->k_pre = k_pre;
    }
  }
  Tensor q, k;
  if (norm_then_rope()) {  // Qwen3: the per-head norms and the rotation in one pass each
    q = q_norm->forward_rope(ps, q_pre.view({t, heads, head_dim}), cos, sin, c ? &c->rstd_q : nullptr);
    k = k_norm->forward_rope(ps, k_pre.view({t, kv_heads, head_dim}), cos, sin, c ? &c->rstd_k : nullptr);
  } else {
    q = normalise(ps, q_norm, q_pre, heads, c ? &c->rstd_q : nullptr, c ? &c->q_unclipped : nullptr)
            .view({t, heads, head_dim});
    k = normalise(ps, k_norm, k_pre, kv_heads, c ? &c->rstd_k : nullptr, c ? &c->k_unclipped : nullptr)
            .view({t, kv_heads, head_dim});
  }
  if (clip) {
    if (c) c->v_unclipped = ops::copy(v);
    ops::clamp_inplace(v, *clip);
  }
  v = v.view({batch, seq, kv_heads, head_dim});
  if (rope && !norm_then_rope()) {
    ops::rope_inplace(q, cos, sin);
    ops::rope_inplace(k, cos, sin);
  }
  Tensor q4 = q.view({batch, seq, heads, head_dim}), k4 = k.view({batch, seq, kv_heads, head_dim});
  const Tensor* sink_logits = sinks ? &ps.value(*sinks) : nullptr;
  if (kv) {  // generation: each sequence's rows against its own cache
    const Tensor v3 = v.view({t, kv_heads, head_dim});
    const Tensor o = per_sequence(kv->offsets, heads * head_dim, q.dtype(), q.device(), [&](size_t i, int64_t r0, int64_t n) {
      Tensor k_att, v_att;
      kv->states[i]->append(k.slice0(r0, n), v3.slice0(r0, n), k_att, v_att);
      return ops::attention(q.slice0(r0, n).view({1, n, heads, head_dim}), k_att, v_att, scale(), window, nullptr,
                            sink_logits, nullptr);
    });
    return o_proj.forward(ps, o);
  }
  Tensor o = ops::attention(q4, k4, v, scale(), window, doc_ids, sink_logits, c ? &c->lse : nullptr);
  if (c) {
    c->q = q4;
    c->k = k4;
    c->v = v;
    c->o = o.view({t, heads * head_dim});
  }
  return o_proj.forward(ps, o.view({t, heads * head_dim}));
}

Tensor Attention::backward(ParamAccess& ps, Cache& c, int64_t batch, int64_t seq, const Tensor& cos,
                           const Tensor& sin, const Tensor* doc_ids, const Tensor& dy) const {
  const int64_t t = batch * seq;
  Tensor d_o = o_proj.backward(ps, c.o, dy).view({batch, seq, heads, head_dim});
  Tensor dq, dk, dv, dsinks;
  const Tensor o4 = c.o.view({batch, seq, heads, head_dim});
  ops::attention_backward(c.q, c.k, c.v, d_o, scale(), window, doc_ids, dq, dk, dv, sinks ? &ps.value(*sinks) : nullptr,
                          sinks ? &dsinks : nullptr, &o4, c.lse.defined() ? &c.lse : nullptr);
  if (sinks && ps.trainable(*sinks)) ops::add_inplace(ps.grad(*sinks), dsinks);
  d_o = Tensor();
  c.q = c.k = c.v = c.o = c.lse = Tensor();
  dq = dq.view({t, heads, head_dim});
  dk = dk.view({t, kv_heads, head_dim});
  if (norm_then_rope()) {
    const Tensor* rq = c.rstd_q.defined() ? &c.rstd_q : nullptr;
    const Tensor* rk = c.rstd_k.defined() ? &c.rstd_k : nullptr;
    dq = q_norm->backward_rope(ps, c.q_pre.view({t, heads, head_dim}), dq, cos, sin, rq).view({t, heads * head_dim});
    dk = k_norm->backward_rope(ps, c.k_pre.view({t, kv_heads, head_dim}), dk, cos, sin, rk).view({t, kv_heads * head_dim});
  } else {
    if (rope) {
      ops::rope_inplace(dq, cos, sin, /*inverse=*/true);
      ops::rope_inplace(dk, cos, sin, /*inverse=*/true);
    }
    dq = normalise_backward(ps, q_norm, c.q_pre, c.rstd_q, c.q_unclipped, dq.view({t, heads * head_dim}), heads);
    dk = normalise_backward(ps, k_norm, c.k_pre, c.rstd_k, c.k_unclipped, dk.view({t, kv_heads * head_dim}), kv_heads);
  }
  dv = dv.view({t, kv_heads * head_dim});
  if (clip) ops::clamp_backward_inplace(c.v_unclipped, dv, *clip);
  Tensor dx = ops::empty({t, c.x.size(1)}, dy.dtype(), dy.device(), "attention input gradient");
  q_proj.backward_into(ps, c.x, dq, dx, false);
  k_proj.backward_into(ps, c.x, dk, dx, true);
  v_proj.backward_into(ps, c.x, dv, dx, true);
  return dx;
}

void DenseMLP::init(ParamStore& ps, const std::string& prefix, int64_t hidden, int64_t inter, bool bias) {
  gate_proj.init(ps, prefix + ".gate_proj", hidden, inter, bias);
  up_proj.init(ps, prefix + ".up_proj", hidden, inter, bias);
  down_proj.init(ps, prefix + ".down_proj", inter, hidden, bias);
}

Tensor DenseMLP::forward(const ParamAccess& ps, const Tensor& x, Cache* cache) const {
  const Tensor g = gate_proj.forward(ps, x), u = up_proj.forward(ps, x);
  const int64_t t = g.size(0), inter = g.size(1);
  // [gate | up] per row: swiglu's input layout.
  Tensor gu = ops::empty({t, 2 * inter}, g.dtype(), g.device(), "dense gate_up output");
  ops::copy_columns(g, inter, 0, 1, gu, 2 * inter, 0, inter);
  ops::copy_columns(u, inter, 0, 1, gu, 2 * inter, inter, inter);
  if (cache) *cache = {x, gu};
  return down_proj.forward(ps, ops::swiglu(gu));
}

Tensor DenseMLP::backward(ParamAccess& ps, Cache& c, const Tensor& dy) const {
  Tensor dgu;
  if (down_proj.lora) {
    // The adapter's gradients need the activation with d_y: recompute it first.
    const Tensor dact = down_proj.backward(ps, ops::swiglu(c.gate_up), dy);
    dgu = ops::swiglu_backward(c.gate_up, dact);
  } else {
    // d(act) first; SwiGLU's backward then gives the activation for the down weight's gradient
    // (one pass over gate_up fewer than recomputing it; the same values).
    const Tensor dact = down_proj.input_grad(ps, dy);
    Tensor act;
    dgu = ops::swiglu_backward(c.gate_up, dact, &act);
    down_proj.weight_grads(ps, act, dy);
  }
  c.gate_up = Tensor();
  const int64_t t = dgu.size(0), inter = dgu.size(1) / 2;
  Tensor dg = ops::empty({t, inter}, dgu.dtype(), dgu.device(), "dense gate gradient");
  Tensor du = ops::empty({t, inter}, dgu.dtype(), dgu.device(), "dense up gradient");
  ops::copy_columns(dgu, 2 * inter, 0, 1, dg, inter, 0, inter);
  ops::copy_columns(dgu, 2 * inter, inter, 1, du, inter, 0, inter);
  Tensor dx = ops::empty({t, c.x.size(1)}, dy.dtype(), dy.device(), "dense input gradient");
  gate_proj.backward_into(ps, c.x, dg, dx, false);
  up_proj.backward_into(ps, c.x, du, dx, true);
  return dx;
}

void GatedSharedExpert::init(ParamStore& ps, const std::string& prefix, int64_t hidden, int64_t inter) {
  mlp.init(ps, prefix + ".shared_expert", hidden, inter);
  gate.init(ps, prefix + ".shared_expert_gate", hidden, 1, false);
}

void GatedSharedExpert::forward_add(const ParamAccess& ps, const Tensor& x, Tensor& out, Cache* cache) const {
  add_to(out, compute(ps, x, cache));
}

GatedSharedExpert::Parts GatedSharedExpert::compute(const ParamAccess& ps, const Tensor& x, Cache* cache) const {
  Parts p{mlp.forward(ps, x, cache ? &cache->mlp : nullptr), gate.forward(ps, x)};  // y [T, H], logit [T, 1]
  if (cache) {
    cache->y = p.y;
    cache->logit = p.logit;
  }
  return p;
}

void GatedSharedExpert::add_to(Tensor& out, const Parts& p) { ops::add_sigmoid_gated(out, p.y, p.logit); }

Tensor GatedSharedExpert::backward(ParamAccess& ps, Cache& c, const Tensor& dy) const {
  Tensor dmlp, dlogit;
  ops::sigmoid_gated_backward(dy, c.y, c.logit, dmlp, dlogit);
  c.y = c.logit = Tensor();
  const Tensor x = c.mlp.x;
  Tensor dx = mlp.backward(ps, c.mlp, dmlp);
  gate.backward_into(ps, x, dlogit, dx, true);
  return dx;
}

void SparseMoE::init(ParamStore& ps, const std::string& prefix, int64_t hidden_, int64_t experts_, int64_t top_k_,
                     int64_t inter_, bool norm_topk, parallel::Communicator* ep_group,
                     std::optional<GptOssStyle> gpt_oss_style, std::optional<GroupedSigmoid> grouped_sigmoid,
                     std::optional<Relu2Experts> relu2_experts) {
  hidden = hidden_;
  experts = experts_;
  top_k = top_k_;
  inter = inter_;
  norm_topk_prob = norm_topk;
  gpt_oss = gpt_oss_style;
  grouped = grouped_sigmoid;
  relu2 = relu2_experts;
  expert_width = hidden;
  MF_CHECK(!(gpt_oss && (grouped || relu2)), "internal: a GPT-OSS MoE layer has its own router and experts");
  ep_size = ep_group ? ep_group->size() : 1;
  shard = ep_group ? parallel::ExpertShard::of(experts, ep_group->rank(), ep_size) : parallel::ExpertShard{0, experts};
  if (!gpt_oss) {
    router = ps.add(prefix + ".gate.weight", {experts, hidden});
    if (grouped) {
      correction_bias = ps.add(prefix + ".gate.e_score_correction_bias", {experts});
      ps.all()[*correction_bias].trainable = false;
      ps.all()[*correction_bias].decay = false;
    }
    if (relu2) {
      if (relu2->latent > 0) {
        expert_width = relu2->latent;
        latent_in.emplace();
        latent_in->init(ps, prefix + ".fc1_latent_proj", hidden, expert_width, relu2->latent_bias);
        latent_out.emplace();
        latent_out->init(ps, prefix + ".fc2_latent_proj", expert_width, hidden, relu2->latent_bias);
      }
      gate_up = ps.add(prefix + ".experts.up_proj", {shard.count, inter, expert_width});
      down = ps.add(prefix + ".experts.down_proj", {shard.count, expert_width, inter});
      return;
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

int64_t SparseMoE::params_per_expert() const {
  if (relu2) return 2 * inter * expert_width;
  return 3 * inter * hidden + (gpt_oss ? 2 * inter + hidden : 0);
}

namespace {

// A whole-batch tensor from one chunk's rows: with one chunk the chunk's tensor is the whole; with
// several they are copied into `whole` (allocated by the caller) at the chunk's rows.
void put_chunk(Tensor& whole, const Tensor& part, size_t chunks, const SparseMoE::Chunk& ch) {
  if (chunks == 1) {
    whole = part;
    return;
  }
  Tensor rows = whole.slice0(ch.t0, ch.tc);
  const int64_t w = part.numel() / std::max<int64_t>(ch.tc, 1);
  ops::copy_columns(part, w, 0, 1, rows, w, 0, w);
}

Tensor rows_of(const Tensor& whole, size_t chunks, const SparseMoE::Chunk& ch) {
  return chunks == 1 ? whole : whole.slice0(ch.t0, ch.tc);
}

// weight_grad for every expert's dW[e] (other chunks and micro-batches add to the first). The
// first leaves experts without rows unwritten where the storage keeps row flags (one row per expert),
// and dW's sum of squares where the storage takes it (the norm then need not read dW).
void expert_weight_grad(ParamAccess& ps, size_t weight, const Tensor& dy, const Tensor& x, const std::vector<int64_t>& off) {
  bool accumulate = true;
  Tensor& dw = ps.grad_for_write(weight, accumulate);
  Tensor* written = accumulate ? nullptr : ps.written_rows(weight, dw.size(0));
  Tensor* squares = accumulate ? nullptr : ps.squares_out(weight);
  ops::grouped_linear_weight_grad(dy, x, off, dw, accumulate, written, squares);
}

}  // namespace

Tensor SparseMoE::activation(const Tensor& h) const {
  if (relu2) return ops::relu2(h);
  return gpt_oss ? ops::clamped_swiglu(h, gpt_oss->alpha, gpt_oss->limit) : ops::swiglu(h);
}

Tensor SparseMoE::activation_backward(const Tensor& h, const Tensor& d_act) const {
  if (relu2) return ops::relu2_backward(h, d_act);
  return gpt_oss ? ops::clamped_swiglu_backward(h, d_act, gpt_oss->alpha, gpt_oss->limit) : ops::swiglu_backward(h, d_act);
}

Tensor SparseMoE::forward(const ParamAccess& ps, const RunContext& ctx, const Tensor& x, RouterOut* router_out,
                          Cache* cache, const Tensor* forced, const std::function<void()>& alongside) const {
  const int64_t t = x.size(0);
  const Device dev = x.device();
  const DType dt = x.dtype();
  parallel::Communicator& group = ctx.ep ? *ctx.ep : one_rank_group();
  MF_CHECK(group.size() == ep_size, "internal: a MoE layer built for ", ep_size, " expert-parallel ranks runs over ",
           group.size());
  Tensor logits;
  if (grouped) {  // DeepseekV3TopkRouter computes its logits in fp32 whatever the model's dtype
    logits = ops::empty({t, experts}, DType::F32, dev, "router logits");
    ops::gemm(x, false, ps.value(router), true, logits);
  } else {
    logits = ops::linear(x, ps.value(router));
  }
  if (router_bias) ops::add_bias_rows(logits, ps.value(*router_bias));
  if (forced)
    MF_CHECK(forced->shape() == Shape({t, top_k}) && forced->dtype() == DType::I64, "forced routing must be I64 [", t,
             ", ", top_k, "], got ", shape_str(forced->shape()));
  // probs: the softmax (DeepSeek-V3: the sigmoid scores); weights come out final. GPT-OSS softmaxes
  // its top-k logits among themselves: the top-k of the softmax, renormalised, is the same. The
  // correction bias is read at full precision (an F32 buffer under autocast in Transformers).
  Tensor probs, weights, chosen;
  if (grouped)
    ops::grouped_sigmoid_route(logits, ps.exact(*correction_bias), grouped->n_group, grouped->topk_group, top_k,
                               norm_topk_prob, grouped->scaling, probs, weights, chosen, forced);
  else
    ops::router_softmax_topk(logits, top_k, renormalised(), probs, weights, chosen, forced);
  logits = Tensor();
  // The pairs in token chunks (one unless asked): each chunk's pairs, grouped by global expert
  // (hence by the rank holding it), go to their experts' ranks (here, with one rank), the local
  // experts run on their rows as grouped GEMMs, and the outputs come back to be summed with their
  // weights.
  const size_t n = static_cast<size_t>(std::max<int64_t>(1, std::min<int64_t>(ctx.ep_chunks, t)));
  std::vector<Chunk> chunks(n);
  const Tensor xe = latent_in ? latent_in->forward(ps, x) : x;  // the experts' input
  // The plans' device work and the permutations are queued before the host waits for the experts'
  // row counts (on a GPU they run while the counts travel), then the exchanges are set up.
  std::vector<Tensor> permuted(n);
  for (size_t i = 0; i < n; ++i) {
    Chunk& ch = chunks[i];
    ch.t0 = t * static_cast<int64_t>(i) / static_cast<int64_t>(n);
    ch.tc = t * static_cast<int64_t>(i + 1) / static_cast<int64_t>(n) - ch.t0;
    ch.plan = ops::plan_routing_started(rows_of(chosen, n, ch), experts);
    permuted[i] = ops::permute_tokens(rows_of(xe, n, ch), ch.plan);
  }
  std::vector<int64_t> expert_rows(static_cast<size_t>(experts), 0);
  for (size_t i = 0; i < n; ++i) {
    Chunk& ch = chunks[i];
    ops::finish_plan(ch.plan);
    for (int64_t e = 0; e < experts; ++e) expert_rows[e] += ch.plan.offsets[e + 1] - ch.plan.offsets[e];
    ch.exchange = std::make_shared<parallel::ExpertExchange>(group, ch.plan.offsets, dev);
  }
  const bool remote = group.size() > 1, fine_phases = n == 1;  // phase marks synchronise: not while overlapping
  std::vector<parallel::ExpertExchange::InFlight> going(n), coming(n);
  for (size_t i = 0; i < n; ++i) {
    going[i] = chunks[i].exchange->start_dispatch(std::move(permuted[i]));
    permuted[i] = Tensor();
  }
  if (remote && alongside) alongside();  // the shared experts while the rows travel
  if (fine_phases) ctx.phase("fwd: router + plan + permute");
  for (size_t i = 0; i < n; ++i) {
    Chunk& ch = chunks[i];
    const Tensor xs = ch.exchange->finish_dispatch(going[i]);
    going[i] = {};
    const std::vector<int64_t>& off = ch.exchange->local_offsets();
    const int64_t rows = xs.size(0);
    Tensor h = ops::empty({rows, relu2 ? inter : 2 * inter}, dt, dev, "expert gate_up output");
    if (gpt_oss) {  // x @ W with W [E, H, 2I]: the input-gradient product of that layout
      ops::grouped_linear_input_grad(xs, ps.value(gate_up), off, h);
      ops::grouped_add_bias(h, ps.value(*gate_up_bias), off);
    } else {
      ops::grouped_linear(xs, ps.value(gate_up), off, h);
    }
    if (lora) lora->gate_up_forward(ps, xs, off, h);
    if (fine_phases) ctx.phase("fwd: expert gate_up GEMM");
    const Tensor act = activation(h);
    Tensor y = ops::empty({rows, expert_width}, dt, dev, "expert output");
    if (gpt_oss) {
      ops::grouped_linear_input_grad(act, ps.value(down), off, y);
      ops::grouped_add_bias(y, ps.value(*down_bias), off);
    } else {
      ops::grouped_linear(act, ps.value(down), off, y);
    }
    if (lora) lora->down_forward(ps, act, off, y);
    if (fine_phases) ctx.phase("fwd: SwiGLU + expert down GEMM");
    coming[i] = ch.exchange->start_combine(y);
    if (cache) {
      ch.h = h;
      if (remote) ch.xs = xs;
    }
  }
  Tensor out = n == 1 ? Tensor() : ops::empty({t, expert_width}, dt, dev, "MoE output");
  for (size_t i = 0; i < n; ++i) {
    Chunk& ch = chunks[i];
    ch.y_perm = ch.exchange->finish_combine(coming[i]);
    coming[i] = {};
    put_chunk(out, ops::unpermute_tokens(ch.y_perm, rows_of(weights, n, ch), ch.plan), n, ch);
    if (!cache) ch = Chunk();
  }
  ctx.phase(fine_phases ? "fwd: unpermute" : "fwd: experts + exchanges (overlapped)");
  if (cache && latent_out) {
    cache->xe = xe;
    cache->out_latent = out;
  }
  if (latent_out) out = latent_out->forward(ps, out);
  if (router_out) {
    if (!grouped) router_out->probs = probs;
    router_out->chosen = chosen;
    router_out->expert_rows = std::move(expert_rows);
  }
  if (cache) {
    cache->x = x;
    cache->probs = probs;
    cache->chosen = chosen;
    cache->weights = weights;
    cache->chunks = std::move(chunks);
  }
  if (!remote && alongside) alongside();  // one rank: where it always ran, after the experts
  return out;
}

Tensor SparseMoE::backward(ParamAccess& ps, const RunContext& ctx, Cache& c, const Tensor& dy,
                           const Tensor* dprobs_extra, const std::function<void()>& alongside) const {
  // The same trips as forward: gradients to the experts' ranks, input gradients back.
  const size_t n = c.chunks.size();
  const bool fine_phases = n == 1;
  const int64_t t = dy.size(0);
  const Device dev = dy.device();
  const DType dt = dy.dtype();
  // Latent MoE: back through fc2 first; the experts' path then runs in the latent width.
  const Tensor d_out = latent_out ? latent_out->backward(ps, c.out_latent, dy) : dy;
  c.out_latent = Tensor();
  const Tensor& xe = latent_in ? c.xe : c.x;
  Tensor dweights = n == 1 ? Tensor() : ops::empty({t, top_k}, DType::F32, dev, "routing weight gradient");
  std::vector<parallel::ExpertExchange::InFlight> going(n), coming(n);
  for (size_t i = 0; i < n; ++i) {
    Chunk& ch = c.chunks[i];
    Tensor d_yperm, dw;
    ops::unpermute_tokens_backward(rows_of(d_out, n, ch), ch.y_perm, rows_of(c.weights, n, ch), ch.plan, d_yperm, dw);
    ch.y_perm = Tensor();
    put_chunk(dweights, dw, n, ch);
    going[i] = ch.exchange->start_dispatch(d_yperm);  // combine's backward
  }
  // Every chunk's exchange runs over the same group: whether rows go to other ranks is the layer's.
  const bool remote = n > 0 && c.chunks.front().exchange->crosses_ranks();
  if (remote && alongside) alongside();  // the shared experts' backward while the gradients travel
  if (fine_phases) ctx.phase("bwd: unpermute");
  for (size_t i = 0; i < n; ++i) {
    Chunk& ch = c.chunks[i];
    Tensor d_y = ch.exchange->finish_dispatch(going[i]);
    going[i] = {};
    const std::vector<int64_t>& off = ch.exchange->local_offsets();
    const int64_t rows = d_y.size(0);
    // Under expert parallelism (remote) the weight gradients wait until the input gradient is on its
    // way back: they are what the combine's all-to-all runs under (Megatron's and DeepSeek's overlap
    // of the backward's exchange). Within a chunk the order of the sums is unchanged.
    // Plain SwiGLU on one rank without LoRA: the activation comes out of its backward kernel (after
    // the input gradient, before the down projection's weight gradient) instead of a recompute
    // pass over gate_up. Otherwise it is recomputed here, where LoRA and the remote order need it.
    const bool act_from_backward = !relu2 && !gpt_oss && !lora && !remote;
    Tensor act = act_from_backward ? Tensor() : activation(ch.h);
    const auto down_weight_grads = [&](const Tensor& act_rows, const Tensor& d_y_rows) {
      if (gpt_oss) {  // y = act @ W_down + b: dW += act^T d_y
        if (ps.trainable(down)) expert_weight_grad(ps, down, act_rows, d_y_rows, off);
        if (ps.trainable(*down_bias)) ops::grouped_bias_grad(d_y_rows, off, ps.grad(*down_bias));
      } else if (ps.trainable(down)) {
        expert_weight_grad(ps, down, d_y_rows, act_rows, off);
      }
    };
    const auto gate_up_weight_grads = [&](const Tensor& xs_rows, const Tensor& d_h_rows) {
      if (gpt_oss) {
        if (ps.trainable(gate_up)) expert_weight_grad(ps, gate_up, xs_rows, d_h_rows, off);
        if (ps.trainable(*gate_up_bias)) ops::grouped_bias_grad(d_h_rows, off, ps.grad(*gate_up_bias));
      } else if (ps.trainable(gate_up)) {
        expert_weight_grad(ps, gate_up, d_h_rows, xs_rows, off);
      }
    };
    Tensor d_act = ops::empty({rows, inter}, dt, dev, "expert activation gradient");
    if (!remote && !act_from_backward) down_weight_grads(act, d_y);
    if (gpt_oss) ops::grouped_linear(d_y, ps.value(down), off, d_act);  // d(act) = d_y W^T; likewise for gate_up
    else ops::grouped_linear_input_grad(d_y, ps.value(down), off, d_act);
    if (lora) lora->down_backward(ps, act, off, d_y, d_act);
    Tensor d_h = act_from_backward ? ops::swiglu_backward(ch.h, d_act, &act) : activation_backward(ch.h, d_act);
    d_act = ch.h = Tensor();
    if (act_from_backward) down_weight_grads(act, d_y);
    if (!remote) act = d_y = Tensor();
    // The expert inputs: kept when they came from other ranks, else the permute again.
    Tensor xs = ch.xs.defined() ? ch.xs : ops::permute_tokens(rows_of(xe, n, ch), ch.plan);
    ch.xs = Tensor();
    Tensor d_xs = ops::empty({rows, expert_width}, dt, dev, "expert input gradient");
    if (!remote) gate_up_weight_grads(xs, d_h);
    if (gpt_oss) ops::grouped_linear(d_h, ps.value(gate_up), off, d_xs);
    else ops::grouped_linear_input_grad(d_h, ps.value(gate_up), off, d_xs);
    if (lora) lora->gate_up_backward(ps, xs, off, d_h, d_xs);
    if (!remote) xs = d_h = Tensor();  // freed before the combine's buffers are made
    coming[i] = ch.exchange->start_combine(d_xs);  // dispatch's backward
    if (remote) {
      down_weight_grads(act, d_y);
      gate_up_weight_grads(xs, d_h);
    }
  }
  if (fine_phases) ctx.phase("bwd: expert GEMMs + SwiGLU");
  Tensor dx = n == 1 ? Tensor() : ops::empty({t, expert_width}, dt, dev, "MoE input gradient");
  for (size_t i = 0; i < n; ++i) {
    Chunk& ch = c.chunks[i];
    put_chunk(dx, ops::permute_tokens_backward(ch.exchange->finish_combine(coming[i]), ch.plan), n, ch);
    coming[i] = {};
  }
  if (!fine_phases) ctx.phase("bwd: experts + exchanges (overlapped)");
  c.chunks.clear();
  if (latent_in) dx = latent_in->backward(ps, c.x, dx);  // the experts' input gradient, back to the hidden width
  c.xe = Tensor();
  // The router: routing weights -> logits (the discrete choice gets no gradient).
  Tensor dlogits;
  if (grouped) {
    MF_CHECK(!dprobs_extra, "internal: DeepSeek-V3 routing has no load-balancing loss");
    dlogits = ops::grouped_sigmoid_route_backward(c.probs, c.chosen, dweights, norm_topk_prob, grouped->scaling, dt);
  } else {
    dlogits = ops::router_backward(c.probs, c.chosen, c.weights, dweights, renormalised(), dprobs_extra, dt);
  }
  ops::gemm(dlogits, false, ps.value(router), false, dx, /*accumulate=*/true);
  if (ps.trainable(router)) weight_grad(ps, router, dlogits, c.x);
  if (router_bias && ps.trainable(*router_bias)) ops::bias_grad(dlogits, ps.grad(*router_bias));
  ctx.phase("bwd: permute + router");
  if (!remote && alongside) alongside();  // one rank: where it always ran, after the experts
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
    if (!r.probs.defined()) continue;  // a dense layer, or a router without the loss (DeepSeek's)
    MF_CHECK(static_cast<int64_t>(r.expert_rows.size()) == experts, "internal: a router's routed rows are missing");
    const Tensor p = r.probs.device().is_cpu() ? r.probs : ops::to_device(r.probs, Device::cpu(), DType::F32);
    const int64_t t = p.size(0);
    for (int64_t i = 0; i < t; ++i)
      for (int64_t e = 0; e < experts; ++e) st.prob[e] += p.f32()[i * experts + e];
    for (int64_t e = 0; e < experts; ++e) st.routed[e] += static_cast<double>(r.expert_rows[e]);
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
  const RoutingStats st = routing_stats(routers, experts, dp);
  if (st.rows == 0) return 0.f;
  // tokens_per_expert is a mean over rows of a [rows, top_k, E] one-hot, i.e. per slot; summing
  // over slots against the mean probability gives sum_e (routed_e / rows) * (prob_e / rows).
  double loss = 0;
  for (int64_t e = 0; e < experts; ++e) loss += (st.routed[e] / st.rows) * (st.prob[e] / st.rows);
  return static_cast<float>(loss * experts);
}

std::vector<float> load_balancing_prob_grad(const std::vector<SparseMoE::RouterOut>& routers, int64_t experts,
                                            parallel::Communicator* dp) {
  std::vector<float> g(static_cast<size_t>(experts), 0.f);
  const RoutingStats st = routing_stats(routers, experts, dp);
  if (st.rows == 0) return g;
  for (int64_t e = 0; e < experts; ++e) g[e] = static_cast<float>(experts * (st.routed[e] / st.rows) / st.rows);
  return g;
}

}  // namespace moeforge::nn
