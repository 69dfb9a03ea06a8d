// Qwen3-MoE (Qwen3MoeForCausalLM): GQA attention with per-head q/k RMSNorm and RoPE, softmax top-k
// routing (renormalised when norm_topk_prob), SwiGLU experts, dense-MLP layers where
// mlp_only_layers / decoder_sparse_step say so, optional sliding window, tied or untied LM head,
// and the load-balancing loss when output_router_logits is set.
#pragma once
#include <memory>
#include <variant>

#include "models/causal_lm.h"
#include "nn/layers.h"

namespace moeforge::gpu {
class Qwen3MoeGpu;  // the GPU training step (src/gpu), which reads the layer structure
}

namespace moeforge::models {

class Qwen3Moe : public CausalLM {
 public:
  explicit Qwen3Moe(hf::ModelConfig cfg, Parallel par = {});
  ForwardOutputs forward(const ForwardInputs& in) const override;
  TrainStepResult forward_backward(const ForwardInputs& in, const TrainStepOptions& opts) override;
  int64_t active_parameters() const override;

 private:
  friend class gpu::Qwen3MoeGpu;
  struct Layer {
    nn::RMSNorm input_norm, post_attention_norm;
    nn::Attention attn;
    std::variant<nn::DenseMLP, nn::SparseMoE> mlp;
    size_t moe_slot = 0;  // index among the MoE layers (selects the layer's routing record)
  };
  // What one decoder layer keeps for backward.
  struct LayerCache {
    Tensor x_in, x_mid;  // layer input; input of the post-attention norm
    nn::Attention::Cache attn;
    nn::DenseMLP::Cache dense;
    nn::SparseMoE::Cache moe;
  };
  struct Batch {
    int64_t b = 0, s = 0;
    Tensor cos, sin;
    const Tensor* doc_ids = nullptr;
    RoutingControl* routing = nullptr;
  };
  Batch prepare(const ForwardInputs& in) const;
  // One decoder layer; `cache` may be null (inference); `router` receives the MoE routing.
  Tensor layer_forward(size_t l, const Tensor& x, const Batch& bt, LayerCache* cache,
                       nn::SparseMoE::RouterOut* router) const;
  Tensor layer_backward(size_t l, const LayerCache& c, const Batch& bt, const Tensor& dy, const Tensor* dprobs_extra);

  size_t embed_ = 0, lm_head_ = 0;
  std::vector<Layer> layers_;
  nn::RMSNorm final_norm_;
  nn::RotaryEmbedding rope_;
  Parallel par_;
};

std::unique_ptr<CausalLM> make_qwen3_moe(const hf::ModelConfig& cfg, const Parallel& par = {});

}  // namespace moeforge::models
