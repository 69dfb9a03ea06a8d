#include "models/decoder/decoder.h"

#include "core/error.h"
#include "ops/ops.h"

namespace moeforge::models {

Decoder::Decoder(hf::ModelConfig c, Parallel par, ExpertNaming naming)
    : CausalLM(std::move(c)), rope_(cfg_.rope, cfg_.head_dim, cfg_.max_position_embeddings), par_(par) {
  const auto& c_ = cfg_;
  MF_CHECK(c_.mtp_layers >= 0 && c_.mtp_layers <= c_.num_nextn_predict_layers, "internal: ", c_.mtp_layers,
           " multi-token prediction layers built of the config's ", c_.num_nextn_predict_layers);
  embed_ = params_.add("model.embed_tokens.weight", {c_.vocab_size, c_.hidden_size});
  main_layers_ = static_cast<size_t>(c_.num_hidden_layers);
  layers_.resize(main_layers_ + static_cast<size_t>(c_.mtp_layers));
  size_t moe_layers = 0;
  for (int64_t l = 0; l < c_.num_hidden_layers; ++l) add_layer(l, naming, moe_layers);
  final_norm_.init(params_, "model.norm.weight", c_.hidden_size, static_cast<float>(c_.rms_norm_eps));
  if (c_.quant_method == "fp8") adapter_.set_fp8_blocks(c_.fp8_block_rows, c_.fp8_block_cols);
  if (c_.tie_word_embeddings) {
    lm_head_ = embed_;
    adapter_.ignore("lm_head.weight");  // Transformers ties it to the embedding whatever is stored
  } else {
    lm_head_ = params_.add("lm_head.weight", {c_.vocab_size, c_.hidden_size});
  }
  for (int64_t d = 1; d <= c_.mtp_layers; ++d) add_mtp_depth(d, naming, moe_layers);
  for (int64_t i = c_.mtp_layers; i < c_.num_nextn_predict_layers; ++i)
    adapter_.ignore_prefix("model.layers." + std::to_string(c_.num_hidden_layers + i) + ".",
                           "a multi-token prediction layer the checkpoint holds only in part");
}

void Decoder::add_layer(int64_t l, const ExpertNaming& naming, size_t& moe_layers) {
  const auto& c_ = cfg_;
  const float eps = static_cast<float>(c_.rms_norm_eps);
  const std::string pre = "model.layers." + std::to_string(l);
  Layer& L = layers_[static_cast<size_t>(l)];
  L.input_norm.init(params_, pre + ".input_layernorm.weight", c_.hidden_size, eps);
  if (c_.mla) {
    L.mla.emplace();
    L.mla->init(params_, pre + ".self_attn", c_.hidden_size, c_.num_attention_heads, *c_.mla, c_.qkv_bias,
                nn::latent_attention_scale(c_.rope, c_.mla->qk_nope_head_dim + c_.mla->qk_rope_head_dim));
  }
  nn::AttentionOptions ao;
  ao.qkv_bias = c_.qkv_bias;
  ao.o_bias = c_.o_bias;
  ao.qk_norm = c_.qk_norm;
  if (c_.clip_qkv) ao.clip_qkv = static_cast<float>(*c_.clip_qkv);
  ao.window = l < c_.num_hidden_layers ? c_.window_of(l) : std::nullopt;
  ao.eps = eps;
  ao.sinks = c_.attention_sinks;
  if (!L.mla)
    L.attn.init(params_, pre + ".self_attn", c_.hidden_size, c_.num_attention_heads, c_.num_key_value_heads,
                c_.head_dim, ao);
  L.post_attention_norm.init(params_, pre + ".post_attention_layernorm.weight", c_.hidden_size, eps);
  if (!c_.is_moe_layer(l)) {
    nn::DenseMLP mlp;
    mlp.init(params_, pre + ".mlp", c_.hidden_size, c_.intermediate_size, c_.mlp_bias);
    L.mlp = mlp;
    return;
  }
  nn::SparseMoE moe;
  std::optional<nn::SparseMoE::GptOssStyle> gpt_oss;
  if (c_.gpt_oss_moe) gpt_oss = nn::SparseMoE::GptOssStyle{1.702f, static_cast<float>(c_.swiglu_limit)};
  std::optional<nn::SparseMoE::GroupedSigmoid> grouped;
  if (const auto& g = c_.grouped_sigmoid_routing)
    grouped = nn::SparseMoE::GroupedSigmoid{g->n_group, g->topk_group, static_cast<float>(g->routed_scaling_factor)};
  moe.init(params_, pre + ".mlp", c_.hidden_size, c_.num_experts, c_.num_experts_per_tok, c_.moe_intermediate_size,
           c_.norm_topk_prob, par_.ep, gpt_oss, grouped);
  const std::string hub = pre + "." + naming.block;
  hf::ExpertGroup group{hub + ".experts.", pre + ".mlp.experts.gate_up_proj", pre + ".mlp.experts.down_proj",
                        naming.gate, naming.up, naming.down, c_.num_experts, moe.shard.first};
  if (gpt_oss) {  // stored fused only (and MXFP4-quantised in hub checkpoints), biases beside
    group.per_expert = false;
    group.fused_extra = {pre + ".mlp.experts.gate_up_proj_bias", pre + ".mlp.experts.down_proj_bias"};
  }
  adapter_.add_expert_group(group);
  if (naming.block != "mlp") adapter_.rename(pre + ".mlp.gate.weight", hub + ".gate.weight");
  L.mlp = moe;
  L.moe_slot = moe_layers++;
  if (c_.shared_expert_intermediate_size > 0) {
    L.shared.emplace();
    L.shared->init(params_, pre + ".mlp", c_.hidden_size, c_.shared_expert_intermediate_size);
  }
  if (c_.n_shared_experts > 0) {
    L.shared_experts.emplace();
    L.shared_experts->init(params_, pre + ".mlp.shared_experts", c_.hidden_size,
                           c_.moe_intermediate_size * c_.n_shared_experts);
  }
}

void Decoder::add_mtp_depth(int64_t depth, const ExpertNaming& naming, size_t& moe_layers) {
  const auto& c_ = cfg_;
  const float eps = static_cast<float>(c_.rms_norm_eps);
  const int64_t l = c_.num_hidden_layers + depth - 1;
  const std::string pre = "model.layers." + std::to_string(l);
  MtpDepth d;
  d.layer = static_cast<size_t>(l);
  d.enorm.init(params_, pre + ".enorm.weight", c_.hidden_size, eps);
  d.hnorm.init(params_, pre + ".hnorm.weight", c_.hidden_size, eps);
  d.eh_proj.init(params_, pre + ".eh_proj", 2 * c_.hidden_size, c_.hidden_size, false);
  add_layer(l, naming, moe_layers);
  d.head_norm.init(params_, pre + ".shared_head.norm.weight", c_.hidden_size, eps);
  adapter_.copy_of(pre + ".embed_tokens.weight", params_.all()[embed_].name);
  adapter_.copy_of(pre + ".shared_head.head.weight", params_.all()[lm_head_].name);
  mtp_.push_back(d);
}

bool Decoder::is_mtp_param(const std::string& name) const {
  for (const MtpDepth& d : mtp_)
    if (name.rfind("model.layers." + std::to_string(d.layer) + ".", 0) == 0) return true;
  return false;
}

void Decoder::set_mtp_trainable(bool on) {
  for (auto& p : params_.all())
    if (is_mtp_param(p.name) && !p.name.ends_with("e_score_correction_bias")) p.trainable = on;
}

Decoder::Batch Decoder::prepare(const ForwardInputs& in) const {
  const Tensor& ids = in.input_ids;
  MF_CHECK(ids.dim() == 2 && ids.dtype() == DType::I64, "input_ids must be an I64 [batch, seq] tensor, got ",
           dtype_name(ids.dtype()), " ", shape_str(ids.shape()));
  Batch bt;
  bt.b = ids.size(0);
  bt.s = ids.size(1);
  bt.doc_ids = in.doc_ids;
  bt.routing = in.routing;
  Tensor positions;
  if (in.position_ids) {
    MF_CHECK(in.position_ids->shape() == ids.shape(), "position_ids must match input_ids");
    positions = *in.position_ids;
  } else {
    std::vector<int64_t> p(static_cast<size_t>(bt.b * bt.s));
    for (int64_t i = 0; i < bt.b * bt.s; ++i) p[i] = i % bt.s;
    positions = Tensor::from_i64(p, {bt.b, bt.s});
  }
  rope_.tables(positions, bt.cos, bt.sin);
  return bt;
}

Tensor Decoder::layer_forward(size_t l, const Tensor& x_in, const Batch& bt, LayerCache* c,
                               nn::SparseMoE::RouterOut* router) const {
  const Layer& L = layers_[l];
  Tensor x = x_in.clone();
  const Tensor n1 = L.input_norm.forward(params_, x_in);
  Tensor a = L.mla ? L.mla->forward(params_, n1, bt.b, bt.s, bt.cos, bt.sin, bt.doc_ids, c ? &c->mla : nullptr)
                   : L.attn.forward(params_, n1, bt.b, bt.s, bt.cos, bt.sin, bt.doc_ids, c ? &c->attn : nullptr);
  ops::add_inplace(x, a);
  if (c) {
    c->x_in = x_in;
    c->x_mid = x.clone();
  }
  Tensor n = L.post_attention_norm.forward(params_, x);
  Tensor m;
  if (const auto* moe = std::get_if<nn::SparseMoE>(&L.mlp)) {
    const size_t slot = L.moe_slot;
    const Tensor* forced = nullptr;
    if (bt.routing && bt.routing->mode == RoutingControl::Mode::Replay) {
      MF_CHECK(slot < bt.routing->chosen.size(), "routing replay has no record for MoE layer ", slot);
      forced = &bt.routing->chosen[slot];
    }
    nn::SparseMoE::Cache local;
    nn::SparseMoE::Cache* mc = c ? &c->moe : (bt.routing ? &local : nullptr);
    m = moe->forward(params_, n, router, mc, forced);
    if (bt.routing && bt.routing->mode == RoutingControl::Mode::Record) {
      if (bt.routing->chosen.size() <= slot) bt.routing->chosen.resize(slot + 1);
      bt.routing->chosen[slot] = mc->chosen;
    }
    if (L.shared) ops::add_inplace(m, L.shared->forward(params_, n, c ? &c->shared : nullptr));
    if (L.shared_experts) ops::add_inplace(m, L.shared_experts->forward(params_, n, c ? &c->shared_experts : nullptr));
  } else {
    m = std::get<nn::DenseMLP>(L.mlp).forward(params_, n, c ? &c->dense : nullptr);
  }
  ops::add_inplace(x, m);
  return x;
}

Tensor Decoder::layer_backward(size_t l, const LayerCache& c, const Batch& bt, const Tensor& dy,
                                const Tensor* dprobs_extra) {
  const Layer& L = layers_[l];
  Tensor dn;
  if (const auto* moe = std::get_if<nn::SparseMoE>(&L.mlp)) {
    dn = moe->backward(params_, c.moe, dy, dprobs_extra);
    if (L.shared) ops::add_inplace(dn, L.shared->backward(params_, c.shared, dy));
    if (L.shared_experts) ops::add_inplace(dn, L.shared_experts->backward(params_, c.shared_experts, dy));
  } else {
    dn = std::get<nn::DenseMLP>(L.mlp).backward(params_, c.dense, dy);
  }
  Tensor dmid = dy.clone();
  ops::add_inplace(dmid, L.post_attention_norm.backward(params_, c.x_mid, dn));
  Tensor da = L.mla ? L.mla->backward(params_, c.mla, bt.b, bt.s, bt.cos, bt.sin, bt.doc_ids, dmid)
                    : L.attn.backward(params_, c.attn, bt.b, bt.s, bt.cos, bt.sin, bt.doc_ids, dmid);
  Tensor dx = dmid;
  ops::add_inplace(dx, L.input_norm.backward(params_, c.x_in, da));
  return dx;
}

ForwardOutputs Decoder::forward(const ForwardInputs& in) const {
  const Batch bt = prepare(in);
  const int64_t t = bt.b * bt.s, h = cfg_.hidden_size;
  Tensor x = ops::embedding(in.input_ids, params_.at(embed_)).view({t, h});
  std::vector<nn::SparseMoE::RouterOut> routers;
  for (size_t l = 0; l < main_layers_; ++l) {
    nn::SparseMoE::RouterOut r;
    x = layer_forward(l, x, bt, nullptr, cfg_.output_router_logits ? &r : nullptr);
    if (r.chosen.defined()) routers.push_back(r);
  }
  x = final_norm_.forward(params_, x);
  ForwardOutputs out;
  out.logits = ops::linear(x, params_.at(lm_head_)).view({bt.b, bt.s, cfg_.vocab_size});
  if (cfg_.output_router_logits)
    out.aux_loss = nn::load_balancing_loss(routers, cfg_.num_experts);
  if (in.labels) {
    out.loss = causal_lm_loss(out.logits, *in.labels, &out.loss_tokens);
    if (cfg_.output_router_logits) out.loss += static_cast<float>(cfg_.router_aux_loss_coef) * out.aux_loss;
  }
  return out;
}

TrainStepResult Decoder::forward_backward(const ForwardInputs& in, const TrainStepOptions& opts) {
  MF_CHECK(in.labels, "forward_backward needs labels");
  params_.ensure_grads();
  const Batch bt = prepare(in);
  const int64_t t = bt.b * bt.s, h = cfg_.hidden_size;
  const bool ckpt = opts.activation_checkpointing;
  MF_CHECK(opts.mtp_scales.empty() || opts.mtp_scales.size() == mtp_.size(), "training asks for ",
           opts.mtp_scales.size(), " multi-token prediction depths, the model has ", mtp_.size());
  // Forward, keeping each layer's state (or only its input under activation checkpointing).
  std::vector<LayerCache> caches(main_layers_);
  std::vector<nn::SparseMoE::RouterOut> routers(main_layers_);
  Tensor x = ops::embedding(in.input_ids, params_.at(embed_)).view({t, h});
  for (size_t l = 0; l < main_layers_; ++l) {
    nn::SparseMoE::RouterOut* rl = cfg_.output_router_logits ? &routers[l] : nullptr;
    if (ckpt) {
      caches[l].x_in = x;
      x = layer_forward(l, x, bt, nullptr, rl);
    } else {
      x = layer_forward(l, x, bt, &caches[l], rl);
    }
  }
  const Tensor x_final = x;
  Tensor xn = final_norm_.forward(params_, x_final);
  Tensor logits = ops::linear(xn, params_.at(lm_head_));
  TrainStepResult res;
  Tensor dlogits;
  res.ce_sum = ops::cross_entropy_backward(logits, shifted_targets(*in.labels), -100, opts.ce_scale, dlogits, &res.tokens);
  logits = Tensor();  // free before backward
  // Load-balancing loss: its gradient on every MoE layer's router probabilities.
  std::vector<nn::SparseMoE::RouterOut> moe_routers;
  for (auto& r : routers)
    if (r.chosen.defined()) moe_routers.push_back(r);
  Tensor dprobs_aux;
  if (cfg_.output_router_logits && !moe_routers.empty()) {
    res.aux_loss = nn::load_balancing_loss(moe_routers, cfg_.num_experts, par_.world);
    const auto g = nn::load_balancing_prob_grad(moe_routers, cfg_.num_experts, par_.world);
    dprobs_aux = Tensor::empty({cfg_.num_experts}, DType::F32);  // the same for every row
    for (int64_t e = 0; e < cfg_.num_experts; ++e) dprobs_aux.f32()[e] = g[e] * opts.aux_scale;
  }
  // Backward.
  Tensor dxn = ops::linear_input_grad(dlogits, params_.at(lm_head_));
  ops::linear_weight_grad(dlogits, xn, params_.grad(lm_head_));
  dlogits = Tensor();
  if (!opts.mtp_scales.empty()) ops::add_inplace(dxn, mtp_train(in, bt, xn, opts, res));
  Tensor dx = final_norm_.backward(params_, x_final, dxn);
  for (size_t l = main_layers_; l-- > 0;) {
    if (ckpt) {
      Tensor x_in = caches[l].x_in;
      layer_forward(l, x_in, bt, &caches[l], nullptr);
    }
    const Tensor* extra = routers[l].chosen.defined() && dprobs_aux.defined() ? &dprobs_aux : nullptr;
    dx = layer_backward(l, caches[l], bt, dx, extra);
    caches[l] = LayerCache();
  }
  ops::embedding_backward(in.input_ids, dx, params_.grad(embed_), cfg_.pad_token_id.value_or(-1));
  return res;
}

Tensor Decoder::mtp_train(const ForwardInputs& in, const Batch& bt, const Tensor& h0, const TrainStepOptions& opts,
                          TrainStepResult& res) {
  const int64_t t = bt.b * bt.s, h = cfg_.hidden_size;
  const size_t depths = mtp_.size();
  std::vector<MtpCache> caches(depths);
  res.mtp_ce_sums.assign(depths, 0.0);
  res.mtp_tokens.assign(depths, 0);
  // Forward through the depths, each keeping what its backward needs.
  Tensor prev = h0;
  for (size_t k = 0; k < depths; ++k) {
    const MtpDepth& d = mtp_[k];
    MtpCache& c = caches[k];
    c.ids = mtp_input_ids(in.input_ids, static_cast<int64_t>(k + 1), &c.valid);
    c.embed = ops::embedding(c.ids, params_.at(embed_)).view({t, h});
    for (int64_t r = 0; r < t; ++r)  // no token t+k there: a zero embedding, as vLLM feeds position 0
      if (!c.valid[r]) std::fill_n(c.embed.f32() + r * h, h, 0.f);
    c.joined = Tensor::zeros({t, 2 * h}, DType::F32);
    ops::copy_columns(d.enorm.forward(params_, c.embed), h, 0, 1, c.joined, 2 * h, 0, h);
    ops::copy_columns(d.hnorm.forward(params_, prev), h, 0, 1, c.joined, 2 * h, h, h);
    c.layer.x_in = d.eh_proj.forward(params_, c.joined);
    c.y = layer_forward(d.layer, c.layer.x_in, bt, &c.layer, nullptr);
    c.h = d.head_norm.forward(params_, c.y);
    prev = c.h;
  }
  // Backward from the last depth: each depth's loss, plus the gradient its successor sent back
  // through hnorm, reaches its head norm; what reaches its hnorm goes to the depth before.
  Tensor d_next;
  for (size_t k = depths; k-- > 0;) {
    const MtpDepth& d = mtp_[k];
    MtpCache& c = caches[k];
    const Tensor targets = mtp_targets(*in.labels, in.doc_ids, static_cast<int64_t>(k + 1));
    Tensor dlogits;
    Tensor logits = ops::linear(c.h, params_.at(lm_head_));
    res.mtp_ce_sums[k] = ops::cross_entropy_backward(logits, targets, -100, opts.mtp_scales[k], dlogits, &res.mtp_tokens[k]);
    logits = Tensor();
    Tensor dh = ops::linear_input_grad(dlogits, params_.at(lm_head_));
    ops::linear_weight_grad(dlogits, c.h, params_.grad(lm_head_));
    dlogits = Tensor();
    if (d_next.defined()) ops::add_inplace(dh, d_next);
    const Tensor dy = d.head_norm.backward(params_, c.y, dh);
    const Tensor dx = layer_backward(d.layer, c.layer, bt, dy, nullptr);
    const Tensor djoined = d.eh_proj.backward(params_, c.joined, dx);
    Tensor den = Tensor::zeros({t, h}, DType::F32), dhn = Tensor::zeros({t, h}, DType::F32);
    ops::copy_columns(djoined, 2 * h, 0, 1, den, h, 0, h);
    ops::copy_columns(djoined, 2 * h, h, 1, dhn, h, 0, h);
    Tensor de = d.enorm.backward(params_, c.embed, den);
    for (int64_t r = 0; r < t; ++r)
      if (!c.valid[r]) std::fill_n(de.f32() + r * h, h, 0.f);
    ops::embedding_backward(c.ids.view({t}), de, params_.grad(embed_), cfg_.pad_token_id.value_or(-1));
    d_next = d.hnorm.backward(params_, k == 0 ? h0 : caches[k - 1].h, dhn);
    c = MtpCache();
  }
  return d_next;
}

int64_t Decoder::active_parameters() const {
  // The main model's: the MTP layers run in training only (as DeepSeek-V3's 37B counts them).
  int64_t total = params_.numel();
  for (const auto& p : params_.all())
    if (is_mtp_param(p.name)) total -= shape_numel(p.shape);
  for (size_t l = 0; l < main_layers_; ++l)
    if (const auto* moe = std::get_if<nn::SparseMoE>(&layers_[l].mlp)) {
      total -= (moe->experts - moe->top_k) * moe->params_per_expert();
    }
  return total;
}

std::unique_ptr<CausalLM> make_decoder(const hf::ModelConfig& cfg, const Parallel& par, const ExpertNaming& naming) {
  return std::make_unique<Decoder>(cfg, par, naming);
}

}  // namespace moeforge::models
