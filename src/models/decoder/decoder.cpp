#include "models/decoder/decoder.h"

#include "core/error.h"
#include "ops/ops.h"

namespace moeforge::models {

Decoder::Decoder(hf::ModelConfig c, Parallel par, ExpertNaming naming)
    : CausalLM(std::move(c)), rope_(cfg_.rope, cfg_.head_dim, cfg_.max_position_embeddings), par_(par) {
  const auto& c_ = cfg_;
  const float eps = static_cast<float>(c_.rms_norm_eps);
  embed_ = params_.add("model.embed_tokens.weight", {c_.vocab_size, c_.hidden_size});
  layers_.resize(static_cast<size_t>(c_.num_hidden_layers));
  size_t moe_layers = 0;
  for (int64_t l = 0; l < c_.num_hidden_layers; ++l) {
    const std::string pre = "model.layers." + std::to_string(l);
    Layer& L = layers_[l];
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
    ao.window = c_.window_of(l);
    ao.eps = eps;
    ao.sinks = c_.attention_sinks;
    if (!L.mla)
      L.attn.init(params_, pre + ".self_attn", c_.hidden_size, c_.num_attention_heads, c_.num_key_value_heads,
                  c_.head_dim, ao);
    L.post_attention_norm.init(params_, pre + ".post_attention_layernorm.weight", c_.hidden_size, eps);
    if (c_.is_moe_layer(l)) {
      nn::SparseMoE moe;
      std::optional<nn::SparseMoE::GptOssStyle> gpt_oss;
      if (c_.gpt_oss_moe) gpt_oss = nn::SparseMoE::GptOssStyle{1.702f, static_cast<float>(c_.swiglu_limit)};
      std::optional<nn::SparseMoE::GroupedSigmoid> grouped;
      if (const auto& g = c_.grouped_sigmoid_routing)
        grouped = nn::SparseMoE::GroupedSigmoid{g->n_group, g->topk_group, static_cast<float>(g->routed_scaling_factor)};
      moe.init(params_, pre + ".mlp", c_.hidden_size, c_.num_experts, c_.num_experts_per_tok,
               c_.moe_intermediate_size, c_.norm_topk_prob, par_.ep, gpt_oss, grouped);
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
    } else {
      nn::DenseMLP mlp;
      mlp.init(params_, pre + ".mlp", c_.hidden_size, c_.intermediate_size, c_.mlp_bias);
      L.mlp = mlp;
    }
  }
  final_norm_.init(params_, "model.norm.weight", c_.hidden_size, eps);
  if (c_.quant_method == "fp8") adapter_.set_fp8_blocks(c_.fp8_block_rows, c_.fp8_block_cols);
  for (int64_t i = 0; i < c_.num_nextn_predict_layers; ++i)
    adapter_.ignore_prefix("model.layers." + std::to_string(c_.num_hidden_layers + i) + ".",
                           "a multi-token prediction layer, which moeforge does not train yet and does not save");
  if (c_.tie_word_embeddings) {
    lm_head_ = embed_;
    adapter_.ignore("lm_head.weight");  // Transformers ties it to the embedding whatever is stored
  } else {
    lm_head_ = params_.add("lm_head.weight", {c_.vocab_size, c_.hidden_size});
  }
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
  for (size_t l = 0; l < layers_.size(); ++l) {
    nn::SparseMoE::RouterOut r;
    x = layer_forward(l, x, bt, nullptr, cfg_.output_router_logits ? &r : nullptr);
    if (r.logits.defined()) routers.push_back(r);
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
  // Forward, keeping each layer's state (or only its input under activation checkpointing).
  std::vector<LayerCache> caches(layers_.size());
  std::vector<nn::SparseMoE::RouterOut> routers(layers_.size());
  Tensor x = ops::embedding(in.input_ids, params_.at(embed_)).view({t, h});
  for (size_t l = 0; l < layers_.size(); ++l) {
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
    if (r.logits.defined()) moe_routers.push_back(r);
  Tensor dprobs_aux;
  if (cfg_.output_router_logits && !moe_routers.empty()) {
    res.aux_loss = nn::load_balancing_loss(moe_routers, cfg_.num_experts, par_.world);
    const auto g = nn::load_balancing_prob_grad(moe_routers, cfg_.num_experts, par_.world);
    dprobs_aux = Tensor::empty({t, cfg_.num_experts}, DType::F32);
    for (int64_t r = 0; r < t; ++r)
      for (int64_t e = 0; e < cfg_.num_experts; ++e) dprobs_aux.f32()[r * cfg_.num_experts + e] = g[e] * opts.aux_scale;
  }
  // Backward.
  Tensor dxn = ops::linear_input_grad(dlogits, params_.at(lm_head_));
  ops::linear_weight_grad(dlogits, xn, params_.grad(lm_head_));
  dlogits = Tensor();
  Tensor dx = final_norm_.backward(params_, x_final, dxn);
  for (size_t l = layers_.size(); l-- > 0;) {
    if (ckpt) {
      Tensor x_in = caches[l].x_in;
      layer_forward(l, x_in, bt, &caches[l], nullptr);
    }
    const Tensor* extra = routers[l].logits.defined() && dprobs_aux.defined() ? &dprobs_aux : nullptr;
    dx = layer_backward(l, caches[l], bt, dx, extra);
    caches[l] = LayerCache();
  }
  ops::embedding_backward(in.input_ids, dx, params_.grad(embed_), cfg_.pad_token_id.value_or(-1));
  return res;
}

int64_t Decoder::active_parameters() const {
  int64_t total = params_.numel();
  for (const Layer& L : layers_)
    if (const auto* moe = std::get_if<nn::SparseMoE>(&L.mlp)) {
      total -= (moe->experts - moe->top_k) * moe->params_per_expert();
    }
  return total;
}

std::unique_ptr<CausalLM> make_decoder(const hf::ModelConfig& cfg, const Parallel& par, const ExpertNaming& naming) {
  return std::make_unique<Decoder>(cfg, par, naming);
}

}  // namespace moeforge::models
