// The decoder families' training step on the GPU (models::Decoder: Qwen3-MoE, Qwen2-MoE, Mixtral,
// OLMoE, GPT-OSS, DeepSeek-V3 with its MTP depths, and the dense Llama / Mistral / Qwen2 / Qwen3).
// Issue 16 replaces this file by the one layer loop of models/decoder running on ops:: (which
// dispatch on the device); until that runs on a GPU it is the GPU path. Per decoder layer:
//   n1 = rms(x); q,k,v = n1 W^T (+ biases); rms on q,k (per head, over the projection, or none);
//   clip_qkv clamp; RoPE; o = attention; x2 = x + o Wo^T (+ bias)
//   n2 = rms(x2); router softmax/top-k (or round-robin when balanced); permute by expert;
//   gate_up and down as grouped GEMMs around SwiGLU; weighted unpermute; the gated shared expert
//   beside them; x3 = x2 + moe (or x2 + the dense SwiGLU MLP)
// Under expert parallelism the permuted rows go to the ranks holding their experts between the
// permute and the GEMMs and come back before the unpermute (parallel/expert_exchange.h, the one
// exchange the CPU layers use too), optionally in
// token chunks whose exchanges run on the group's stream while other chunks' experts compute; the rows
// a rank received are kept for the backward instead of being recomputed (that would be a second
// exchange).
// and the backward mirrors it. Kept per layer for backward: the layer input, norm statistics,
// q/k before and after norm+RoPE, v, the attention output and its log-sum-exp, the router's
// probabilities and choice, the routing plan, the experts' gate_up output and their output. The
// permuted input and the SwiGLU output are recomputed (a gather and an elementwise pass) rather
// than kept. Under activation checkpointing only the layer input is kept and the layer is re-run.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cmath>
#include <memory>

#include "core/error.h"
#include "parallel/expert_exchange.h"
#include "gpu/gpu_model.h"
#include "models/decoder/decoder.h"
#include "ops/cuda/ops_cuda.h"
#include "ops/cuda/runtime.h"

namespace moeforge::gpu {

namespace {

// A MoE layer's pairs of one chunk of tokens [t0, t0 + tc): their routing plan and, under expert
// parallelism, their exchange and the rows this rank received for its experts.
struct ExpertChunk {
  int64_t t0 = 0, tc = 0;
  cuda::RoutingPlan plan;
  std::shared_ptr<parallel::ExpertExchange> exchange;  // null: every expert is on this GPU
  Tensor xs;      // expert parallelism: the rows received, by local expert
  Tensor gu, y;   // the experts' gate_up output (their rows), and their output back in pair order
  // The row offsets the grouped GEMMs take: this rank's local experts' under expert parallelism.
  const std::vector<int64_t>& offsets() const { return exchange ? exchange->local_offsets() : plan.offsets; }
};

struct LayerState {
  Tensor x, rstd1, n1;
  Tensor q_pre, k_pre, rstd_q, rstd_k, q, k, v, o, lse;  // q_pre/k_pre [T, heads * head_dim]
  Tensor q_unclipped, k_unclipped, v_unclipped;           // clip_qkv: the values before the clamp
  Tensor x2, rstd2, n2;
  Tensor probs, weights, chosen, gu;  // gu: a dense layer's gate_up output
  Tensor shared_gu, shared_y, shared_logit;  // the shared expert's gate_up, output and gate logit
  Tensor plain_shared_gu;                     // DeepSeek's ungated shared experts' gate_up output
  Tensor qa, qn, rstd_qa, latent, latent_n, rstd_kv;  // latent attention: q LoRA and the kv latent
  std::vector<ExpertChunk> chunks;
  std::vector<int64_t> expert_rows;   // pairs routed to each expert (the load-balancing loss)
};

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

class DecoderGpu : public GpuModel {
 public:
  DecoderGpu(const models::Decoder& m, DeviceParams params, GpuParallel par)
      : m_(m), par_(par), params_(std::move(params)), dt_(compute_dtype(params_.precision())) {
    for (const auto& L : m_.layers_) {
      if (const auto* moe = std::get_if<nn::SparseMoE>(&L.mlp)) {
        const int ep = par_.ep ? par_.ep->size() : 1;
        MF_CHECK(moe->shard.count * ep == moe->experts, "GPU model: the layers hold ", moe->shard.count, " of ",
                 moe->experts, " experts, but the expert-parallel group has ", ep, " ranks");
      }
    }
    // Each decoder layer's parameters, by their internal names' "model.layers.<l>." prefix.
    layer_params_.resize(m_.layers_.size());
    const auto& all = m_.params().all();
    for (size_t i = 0; i < all.size(); ++i)
      for (size_t l = 0; l < m_.layers_.size(); ++l)
        if (all[i].name.rfind("model.layers." + std::to_string(l) + ".", 0) == 0) layer_params_[l].push_back(i);
  }

  DeviceParams& params() override { return params_; }

  GpuStepResult forward_backward(const models::ForwardInputs& in, const GpuStepOptions& opts) override {
    MF_CHECK(in.labels, "forward_backward needs labels");
    MF_CHECK(!in.routing, "GPU training: routing record/replay is not supported on the GPU (use balanced_routing)");
    const auto t0 = std::chrono::steady_clock::now();
    phases_.start();
    MF_CHECK(opts.mtp_scales.empty() || opts.mtp_scales.size() == m_.mtp_.size(), "training asks for ",
             opts.mtp_scales.size(), " multi-token prediction depths, the model has ", m_.mtp_.size());
    Inputs bt = upload(in, opts.balanced_routing);
    const size_t nl = m_.main_layers_;
    std::vector<LayerState> st(nl);
    // Under ZeRO-3 (DeviceParams::sharded) a group of parameters exists whole only from gather()
    // until release(), or until `ready` has summed its gradients into this rank's blocks.
    params_.gather({m_.embed_});
    Tensor x = cuda::embedding(bt.ids, value(m_.embed_));
    if (m_.embed_ != m_.lm_head_) params_.release({m_.embed_});
    phases_.mark("fwd: inputs + embedding");
    for (size_t l = 0; l < nl; ++l) {
      params_.gather(layer_params_[l]);
      // The next layer's (or the head's) weights travel while this layer computes.
      if (l + 1 < nl) params_.prefetch(layer_params_[l + 1]);
      else params_.prefetch({m_.final_norm_.weight, m_.lm_head_});
      if (opts.activation_checkpointing) {
        LayerState tmp;
        Tensor next = layer_forward(l, x, bt, tmp);
        st[l].x = x;
        st[l].expert_rows = tmp.expert_rows;  // the aux loss needs every layer's counts
        if (aux_enabled()) st[l].probs = tmp.probs;
        x = next;
      } else {
        x = layer_forward(l, x, bt, st[l]);
      }
      params_.release(layer_params_[l]);
    }
    params_.gather({m_.final_norm_.weight, m_.lm_head_});
    Tensor rstd_f;
    Tensor xf = cuda::rms_norm(x, value(m_.final_norm_.weight), m_.final_norm_.eps, &rstd_f);
    Tensor targets = cuda::to_device(models::shifted_targets(*in.labels), DType::I64);
    phases_.mark("fwd: final norm");
    GpuStepResult res;
    Tensor d_xf;
    res.ce_sum = cuda::fused_linear_cross_entropy(xf, value(m_.lm_head_), targets, -100, opts.ce_scale, d_xf,
                                                  params_.grad(m_.lm_head_), &res.tokens);
    phases_.mark("fused LM head + loss (fwd and its grads)");
    // Parameters whose gradients are complete: ZeRO-3 sums them into this rank's blocks and frees
    // the whole values; then the optimizer-in-backward callback, if any.
    auto ready = [&](std::vector<size_t> idx) {
      params_.scatter_grads(idx);
      params_.release(idx);
      if (opts.on_grads_ready) opts.on_grads_ready(idx);
    };
    if (!opts.mtp_scales.empty()) {
      cuda::add_inplace(d_xf, mtp_train(in, bt, xf, opts, res, ready));
      phases_.mark("multi-token prediction (fwd and bwd)");
    }
    if (m_.lm_head_ != m_.embed_) ready({m_.lm_head_});  // tied: complete after the embedding backward
    cuda::synchronize();
    res.forward_ms = ms_since(t0);
    const auto t1 = std::chrono::steady_clock::now();
    Tensor dprobs_aux = aux_gradient(st, opts.aux_scale, &res.aux_loss);
    xf = Tensor();
    Tensor dx = cuda::rms_norm_backward(x, value(m_.final_norm_.weight), rstd_f, d_xf, params_.grad(m_.final_norm_.weight));
    d_xf = Tensor();
    ready({m_.final_norm_.weight});
    for (size_t l = nl; l-- > 0;) {
      params_.gather(layer_params_[l]);
      if (l > 0) params_.prefetch(layer_params_[l - 1]);
      if (opts.activation_checkpointing) {
        Tensor x_in = st[l].x;
        st[l] = LayerState();
        layer_forward(l, x_in, bt, st[l], &bt.chosen_record[l]);
      }
      dx = layer_backward(l, st[l], bt, dx, dprobs_aux.defined() ? &dprobs_aux : nullptr);
      st[l] = LayerState();
      ready(layer_params_[l]);
      phases_.mark("bwd: optimizer in backward");
    }
    cuda::embedding_backward(bt.ids, dx, params_.grad(m_.embed_), m_.config().pad_token_id.value_or(-1));
    ready({m_.embed_});
    phases_.mark("bwd: embedding");
    cuda::synchronize();
    res.backward_ms = ms_since(t1);
    last_chosen_.assign(bt.chosen_record.begin(), bt.chosen_record.begin() + static_cast<std::ptrdiff_t>(nl));
    return res;
  }

  std::vector<Tensor> last_routing() const override {
    std::vector<Tensor> out;
    for (const Tensor& c : last_chosen_)
      if (c.defined()) out.push_back(cuda::to_host_f32(c));  // I64 stays I64
    return out;
  }

  Tensor forward_logits(const models::ForwardInputs& in) override {
    Inputs bt = upload(in, false);
    params_.gather({m_.embed_});
    Tensor x = cuda::embedding(bt.ids, value(m_.embed_));
    params_.release({m_.embed_});
    for (size_t l = 0; l < m_.main_layers_; ++l) {
      LayerState s;
      params_.gather(layer_params_[l]);
      x = layer_forward(l, x, bt, s);
      params_.release(layer_params_[l]);
    }
    params_.gather({m_.final_norm_.weight, m_.lm_head_});
    Tensor xf = cuda::rms_norm(x, value(m_.final_norm_.weight), m_.final_norm_.eps);
    Tensor logits = cuda::linear(xf, value(m_.lm_head_));
    params_.release({m_.final_norm_.weight, m_.lm_head_});
    return cuda::to_host_f32(logits).view({bt.b, bt.s, m_.cfg_.vocab_size});
  }

 private:
  struct Inputs {
    int64_t b = 0, s = 0, t = 0;
    Tensor ids, cos, sin, docs, balanced;
    const Tensor* doc_ids = nullptr;
    // Under activation checkpointing, each layer's expert choice in the first forward, replayed by
    // the recomputation so backward sees the same routing even where near-ties could flip.
    std::vector<Tensor> chosen_record;
  };

  // DeepSeek-V3's multi-token prediction depths, forward then backward (the computation of
  // models::Decoder::mtp_train): `h0` is the main model's final-norm output; returns d(h0) from the
  // depths. The LM head's gradient accumulates each depth's; a depth's own parameters are reported
  // ready once its backward is done.
  struct MtpState {
    Tensor ids, embed, rstd_e, rstd_h, joined, y, rstd_y, h;
    LayerState layer;
  };
  template <typename Ready>
  Tensor mtp_train(const models::ForwardInputs& in, Inputs& bt, const Tensor& h0, const GpuStepOptions& opts,
                   GpuStepResult& res, Ready& ready) {
    const auto& mtp = m_.mtp_;
    const int64_t t = bt.t, h = m_.cfg_.hidden_size;
    std::vector<MtpState> st(mtp.size());
    res.mtp_ce_sums.assign(mtp.size(), 0.0);
    res.mtp_tokens.assign(mtp.size(), 0);
    Tensor prev = h0;
    params_.gather({m_.embed_});  // the embedding of tokens t+k (ZeRO-3: whole for the depths' run)
    for (size_t k = 0; k < mtp.size(); ++k) {
      const auto& d = mtp[k];
      MtpState& c = st[k];
      const int64_t depth = static_cast<int64_t>(k + 1);
      params_.gather(layer_params_[d.layer]);
      c.ids = cuda::to_device(models::mtp_input_ids(in.input_ids, depth, nullptr).view({t}), DType::I64);
      c.embed = cuda::embedding(c.ids, value(m_.embed_));
      zero_row_ends(c.embed, bt, depth);  // no token t+k there (models::Decoder does the same)
      c.joined = cuda::empty({t, 2 * h}, dt_, "MTP [enorm | hnorm]");
      cuda::copy_columns(cuda::rms_norm(c.embed, value(d.enorm.weight), d.enorm.eps, &c.rstd_e), h, 0, 1, c.joined,
                         2 * h, 0, h);
      cuda::copy_columns(cuda::rms_norm(prev, value(d.hnorm.weight), d.hnorm.eps, &c.rstd_h), h, 0, 1, c.joined,
                         2 * h, h, h);
      c.y = layer_forward(d.layer, projection(d.eh_proj, c.joined), bt, c.layer);
      c.h = cuda::rms_norm(c.y, value(d.head_norm.weight), d.head_norm.eps, &c.rstd_y);
      prev = c.h;
      params_.release(layer_params_[d.layer]);
    }
    Tensor d_next;
    for (size_t k = mtp.size(); k-- > 0;) {
      const auto& d = mtp[k];
      MtpState& c = st[k];
      const int64_t depth = static_cast<int64_t>(k + 1);
      params_.gather(layer_params_[d.layer]);
      const Tensor targets = cuda::to_device(models::mtp_targets(*in.labels, in.doc_ids, depth), DType::I64);
      Tensor dh;
      res.mtp_ce_sums[k] = cuda::fused_linear_cross_entropy(c.h, value(m_.lm_head_), targets, -100, opts.mtp_scales[k],
                                                            dh, params_.grad(m_.lm_head_), &res.mtp_tokens[k]);
      if (d_next.defined()) cuda::add_inplace(dh, d_next);
      const Tensor dy = cuda::rms_norm_backward(c.y, value(d.head_norm.weight), c.rstd_y, dh, params_.grad(d.head_norm.weight));
      dh = Tensor();
      const Tensor dx = layer_backward(d.layer, c.layer, bt, dy, nullptr);
      Tensor djoined = cuda::empty({t, 2 * h}, dt_, "MTP [enorm | hnorm] gradient");
      projection_backward(d.eh_proj, c.joined, dx, djoined, false);
      Tensor den = cuda::empty({t, h}, dt_, "MTP enorm gradient"), dhn = cuda::empty({t, h}, dt_, "MTP hnorm gradient");
      cuda::copy_columns(djoined, 2 * h, 0, 1, den, h, 0, h);
      cuda::copy_columns(djoined, 2 * h, h, 1, dhn, h, 0, h);
      Tensor de = cuda::rms_norm_backward(c.embed, value(d.enorm.weight), c.rstd_e, den, params_.grad(d.enorm.weight));
      zero_row_ends(de, bt, depth);
      cuda::embedding_backward(c.ids, de, params_.grad(m_.embed_), m_.config().pad_token_id.value_or(-1));
      d_next = cuda::rms_norm_backward(k == 0 ? h0 : st[k - 1].h, value(d.hnorm.weight), c.rstd_h, dhn,
                                       params_.grad(d.hnorm.weight));
      st[k] = MtpState();
      ready(layer_params_[d.layer]);
    }
    if (m_.embed_ != m_.lm_head_) params_.release({m_.embed_});
    return d_next;
  }

  // Zeroes the last `n` positions of every row of x [B*S, ...].
  static void zero_row_ends(Tensor& x, const Inputs& bt, int64_t n) {
    const int64_t tail = std::min(n, bt.s);
    for (int64_t b = 0; b < bt.b; ++b) {
      Tensor rows = x.slice0(b * bt.s + bt.s - tail, tail);
      cuda::zero(rows);
    }
  }

  bool aux_enabled() const { return m_.cfg_.output_router_logits; }
  bool expert_parallel() const { return par_.ep && par_.ep->size() > 1; }
  // Token chunks of a MoE layer under expert parallelism (MOEFORGE_EP_CHUNKS, default 1: no
  // overlap of the exchange with the experts). 2 chunks measured slower on 2 H200s at EP 2 (8,443
  // against 8,895 tok/s, q30 48 layers): half-size expert GEMMs, twice the routing plans and
  // count exchanges, and NCCL's copies taking SMs from the GEMMs cost more than the hidden
  // exchange saved (docs/perf-notes.md). Kept for larger expert-parallel groups, where the
  // exchange is a larger share.
  static int ep_chunks(int64_t tokens) {
    static const int configured = [] {
      const char* v = std::getenv("MOEFORGE_EP_CHUNKS");
      const int n = v ? std::atoi(v) : 1;
      MF_CHECK(n >= 1 && n <= 16, "MOEFORGE_EP_CHUNKS must be 1..16, got '", v ? v : "", "'");
      return n;
    }();
    return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(configured, tokens)));
  }
  const Tensor& value(size_t i) const { return params_.value(i); }

  Inputs upload(const models::ForwardInputs& in, bool balanced) {
    MF_CHECK(in.input_ids.dim() == 2 && in.input_ids.dtype() == DType::I64, "input_ids must be an I64 [batch, seq] tensor");
    Inputs bt;
    bt.b = in.input_ids.size(0);
    bt.s = in.input_ids.size(1);
    bt.t = bt.b * bt.s;
    bt.ids = cuda::to_device(in.input_ids.view({bt.t}), DType::I64);
    // The RoPE tables of the default positions depend on the shape only: computed on the host and
    // uploaded once per shape (they cost milliseconds per step otherwise).
    if (in.position_ids || cached_.b != bt.b || cached_.s != bt.s) {
      const models::Decoder::Batch hb = m_.prepare(in);
      bt.cos = cuda::to_device(hb.cos, DType::F32);
      bt.sin = cuda::to_device(hb.sin, DType::F32);
      if (!in.position_ids) cached_ = {bt.b, bt.s, bt.cos, bt.sin, Tensor()};
    } else {
      bt.cos = cached_.cos;
      bt.sin = cached_.sin;
    }
    if (in.doc_ids) {
      MF_CHECK(in.doc_ids->shape() == in.input_ids.shape(), "doc_ids must match input_ids");
      bt.docs = cuda::to_device(*in.doc_ids, DType::I64);
      bt.doc_ids = &bt.docs;
    }
    if (balanced) {
      if (!cached_.balanced.defined() || cached_.balanced.size(0) != bt.t) {
        // Token t's slot j goes to expert (t*k + j) mod E: every expert gets the same number of
        // rows (when E divides T*k) and a token's k experts are distinct (k <= E).
        const int64_t k = m_.cfg_.num_experts_per_tok, e = m_.cfg_.num_experts;
        std::vector<int64_t> idx(static_cast<size_t>(bt.t * k));
        for (int64_t i = 0; i < bt.t * k; ++i) idx[i] = i % e;
        cached_.balanced = cuda::to_device(Tensor::from_i64(idx, {bt.t, k}), DType::I64);
      }
      bt.balanced = cached_.balanced;
    }
    bt.chosen_record.resize(m_.layers_.size());
    return bt;
  }

  // Device copies reused across steps of the same shape.
  struct Cached {
    int64_t b = -1, s = -1;
    Tensor cos, sin, balanced;
  } cached_;

  Tensor layer_forward(size_t l, const Tensor& x, Inputs& bt, LayerState& c, const Tensor* replay = nullptr) {
    const auto& L = m_.layers_[l];
    c.x = x;
    c.n1 = cuda::rms_norm(x, value(L.input_norm.weight), L.input_norm.eps, &c.rstd1);
    Tensor a = L.mla ? latent_attention_forward(*L.mla, c, bt) : attention_forward(L.attn, c, bt);
    c.x2 = cuda::copy(x, "the residual stream");
    c.n2 = cuda::add_rms_norm(a, c.x2, value(L.post_attention_norm.weight), L.post_attention_norm.eps, &c.rstd2);
    a = Tensor();
    phases_.mark("fwd: attention block");
    Tensor out;
    if (const auto* dense = std::get_if<nn::DenseMLP>(&L.mlp)) {
      out = dense_forward(*dense, c.n2, c.gu);
      cuda::add_inplace(out, c.x2);
      return out;
    }
    return moe_forward(l, L, c, bt, replay);
  }

  // GQA attention with the family's variants: q/k/v (+ biases), norms, clamp, RoPE, the attention
  // core (+ sinks), o_proj. Returns the attention block's output [T, hidden].
  Tensor attention_forward(const nn::Attention& A, LayerState& c, Inputs& bt) {
    const int64_t t = bt.t, hd = A.head_dim;
    c.q_pre = projection(A.q_proj, c.n1);
    c.k_pre = projection(A.k_proj, c.n1);
    c.v = projection(A.v_proj, c.n1);
    c.q = qk_normalise(A, A.q_norm, c.q_pre, A.heads, c.rstd_q, c.q_unclipped).view({t, A.heads, hd});
    c.k = qk_normalise(A, A.k_norm, c.k_pre, A.kv_heads, c.rstd_k, c.k_unclipped).view({t, A.kv_heads, hd});
    if (A.clip) {
      c.v_unclipped = cuda::copy(c.v, "v before the clamp");
      cuda::clamp_inplace(c.v, *A.clip);
    }
    c.v = c.v.view({bt.b, bt.s, A.kv_heads, hd});
    cuda::rope_inplace(c.q, bt.cos, bt.sin);
    cuda::rope_inplace(c.k, bt.cos, bt.sin);
    c.q = c.q.view({bt.b, bt.s, A.heads, hd});
    c.k = c.k.view({bt.b, bt.s, A.kv_heads, hd});
    phases_.mark("fwd: norm + qkv + rope");
    c.o = cuda::attention(c.q, c.k, c.v, scale(A), window(A), bt.doc_ids, &c.lse, A.sinks ? &value(*A.sinks) : nullptr);
    phases_.mark("fwd: attention core");
    return projection(A.o_proj, c.o.view({t, A.heads * hd}));
  }

  // DeepSeek-V3's latent attention, as nn::LatentAttention::forward computes it.
  Tensor latent_attention_forward(const nn::LatentAttention& M, LayerState& c, Inputs& bt) {
    const int64_t t = bt.t, h = M.heads, qk = M.nope + M.rope, kvw = M.nope + M.v_dim;
    Tensor q;
    if (M.q_proj) {
      q = projection(*M.q_proj, c.n1);
    } else {
      c.qa = projection(*M.q_a_proj, c.n1);
      c.qn = cuda::rms_norm(c.qa, value(M.q_a_norm->weight), M.q_a_norm->eps, &c.rstd_qa);
      q = projection(*M.q_b_proj, c.qn);
    }
    const Tensor ckv = projection(M.kv_a_proj, c.n1);
    c.latent = cuda::empty({t, M.kv_rank}, dt_, "kv latent");
    cuda::copy_columns(ckv, M.kv_rank + M.rope, 0, 1, c.latent, M.kv_rank, 0, M.kv_rank);
    Tensor k_rope = cuda::empty({t, 1, M.rope}, dt_, "shared rotary key");
    cuda::copy_columns(ckv, M.kv_rank + M.rope, M.kv_rank, 1, k_rope, M.rope, 0, M.rope);
    k_rope = rotate(k_rope, bt, M.interleave);
    c.latent_n = cuda::rms_norm(c.latent, value(M.kv_a_norm.weight), M.kv_a_norm.eps, &c.rstd_kv);
    const Tensor kvb = cuda::linear(c.latent_n, value(M.kv_b_proj.weight));  // [T, H * (nope + v)]
    Tensor q_rope = cuda::empty({t, h, M.rope}, dt_, "rotary queries");
    cuda::copy_columns(q, qk, M.nope, 1, q_rope, M.rope, 0, M.rope);
    q_rope = rotate(q_rope, bt, M.interleave);
    cuda::copy_columns(q_rope, M.rope, 0, 1, q, qk, M.nope, M.rope);
    Tensor k = cuda::empty({t * h, qk}, dt_, "keys");
    cuda::copy_columns(kvb, kvw, 0, 1, k, qk, 0, M.nope);
    cuda::copy_columns(k_rope, M.rope, 0, h, k, qk, M.nope, M.rope);  // the shared key, to every head
    c.q = q.view({bt.b, bt.s, h, qk});
    c.k = k.view({bt.b, bt.s, h, qk});
    // The fused (cuDNN) attention here takes one head dim: v is zero-padded to q/k's width, which
    // leaves the output's first v_dim columns exact and the rest zero (PV over 192 instead of 128
    // columns, against the CUDA-core kernels' several times slower exact-width path).
    const int64_t vw = mla_v_width(M, c.q, bt);
    Tensor v = cuda::empty({t * h, vw}, dt_, "values");
    if (vw != M.v_dim) cuda::zero(v);
    cuda::copy_columns(kvb, kvw, M.nope, 1, v, vw, 0, M.v_dim);
    c.v = v.view({bt.b, bt.s, h, vw});
    phases_.mark("fwd: latent projections + rope");
    c.o = cuda::attention(c.q, c.k, c.v, M.scale, 0, bt.doc_ids, &c.lse);
    phases_.mark("fwd: attention core");
    return projection(M.o_proj, mla_output(M, c.o, t));
  }

  // The width v gets for the attention core: v_dim, or q/k's where the fused attention takes it.
  static int64_t mla_v_width(const nn::LatentAttention& M, const Tensor& q, const Inputs& bt) {
    const int64_t qk = M.nope + M.rope;
    return M.v_dim < qk && std::string(cuda::attention_backend(q, 0, bt.doc_ids)) == "cudnn" ? qk : M.v_dim;
  }

  // The attention output's real columns [T, H * v_dim] (a copy when v was padded).
  Tensor mla_output(const nn::LatentAttention& M, const Tensor& o, int64_t t) const {
    const int64_t vw = o.size(3);
    if (vw == M.v_dim) return o.view({t, M.heads * M.v_dim});
    Tensor real = cuda::empty({t, M.heads * M.v_dim}, dt_, "attention output");
    cuda::copy_columns(o, vw, 0, 1, real, M.v_dim, 0, M.v_dim);
    return real;
  }

  // x [T, n, rope] rotated by position (a new tensor; DeepSeek's interleaved pairs de-interleaved first).
  Tensor rotate(const Tensor& x, const Inputs& bt, bool interleave) {
    Tensor y = interleave ? cuda::deinterleave_pairs(x, x.size(2)) : cuda::copy(x, "rotary part");
    cuda::rope_inplace(y, bt.cos, bt.sin);
    return y;
  }

  Tensor rotate_backward(const Tensor& dy, const Inputs& bt, bool interleave) {
    Tensor d = cuda::copy(dy, "rotary gradient");
    cuda::rope_inplace(d, bt.cos, bt.sin, /*inverse=*/true);
    return interleave ? cuda::interleave_pairs(d, d.size(2)) : d;
  }

  // The MoE block from n2: routing, the experts (exchanged under expert parallelism), the shared
  // experts, and the residual.
  Tensor moe_forward(size_t l, const models::Decoder::Layer& L, LayerState& c, Inputs& bt, const Tensor* replay) {
    const int64_t t = bt.t;
    Tensor out;
    const auto& moe = std::get<nn::SparseMoE>(L.mlp);
    Tensor logits;
    if (moe.grouped) {  // DeepseekV3TopkRouter computes its logits in fp32 whatever the model's dtype
      logits = cuda::empty({t, moe.experts}, DType::F32, "router logits");
      cuda::gemm(c.n2, false, value(moe.router), true, logits);
    } else {
      logits = cuda::linear(c.n2, value(moe.router));
    }
    if (moe.router_bias) cuda::add_bias_rows(logits, value(*moe.router_bias));
    const Tensor* forced = replay ? replay : (bt.balanced.defined() ? &bt.balanced : nullptr);
    // The correction bias in F32 under bf16-mixed (the F32 master: an F32 buffer under autocast in
    // Transformers), in BF16 under bf16 (as on a BF16 model).
    if (moe.grouped)
      cuda::grouped_sigmoid_route(logits, params_.has_masters() ? params_.master(*moe.correction_bias) : value(*moe.correction_bias),
                                  moe.grouped->n_group, moe.grouped->topk_group,
                                  moe.top_k, moe.norm_topk_prob, moe.grouped->scaling, c.probs, c.weights, c.chosen, forced);
    else
      cuda::router_softmax_topk(logits, moe.top_k, moe.renormalised(), c.probs, c.weights, c.chosen, forced);
    if (!replay) bt.chosen_record[l] = c.chosen;
    // The pairs in token chunks (one without expert parallelism): every chunk's rows start
    // travelling, then each chunk's experts run while later chunks' rows travel and earlier
    // chunks' outputs travel back.
    const int n = expert_parallel() ? ep_chunks(t) : 1;
    const bool fine_phases = n == 1;  // phase marks synchronise: only where nothing overlaps
    c.chunks.assign(static_cast<size_t>(n), ExpertChunk{});
    c.expert_rows.assign(static_cast<size_t>(moe.experts), 0);
    for (int i = 0; i < n; ++i) {
      ExpertChunk& ch = c.chunks[i];
      ch.t0 = t * i / n;
      ch.tc = t * (i + 1) / n - ch.t0;
      ch.plan = cuda::plan_routing(n == 1 ? c.chosen : c.chosen.slice0(ch.t0, ch.tc), moe.experts);
      for (int64_t e = 0; e < moe.experts; ++e) c.expert_rows[e] += ch.plan.offsets[e + 1] - ch.plan.offsets[e];
      if (expert_parallel())
        ch.exchange = std::make_shared<parallel::ExpertExchange>(*par_.ep, ch.plan.offsets, ch.plan.dest_row.device());
    }
    if (phases_.enabled()) note_routing(l, c.expert_rows);
    std::vector<parallel::ExpertExchange::InFlight> going(n), coming(n);
    for (int i = 0; i < n; ++i) {
      ExpertChunk& ch = c.chunks[i];
      Tensor xp = cuda::permute_tokens(n == 1 ? c.n2 : c.n2.slice0(ch.t0, ch.tc), ch.plan);
      if (ch.exchange)
        going[i] = ch.exchange->start_dispatch(xp);
      else
        going[i].buffer = xp;
    }
    phases_.mark(fine_phases ? "fwd: router + plan + permute" : "fwd: router + plan + permute + exchange plans");
    for (int i = 0; i < n; ++i) {
      ExpertChunk& ch = c.chunks[i];
      Tensor xs = ch.exchange ? ch.exchange->finish_dispatch(going[i]) : going[i].buffer;
      going[i] = {};
      if (ch.exchange) ch.xs = xs;  // kept: recomputing it would be a second exchange
      const std::vector<int64_t>& offsets = ch.offsets();
      const int64_t rows = offsets.back();
      ch.gu = cuda::empty({rows, 2 * moe.inter}, dt_, "expert gate_up output");
      if (moe.gpt_oss) {  // x @ W with W [E, H, 2I]: the input-gradient product of a [E, H, 2I] weight
        cuda::grouped_linear_input_grad(xs, value(moe.gate_up), offsets, ch.gu);
        cuda::grouped_add_bias(ch.gu, value(*moe.gate_up_bias), offsets);
      } else {
        cuda::grouped_linear(xs, value(moe.gate_up), offsets, ch.gu);
      }
      xs = Tensor();
      if (fine_phases) phases_.mark("fwd: expert gate_up GEMM");
      Tensor act = expert_activation(moe, ch.gu);
      if (fine_phases) phases_.mark("fwd: SwiGLU");
      Tensor y = cuda::empty({rows, moe.hidden}, dt_, "expert output");
      if (moe.gpt_oss) {
        cuda::grouped_linear_input_grad(act, value(moe.down), offsets, y);
        cuda::grouped_add_bias(y, value(*moe.down_bias), offsets);
      } else {
        cuda::grouped_linear(act, value(moe.down), offsets, y);
      }
      act = Tensor();
      if (fine_phases) phases_.mark("fwd: expert down GEMM");
      if (ch.exchange)
        coming[i] = ch.exchange->start_combine(y);
      else
        coming[i].buffer = y;
    }
    out = n == 1 ? Tensor() : cuda::empty({t, moe.hidden}, dt_, "MoE output");
    for (int i = 0; i < n; ++i) {
      ExpertChunk& ch = c.chunks[i];
      ch.y = ch.exchange ? ch.exchange->finish_combine(coming[i]) : coming[i].buffer;
      coming[i] = {};
      put_chunk(out, cuda::unpermute_tokens(ch.y, n == 1 ? c.weights : c.weights.slice0(ch.t0, ch.tc), ch.plan), n, ch);
    }
    if (!fine_phases) phases_.mark("fwd: experts + exchanges (overlapped)");
    if (L.shared) {  // Qwen2-MoE: sigmoid(n2 . w) * mlp(n2) beside the routed experts
      c.shared_y = dense_forward(L.shared->mlp, c.n2, c.shared_gu);
      c.shared_logit = cuda::linear(c.n2, value(L.shared->gate.weight));
      cuda::add_sigmoid_gated(out, c.shared_y, c.shared_logit);
    }
    if (L.shared_experts) cuda::add_inplace(out, dense_forward(*L.shared_experts, c.n2, c.plain_shared_gu));
    cuda::add_inplace(out, c.x2);
    phases_.mark("fwd: unpermute + residual");
    return out;
  }

  // Under MOEFORGE_PHASE_TIMES: the spread of rows over experts per layer (the load native routing gives).
  void note_routing(size_t l, const std::vector<int64_t>& rows_per_expert) {
    int64_t used = 0, mx = 0, mn = INT64_MAX;
    for (const int64_t r : rows_per_expert) {
      used += r > 0;
      mx = std::max(mx, r);
      mn = std::min(mn, r);
    }
    phases_.note("routing layer " + std::to_string(l), "experts used " + std::to_string(used) + ", rows min " +
                                                          std::to_string(mn) + " max " + std::to_string(mx));
  }

  // A whole-batch tensor from one chunk's rows: with one chunk the chunk's tensor is taken as it
  // is; with several they are copied into `whole` (allocated by the caller) at the chunk's rows.
  static void put_chunk(Tensor& whole, const Tensor& part, int chunks, const ExpertChunk& ch) {
    if (chunks == 1) {
      whole = part;
      return;
    }
    Tensor rows = whole.slice0(ch.t0, ch.tc);
    cuda::convert(part, rows);
  }

  Tensor expert_activation(const nn::SparseMoE& moe, const Tensor& gu) const {
    return moe.gpt_oss ? cuda::clamped_swiglu(gu, moe.gpt_oss->alpha, moe.gpt_oss->limit) : cuda::swiglu(gu);
  }

  // y = x W^T (+ b) of a projection, biased or not.
  Tensor projection(const nn::Linear& lin, const Tensor& x) const {
    Tensor y = cuda::linear(x, value(lin.weight));
    if (lin.bias) cuda::add_bias_rows(y, value(*lin.bias));
    return y;
  }

  // A projection's backward from dy: its weight (and bias) gradients accumulate; d(x) is added to
  // `dx` when `accumulate_dx`, else written.
  void projection_backward(const nn::Linear& lin, const Tensor& x, const Tensor& dy, Tensor& dx, bool accumulate_dx) {
    cuda::gemm(dy, false, value(lin.weight), false, dx, accumulate_dx);
    cuda::gemm(dy, true, x, false, params_.grad(lin.weight), true);
    if (lin.bias) cuda::bias_grad(dy, params_.grad(*lin.bias));
  }

  // q or k [T, n * head_dim] through its RMSNorm (per head, or over the whole projection; none:
  // returned as is, RoPE then rotates `pre` itself, which backward does not need) and the clamp.
  Tensor qk_normalise(const nn::Attention& A, const std::optional<nn::RMSNorm>& norm, const Tensor& pre, int64_t n,
                      Tensor& rstd, Tensor& unclipped) {
    const int64_t t = pre.size(0), hd = A.head_dim;
    Tensor y = pre;
    if (norm && A.full_qk_norm) y = cuda::rms_norm(pre, value(norm->weight), norm->eps, &rstd);
    else if (norm) y = cuda::rms_norm(pre.view({t * n, hd}), value(norm->weight), norm->eps, &rstd).view({t, n * hd});
    if (A.clip) {
      unclipped = cuda::copy(y, "q/k before the clamp");
      cuda::clamp_inplace(y, *A.clip);
    }
    return y;
  }

  // d(pre) from d(q or k) [T, n * head_dim] (modified in place by the clamp's backward).
  Tensor qk_normalise_backward(const nn::Attention& A, const std::optional<nn::RMSNorm>& norm, const Tensor& pre,
                               const Tensor& rstd, const Tensor& unclipped, Tensor dy, int64_t n) {
    const int64_t t = dy.size(0), hd = A.head_dim;
    if (A.clip) cuda::clamp_backward_inplace(unclipped, dy, *A.clip);
    if (!norm) return dy;
    if (A.full_qk_norm) return cuda::rms_norm_backward(pre, value(norm->weight), rstd, dy, params_.grad(norm->weight));
    return cuda::rms_norm_backward(pre.view({t * n, hd}), value(norm->weight), rstd, dy.view({t * n, hd}),
                                   params_.grad(norm->weight))
        .view({t, n * hd});
  }

  // A dense MLP's gate and up weights [I,H] each (and biases [I]), stacked as one [2I,H] ([2I])
  // with gate rows first so one GEMM yields SwiGLU's input; device copies per call (dense layers
  // and shared experts are the smaller part of a MoE model).
  Tensor stacked(const nn::DenseMLP& mlp, bool bias) const {
    const Tensor& g = value(bias ? *mlp.gate_proj.bias : mlp.gate_proj.weight);
    const Tensor& u = value(bias ? *mlp.up_proj.bias : mlp.up_proj.weight);
    Shape shape = g.shape();
    shape[0] += u.size(0);
    Tensor w = cuda::empty(shape, dt_, "dense gate_up weight");
    Tensor top = w.slice0(0, g.size(0)), bottom = w.slice0(g.size(0), u.size(0));
    cuda::convert(g, top);
    cuda::convert(u, bottom);
    return w;
  }

  // down(silu(gate(x)) * up(x)); keeps the gate_up output in `gu` for the backward.
  Tensor dense_forward(const nn::DenseMLP& mlp, const Tensor& x, Tensor& gu) {
    gu = cuda::linear(x, stacked(mlp, false));
    if (mlp.gate_proj.bias) cuda::add_bias_rows(gu, stacked(mlp, true));
    return projection(mlp.down_proj, cuda::swiglu(gu));
  }

  // Dense MLP backward: accumulates its weight (and bias) gradients, returns d(x); frees `gu`.
  Tensor dense_backward(const nn::DenseMLP& mlp, Tensor& gu, const Tensor& x, const Tensor& dy) {
    const int64_t t = dy.size(0), inter = gu.size(1) / 2;
    Tensor act = cuda::swiglu(gu);
    Tensor d_act = cuda::empty({t, inter}, dt_, "dense activation gradient");
    projection_backward(mlp.down_proj, act, dy, d_act, false);
    act = Tensor();
    Tensor d_gu = cuda::swiglu_backward(gu, d_act);
    d_act = Tensor();
    gu = Tensor();
    Tensor d_x = cuda::empty({t, x.size(1)}, dt_, "dense input gradient");
    cuda::gemm(d_gu, false, stacked(mlp, false), false, d_x);
    Tensor dw = cuda::empty({2 * inter, x.size(1)}, params_.grad(mlp.gate_proj.weight).dtype(), "dense gate_up gradient");
    cuda::gemm(d_gu, true, x, false, dw);
    cuda::add_inplace(params_.grad(mlp.gate_proj.weight), dw.slice0(0, inter));
    cuda::add_inplace(params_.grad(mlp.up_proj.weight), dw.slice0(inter, inter));
    if (mlp.gate_proj.bias) {
      Tensor db = cuda::empty({2 * inter}, params_.grad(*mlp.gate_proj.bias).dtype(), "dense gate_up bias gradient");
      cuda::zero(db);
      cuda::bias_grad(d_gu, db);
      cuda::add_inplace(params_.grad(*mlp.gate_proj.bias), db.slice0(0, inter));
      cuda::add_inplace(params_.grad(*mlp.up_proj.bias), db.slice0(inter, inter));
    }
    return d_x;
  }

  // The shared expert's backward (gate and MLP) from the layer's output gradient, added to d(n2).
  void shared_backward(const nn::GatedSharedExpert& S, LayerState& c, const Tensor& dy, Tensor& d_n2) {
    Tensor d_y, d_logit;
    cuda::sigmoid_gated_backward(dy, c.shared_y, c.shared_logit, d_y, d_logit);
    c.shared_y = c.shared_logit = Tensor();
    projection_backward(S.gate, c.n2, d_logit, d_n2, /*accumulate_dx=*/true);
    cuda::add_inplace(d_n2, dense_backward(S.mlp, c.shared_gu, c.n2, d_y));
  }

  // dy: gradient at the layer's output; returns the gradient at its input.
  Tensor layer_backward(size_t l, LayerState& c, const Inputs& bt, const Tensor& dy, const Tensor* dprobs_aux) {
    const auto& L = m_.layers_[l];
    Tensor d_n2 = std::holds_alternative<nn::DenseMLP>(L.mlp)
                      ? dense_backward(std::get<nn::DenseMLP>(L.mlp), c.gu, c.n2, dy)
                      : moe_backward(std::get<nn::SparseMoE>(L.mlp), c, dy, dprobs_aux);
    if (L.shared) shared_backward(*L.shared, c, dy, d_n2);
    if (L.shared_experts) cuda::add_inplace(d_n2, dense_backward(*L.shared_experts, c.plain_shared_gu, c.n2, dy));
    // Post-attention norm and the residual.
    Tensor d_x2 = cuda::rms_norm_backward(c.x2, value(L.post_attention_norm.weight), c.rstd2, d_n2,
                                          params_.grad(L.post_attention_norm.weight));
    cuda::add_inplace(d_x2, dy);
    d_n2 = Tensor();
    return L.mla ? latent_attention_backward(L, c, bt, d_x2) : attention_backward(L, c, bt, d_x2);
  }

  // Experts and router backward: accumulates their weight gradients, returns d(n2).
  Tensor moe_backward(const nn::SparseMoE& moe, LayerState& c, const Tensor& dy, const Tensor* dprobs_aux) {
    const int n = static_cast<int>(c.chunks.size());
    const bool fine_phases = n == 1;
    const int64_t t = dy.size(0);
    phases_.mark("bwd: (before experts)");
    // Backward of the unpermute, and each chunk's output gradient on its way to the experts.
    Tensor d_weights = n == 1 ? Tensor() : cuda::empty({t, moe.top_k}, DType::F32, "routing weight gradient");
    std::vector<parallel::ExpertExchange::InFlight> going(n), coming(n);
    for (int i = 0; i < n; ++i) {
      ExpertChunk& ch = c.chunks[i];
      Tensor d_yp, dw;
      cuda::unpermute_tokens_backward(n == 1 ? dy : dy.slice0(ch.t0, ch.tc), ch.y,
                                      n == 1 ? c.weights : c.weights.slice0(ch.t0, ch.tc), ch.plan, d_yp, dw);
      ch.y = Tensor();
      put_chunk(d_weights, dw, n, ch);
      if (ch.exchange)
        going[i] = ch.exchange->start_dispatch(d_yp);  // combine's backward
      else
        going[i].buffer = d_yp;
    }
    if (fine_phases) phases_.mark("bwd: unpermute");
    for (int i = 0; i < n; ++i) {
      ExpertChunk& ch = c.chunks[i];
      Tensor d_y = ch.exchange ? ch.exchange->finish_dispatch(going[i]) : going[i].buffer;
      going[i] = {};
      const std::vector<int64_t>& offsets = ch.offsets();
      const int64_t rows = offsets.back();
      Tensor act = expert_activation(moe, ch.gu);
      Tensor d_act = cuda::empty(act.shape(), dt_, "expert activation gradient");
      if (moe.gpt_oss) {  // y = act @ W_down + b: dW += act^T d_y, d(act) = d_y W^T
        cuda::grouped_linear_weight_grad(act, d_y, offsets, params_.grad(moe.down), /*accumulate=*/true);
        cuda::grouped_bias_grad(d_y, offsets, params_.grad(*moe.down_bias));
        cuda::grouped_linear(d_y, value(moe.down), offsets, d_act);
      } else {
        cuda::grouped_linear_weight_grad(d_y, act, offsets, params_.grad(moe.down), /*accumulate=*/true);
        cuda::grouped_linear_input_grad(d_y, value(moe.down), offsets, d_act);
      }
      act = Tensor();
      d_y = Tensor();
      Tensor d_gu = moe.gpt_oss ? cuda::clamped_swiglu_backward(ch.gu, d_act, moe.gpt_oss->alpha, moe.gpt_oss->limit)
                                : cuda::swiglu_backward(ch.gu, d_act);
      d_act = Tensor();
      ch.gu = Tensor();
      Tensor xs = ch.exchange ? ch.xs : cuda::permute_tokens(n == 1 ? c.n2 : c.n2.slice0(ch.t0, ch.tc), ch.plan);
      ch.xs = Tensor();
      Tensor d_xs = cuda::empty({rows, moe.hidden}, dt_, "expert input gradient");
      if (moe.gpt_oss) {
        cuda::grouped_linear_weight_grad(xs, d_gu, offsets, params_.grad(moe.gate_up), true);
        cuda::grouped_bias_grad(d_gu, offsets, params_.grad(*moe.gate_up_bias));
        xs = Tensor();
        cuda::grouped_linear(d_gu, value(moe.gate_up), offsets, d_xs);
      } else {
        cuda::grouped_linear_weight_grad(d_gu, xs, offsets, params_.grad(moe.gate_up), true);
        xs = Tensor();
        cuda::grouped_linear_input_grad(d_gu, value(moe.gate_up), offsets, d_xs);
      }
      d_gu = Tensor();
      if (ch.exchange)
        coming[i] = ch.exchange->start_combine(d_xs);  // dispatch's backward
      else
        coming[i].buffer = d_xs;
    }
    if (fine_phases) phases_.mark("bwd: expert GEMMs + SwiGLU");
    Tensor d_n2 = n == 1 ? Tensor() : cuda::empty({t, moe.hidden}, dt_, "MoE input gradient");
    for (int i = 0; i < n; ++i) {
      ExpertChunk& ch = c.chunks[i];
      Tensor d_xp = ch.exchange ? ch.exchange->finish_combine(coming[i]) : coming[i].buffer;
      coming[i] = {};
      put_chunk(d_n2, cuda::permute_tokens_backward(d_xp, ch.plan), n, ch);
    }
    if (!fine_phases) phases_.mark("bwd: experts + exchanges (overlapped)");
    // Router.
    Tensor d_logits = moe.grouped ? cuda::grouped_sigmoid_route_backward(c.probs, c.chosen, d_weights, moe.norm_topk_prob,
                                                                         moe.grouped->scaling, dt_)
                                  : cuda::router_backward(c.probs, c.chosen, c.weights, d_weights, moe.renormalised(),
                                                          dt_, dprobs_aux);
    cuda::gemm(d_logits, false, value(moe.router), false, d_n2, /*accumulate=*/true);
    cuda::gemm(d_logits, true, c.n2, false, params_.grad(moe.router), true);
    if (moe.router_bias) cuda::bias_grad(d_logits, params_.grad(*moe.router_bias));
    phases_.mark("bwd: permute + router");
    return d_n2;
  }

  // Attention backward from d(x2) (the gradient at the post-attention residual stream): accumulates
  // the projection and q/k-norm gradients, returns d(x) = d(x2) + the input norm's backward.
  // The latent attention's backward (nn::LatentAttention::backward's steps); returns d(x).
  Tensor latent_attention_backward(const models::Decoder::Layer& L, LayerState& c, const Inputs& bt, const Tensor& d_x2) {
    const nn::LatentAttention& M = *L.mla;
    const int64_t t = bt.t, h = M.heads, qk = M.nope + M.rope, kvw = M.nope + M.v_dim;
    Tensor d_o = cuda::empty({t, h * M.v_dim}, dt_, "attention output gradient");
    projection_backward(M.o_proj, mla_output(M, c.o, t), d_x2, d_o, false);
    const int64_t vw = c.v.size(3);
    if (vw != M.v_dim) {  // padded v: the padding columns' output gradient is zero
      Tensor padded = cuda::empty({t * h, vw}, dt_, "attention output gradient");
      cuda::zero(padded);
      cuda::copy_columns(d_o, M.v_dim, 0, 1, padded, vw, 0, M.v_dim);
      d_o = padded;
    }
    Tensor dq, dk, dv;
    cuda::attention_backward(c.q, c.k, c.v, c.o, c.lse, d_o.view(c.o.shape()), M.scale, 0, bt.doc_ids, dq, dk, dv);
    phases_.mark("bwd: attention core");
    d_o = Tensor();
    dq = dq.view({t, h * qk});
    Tensor dq_rope = cuda::empty({t, h, M.rope}, dt_, "rotary query gradient");
    cuda::copy_columns(dq, qk, M.nope, 1, dq_rope, M.rope, 0, M.rope);
    cuda::copy_columns(rotate_backward(dq_rope, bt, M.interleave), M.rope, 0, 1, dq, qk, M.nope, M.rope);
    Tensor dkvb = cuda::empty({t, h * kvw}, dt_, "kv_b output gradient");
    cuda::copy_columns(dk, qk, 0, 1, dkvb, kvw, 0, M.nope);
    cuda::copy_columns(dv, vw, 0, 1, dkvb, kvw, M.nope, M.v_dim);
    const Tensor dk_rope = rotate_backward(cuda::sum_row_groups(dk, qk, M.nope, M.rope, h).view({t, 1, M.rope}), bt, M.interleave);
    dk = dv = Tensor();
    Tensor dlatent_n = cuda::empty({t, M.kv_rank}, dt_, "latent gradient");
    projection_backward(M.kv_b_proj, c.latent_n, dkvb, dlatent_n, false);
    const Tensor dlatent = cuda::rms_norm_backward(c.latent, value(M.kv_a_norm.weight), c.rstd_kv, dlatent_n,
                                                   params_.grad(M.kv_a_norm.weight));
    Tensor dckv = cuda::empty({t, M.kv_rank + M.rope}, dt_, "kv_a output gradient");
    cuda::copy_columns(dlatent, M.kv_rank, 0, 1, dckv, M.kv_rank + M.rope, 0, M.kv_rank);
    cuda::copy_columns(dk_rope, M.rope, 0, 1, dckv, M.kv_rank + M.rope, M.kv_rank, M.rope);
    Tensor d_n1 = cuda::empty({t, m_.cfg_.hidden_size}, dt_, "attention input gradient");
    projection_backward(M.kv_a_proj, c.n1, dckv, d_n1, false);
    if (M.q_proj) {
      projection_backward(*M.q_proj, c.n1, dq, d_n1, true);
    } else {
      Tensor dqn = cuda::empty(c.qn.shape(), dt_, "q LoRA gradient");
      projection_backward(*M.q_b_proj, c.qn, dq, dqn, false);
      const Tensor dqa = cuda::rms_norm_backward(c.qa, value(M.q_a_norm->weight), c.rstd_qa, dqn,
                                                 params_.grad(M.q_a_norm->weight));
      projection_backward(*M.q_a_proj, c.n1, dqa, d_n1, true);
    }
    Tensor dx = cuda::rms_norm_backward(c.x, value(L.input_norm.weight), c.rstd1, d_n1, params_.grad(L.input_norm.weight));
    cuda::add_inplace(dx, d_x2);
    phases_.mark("bwd: attention block");
    return dx;
  }

  Tensor attention_backward(const models::Decoder::Layer& L, LayerState& c, const Inputs& bt, const Tensor& d_x2) {
    const auto& A = L.attn;
    const int64_t t = bt.t, hd = A.head_dim;
    Tensor o2 = c.o.view({t, A.heads * hd});
    Tensor d_o = cuda::empty({t, A.heads * hd}, dt_, "attention output gradient");
    projection_backward(A.o_proj, o2, d_x2, d_o, false);
    Tensor dq, dk, dv;
    phases_.mark("bwd: norm + o_proj");
    Tensor dsinks;
    cuda::attention_backward(c.q, c.k, c.v, c.o, c.lse, d_o.view(c.q.shape()), scale(A), window(A), bt.doc_ids, dq, dk, dv,
                             A.sinks ? &value(*A.sinks) : nullptr, A.sinks ? &dsinks : nullptr);
    if (A.sinks) cuda::add_inplace(params_.grad(*A.sinks), dsinks);
    phases_.mark("bwd: attention core");
    d_o = Tensor();
    dq = dq.view({t, A.heads, hd});
    dk = dk.view({t, A.kv_heads, hd});
    cuda::rope_inplace(dq, bt.cos, bt.sin, /*inverse=*/true);
    cuda::rope_inplace(dk, bt.cos, bt.sin, true);
    Tensor dq_pre = qk_normalise_backward(A, A.q_norm, c.q_pre, c.rstd_q, c.q_unclipped, dq.view({t, A.heads * hd}), A.heads);
    Tensor dk_pre =
        qk_normalise_backward(A, A.k_norm, c.k_pre, c.rstd_k, c.k_unclipped, dk.view({t, A.kv_heads * hd}), A.kv_heads);
    Tensor dv2 = dv.view({t, A.kv_heads * hd});
    if (A.clip) cuda::clamp_backward_inplace(c.v_unclipped, dv2, *A.clip);
    Tensor d_n1 = cuda::empty({t, m_.cfg_.hidden_size}, dt_, "attention input gradient");
    projection_backward(A.q_proj, c.n1, dq_pre, d_n1, false);
    projection_backward(A.k_proj, c.n1, dk_pre, d_n1, true);
    projection_backward(A.v_proj, c.n1, dv2, d_n1, true);
    Tensor dx = cuda::rms_norm_backward(c.x, value(L.input_norm.weight), c.rstd1, d_n1, params_.grad(L.input_norm.weight));
    cuda::add_inplace(dx, d_x2);
    phases_.mark("bwd: attention block");
    return dx;
  }

  // The load-balancing loss over every layer's routing (Transformers' definition, as
  // nn::load_balancing_loss) and its gradient on the router probabilities, scaled: [E] on the device.
  Tensor aux_gradient(const std::vector<LayerState>& st, float aux_scale, float* aux_loss) {
    if (!aux_enabled()) return Tensor();
    const int64_t e = m_.cfg_.num_experts;
    std::vector<double> routed(static_cast<size_t>(e), 0.0), prob(static_cast<size_t>(e), 0.0);
    int64_t rows = 0;
    for (const LayerState& s : st) {
      if (!s.probs.defined()) continue;  // a dense layer
      for (int64_t i = 0; i < e; ++i) routed[i] += static_cast<double>(s.expert_rows[i]);
      Tensor p = cuda::to_host_f32(s.probs);
      const int64_t t = p.size(0);
      for (int64_t r = 0; r < t; ++r)
        for (int64_t i = 0; i < e; ++i) prob[i] += p.f32()[r * e + i];
      rows += t;
    }
    if (par_.dp && par_.dp->size() > 1) {
      // Sums over the ranks that split the batch (F64: the same sums the one-rank run makes).
      Tensor all = Tensor::empty({2 * e + 1}, DType::F64);
      double* a = all.data<double>();
      for (int64_t i = 0; i < e; ++i) {
        a[i] = routed[i];
        a[e + i] = prob[i];
      }
      a[2 * e] = static_cast<double>(rows);
      par_.dp->all_reduce_sum(all);
      for (int64_t i = 0; i < e; ++i) {
        routed[i] = a[i];
        prob[i] = a[e + i];
      }
      rows = static_cast<int64_t>(a[2 * e]);
    }
    double loss = 0;
    std::vector<float> g(static_cast<size_t>(e));
    for (int64_t i = 0; i < e; ++i) {
      loss += (routed[i] / rows) * (prob[i] / rows);
      g[i] = static_cast<float>(e * (routed[i] / rows) / rows) * aux_scale;
    }
    *aux_loss = static_cast<float>(loss * e);
    return cuda::to_device(Tensor::from_vector(g, {e}), DType::F32);
  }

  static float scale(const nn::Attention& a) { return 1.0f / std::sqrt(static_cast<float>(a.head_dim)); }
  static int64_t window(const nn::Attention& a) { return a.window ? *a.window : 0; }

  const models::Decoder& m_;
  GpuParallel par_;
  std::vector<std::vector<size_t>> layer_params_;
  std::vector<Tensor> last_chosen_;  // the last step's expert choice per main layer (undefined: dense)
  DeviceParams params_;
  DType dt_;
};

std::unique_ptr<GpuModel> make_decoder_gpu(const models::CausalLM& model, DeviceParams params, GpuParallel par) {
  const auto* q = dynamic_cast<const models::Decoder*>(&model);
  MF_CHECK(q, "internal: make_decoder_gpu on another family");
  return std::make_unique<DecoderGpu>(*q, std::move(params), par);
}

}  // namespace moeforge::gpu
