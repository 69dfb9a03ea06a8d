// The pre-norm decoder that Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, GPT-OSS, DeepSeek-V3 and the
// dense Llama / Mistral / Qwen2 / Qwen3 share, with the variants their configs select
// (hf::ModelConfig): GQA attention with RoPE, optional q/k/v and o biases, q/k RMSNorm per head or
// over the whole projection, clip_qkv, attention sinks, sliding windows per layer, or DeepSeek's
// latent attention; per layer a SwiGLU MLP (optionally biased) or a MoE block (softmax top-k
// routing, renormalised when norm_topk_prob, GPT-OSS's or DeepSeek's routing; SwiGLU or GPT-OSS
// experts; Qwen2-MoE's gated or DeepSeek's plain shared experts); tied or untied LM head; the
// load-balancing loss when output_router_logits is set.
// DeepSeek-V3's multi-token prediction layers (when the checkpoint holds them): depth k (1-based)
// takes h_{k-1} at position t (the main model's final-norm output for k = 1, else depth k-1's
// head-norm output) and the embedding of token t+k (zero past the row's end):
//   x = eh_proj([enorm(embed(token t+k)), hnorm(h_{k-1})]); y = its decoder layer(x);
//   h_k = shared_head.norm(y); logits = lm_head(h_k), predicting token t+1+k.
// The embedding and output head are the main model's (the checkpoint's copies under
// model.layers.N.embed_tokens / shared_head.head are written from them on save). The loss adds
// mtp_loss_scale / depths * the mean cross-entropy of each depth (DeepSeek-V3's report, Megatron's
// mtp_loss_scaling_factor); the MTP routers take no part in the load-balancing loss.
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
  int64_t mtp_depths() const override { return static_cast<int64_t>(mtp_.size()); }
  void set_mtp_trainable(bool on) override;

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
  // One multi-token prediction depth.
  struct MtpDepth {
    size_t layer = 0;  // its decoder layer in layers_ (num_hidden_layers + depth - 1)
    nn::RMSNorm enorm, hnorm, head_norm;
    nn::Linear eh_proj;  // [hidden, 2 * hidden]
  };
  // What a depth keeps for backward.
  struct MtpCache {
    Tensor ids, embed, joined, y, h;  // its tokens; their embeddings; [enorm | hnorm]; layer output; head norm of it
    std::vector<uint8_t> valid;
    LayerCache layer;
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
  void add_layer(int64_t l, const ExpertNaming& naming, size_t& moe_layers);
  // Whether a parameter belongs to an MTP depth (its layer's prefix, enorm/hnorm/eh_proj/head norm included).
  bool is_mtp_param(const std::string& name) const;
  void add_mtp_depth(int64_t depth, const ExpertNaming& naming, size_t& moe_layers);
  // The MTP depths' forward and backward for a training step: `h0` is the main model's final-norm
  // output; returns d(loss)/d(h0) from the depths (to add to the main model's).
  Tensor mtp_train(const ForwardInputs& in, const Batch& bt, const Tensor& h0, const TrainStepOptions& opts,
                   TrainStepResult& res);

  size_t embed_ = 0, lm_head_ = 0;
  std::vector<Layer> layers_;  // the main model's num_hidden_layers, then one per MTP depth
  size_t main_layers_ = 0;
  std::vector<MtpDepth> mtp_;
  nn::RMSNorm final_norm_;
  nn::RotaryEmbedding rope_;
  Parallel par_;
};

std::unique_ptr<CausalLM> make_decoder(const hf::ModelConfig& cfg, const Parallel& par = {}, const ExpertNaming& naming = {});

}  // namespace moeforge::models
