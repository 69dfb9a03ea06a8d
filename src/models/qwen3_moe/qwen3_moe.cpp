#include "models/qwen3_moe/qwen3_moe.h"

#include "core/error.h"
#include "ops/ops.h"

namespace moeforge::models {

Qwen3Moe::Qwen3Moe(hf::ModelConfig c)
    : CausalLM(std::move(c)), rope_(cfg_.rope, cfg_.head_dim, cfg_.max_position_embeddings) {
  const auto& c_ = cfg_;
  const float eps = static_cast<float>(c_.rms_norm_eps);
  embed_ = params_.add("model.embed_tokens.weight", {c_.vocab_size, c_.hidden_size});
  layers_.resize(static_cast<size_t>(c_.num_hidden_layers));
  for (int64_t l = 0; l < c_.num_hidden_layers; ++l) {
    const std::string pre = "model.layers." + std::to_string(l);
    Layer& L = layers_[l];
    L.input_norm.init(params_, pre + ".input_layernorm.weight", c_.hidden_size, eps);
    L.attn.init(params_, pre + ".self_attn", c_.hidden_size, c_.num_attention_heads, c_.num_key_value_heads,
                c_.head_dim, c_.attention_bias, /*qk_norm=*/true, eps, c_.sliding_window);
    L.post_attention_norm.init(params_, pre + ".post_attention_layernorm.weight", c_.hidden_size, eps);
    if (c_.is_moe_layer(l)) {
      nn::SparseMoE moe;
      moe.init(params_, pre + ".mlp", c_.hidden_size, c_.num_experts, c_.num_experts_per_tok,
               c_.moe_intermediate_size, c_.norm_topk_prob);
      adapter_.add_expert_group({pre + ".mlp.experts.", pre + ".mlp.experts.gate_up_proj",
                                 pre + ".mlp.experts.down_proj", "gate_proj.weight", "up_proj.weight",
                                 "down_proj.weight", c_.num_experts});
      L.mlp = moe;
    } else {
      nn::DenseMLP mlp;
      mlp.init(params_, pre + ".mlp", c_.hidden_size, c_.intermediate_size);
      L.mlp = mlp;
    }
  }
  final_norm_.init(params_, "model.norm.weight", c_.hidden_size, eps);
  if (c_.tie_word_embeddings) {
    lm_head_ = embed_;
    adapter_.ignore("lm_head.weight");  // Transformers ties it to the embedding whatever is stored
  } else {
    lm_head_ = params_.add("lm_head.weight", {c_.vocab_size, c_.hidden_size});
  }
}

ForwardOutputs Qwen3Moe::forward(const ForwardInputs& in) const {
  const Tensor& ids = in.input_ids;
  MF_CHECK(ids.dim() == 2 && ids.dtype() == DType::I64, "input_ids must be an I64 [batch, seq] tensor, got ",
           dtype_name(ids.dtype()), " ", shape_str(ids.shape()));
  const int64_t b = ids.size(0), s = ids.size(1), t = b * s, h = cfg_.hidden_size;
  Tensor positions;
  if (in.position_ids) {
    MF_CHECK(in.position_ids->shape() == ids.shape(), "position_ids must match input_ids");
    positions = *in.position_ids;
  } else {
    std::vector<int64_t> p(static_cast<size_t>(t));
    for (int64_t i = 0; i < t; ++i) p[i] = i % s;
    positions = Tensor::from_i64(p, {b, s});
  }
  Tensor cos, sin;
  rope_.tables(positions, cos, sin);

  Tensor x = ops::embedding(ids, params_.at(embed_)).view({t, h});
  std::vector<Tensor> router_logits;
  for (const Layer& L : layers_) {
    Tensor a = L.attn.forward(params_, L.input_norm.forward(params_, x), b, s, cos, sin, in.doc_ids);
    ops::add_inplace(x, a);
    Tensor n = L.post_attention_norm.forward(params_, x);
    Tensor m;
    if (const auto* moe = std::get_if<nn::SparseMoE>(&L.mlp)) {
      Tensor logits;
      m = moe->forward(params_, n, cfg_.output_router_logits ? &logits : nullptr);
      if (cfg_.output_router_logits) router_logits.push_back(logits);
    } else {
      m = std::get<nn::DenseMLP>(L.mlp).forward(params_, n);
    }
    ops::add_inplace(x, m);
  }
  x = final_norm_.forward(params_, x);
  ForwardOutputs out;
  out.logits = ops::linear(x, params_.at(lm_head_)).view({b, s, cfg_.vocab_size});
  if (cfg_.output_router_logits)
    out.aux_loss = nn::load_balancing_loss(router_logits, cfg_.num_experts, cfg_.num_experts_per_tok);
  if (in.labels) {
    out.loss = causal_lm_loss(out.logits, *in.labels, &out.loss_tokens);
    if (cfg_.output_router_logits) out.loss += static_cast<float>(cfg_.router_aux_loss_coef) * out.aux_loss;
  }
  return out;
}

int64_t Qwen3Moe::active_parameters() const {
  int64_t total = params_.numel();
  for (const Layer& L : layers_)
    if (const auto* moe = std::get_if<nn::SparseMoE>(&L.mlp)) {
      const int64_t per_expert = 3 * moe->inter * moe->hidden;
      total -= (moe->experts - moe->top_k) * per_expert;
    }
  return total;
}

std::unique_ptr<CausalLM> make_qwen3_moe(const hf::ModelConfig& cfg) { return std::make_unique<Qwen3Moe>(cfg); }

}  // namespace moeforge::models
