// Qwen3-MoE (Qwen3MoeForCausalLM): GQA attention with per-head q/k RMSNorm and RoPE, softmax top-k
// routing (renormalised when norm_topk_prob), SwiGLU experts, dense-MLP layers where
// mlp_only_layers / decoder_sparse_step say so, optional sliding window, tied or untied LM head.
#pragma once
#include <memory>
#include <variant>

#include "models/causal_lm.h"
#include "nn/layers.h"

namespace moeforge::models {

class Qwen3Moe : public CausalLM {
 public:
  explicit Qwen3Moe(hf::ModelConfig cfg);
  ForwardOutputs forward(const ForwardInputs& in) const override;
  int64_t active_parameters() const override;

 private:
  struct Layer {
    nn::RMSNorm input_norm, post_attention_norm;
    nn::Attention attn;
    std::variant<nn::DenseMLP, nn::SparseMoE> mlp;
  };
  size_t embed_ = 0, lm_head_ = 0;
  std::vector<Layer> layers_;
  nn::RMSNorm final_norm_;
  nn::RotaryEmbedding rope_;
};

std::unique_ptr<CausalLM> make_qwen3_moe(const hf::ModelConfig& cfg);

}  // namespace moeforge::models
