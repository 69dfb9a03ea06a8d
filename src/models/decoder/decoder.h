// The pre-norm decoder that Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, GPT-OSS, DeepSeek-V3 and the
// dense Llama / Mistral / Qwen2 / Qwen3 share, with the variants their configs select
// (hf::ModelConfig): GQA attention with RoPE, optional q/k/v and o biases, q/k RMSNorm per head or
// over the whole projection, clip_qkv, attention sinks, sliding windows per layer, or DeepSeek's
// latent attention; per layer a SwiGLU MLP (optionally biased) or a MoE block (softmax top-k
// routing, renormalised when norm_topk_prob, GPT-OSS's or DeepSeek's routing; SwiGLU or GPT-OSS
// experts; Qwen2-MoE's gated or DeepSeek's plain shared experts); tied or untied LM head; the
// load-balancing loss when output_router_logits is set.
// Internal tensor names are Transformers 5's in-memory names; ExpertNaming gives the checkpoint's.
#pragma once
#include <memory>
#include <optional>
#include <string>
#include <variant>

#include "models/causal_lm.h"
#include "nn/latent_attention.h"
#include "nn/layers.h"

namespace moeforge::gpu {
class DecoderGpu;  // the GPU training step (src/gpu), which reads the layer structure
}

namespace moeforge::models {

// Where a family's checkpoints keep the MoE block and its experts (the v4 hub spelling, which
// Transformers 5 also writes); the fused in-memory spelling is accepted on load too.
struct ExpertNaming {
  std::string block = "mlp";  // Mixtral: "block_sparse_moe" (router block.gate, experts block.experts.E.*)
  std::string gate = "gate_proj.weight", up = "up_proj.weight", down = "down_proj.weight";
};

class Decoder : public CausalLM {
 public:
  explicit Decoder(hf::ModelConfig cfg, Parallel par = {}, ExpertNaming naming = {});
  ForwardOutputs forward(const ForwardInputs& in) const override;
  TrainStepResult forward_backward(const ForwardInputs& in, const TrainStepOptions& opts) override;
  int64_t active_parameters() const override;

 private:
  friend class gpu::DecoderGpu;
  struct Layer {
    nn::RMSNorm input_norm, post_attention_norm;
    nn::Attention attn;
    std::optional<nn::LatentAttention> mla;  // DeepSeek-V3: replaces `attn`
    std::variant<nn::DenseMLP, nn::SparseMoE> mlp;
    std::optional<nn::GatedSharedExpert> shared;  // beside the routed experts (Qwen2-MoE)
    std::optional<nn::DenseMLP> shared_experts;   // beside the routed experts, ungated (DeepSeek-V3)
    size_t moe_slot = 0;  // index among the MoE layers (selects the layer's routing record)
  };
  // What one decoder layer keeps for backward.
  struct LayerCache {
    Tensor x_in, x_mid;  // layer input; input of the post-attention norm
    nn::Attention::Cache attn;
    nn::LatentAttention::Cache mla;
    nn::DenseMLP::Cache dense;
    nn::SparseMoE::Cache moe;
    nn::GatedSharedExpert::Cache shared;
    nn::DenseMLP::Cache shared_experts;
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

std::unique_ptr<CausalLM> make_decoder(const hf::ModelConfig& cfg, const Parallel& par = {}, const ExpertNaming& naming = {});

}  // namespace moeforge::models
