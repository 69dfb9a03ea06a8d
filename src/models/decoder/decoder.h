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
//
// One model for every device: the layer loop below runs through ops:: on whatever nn::ParamAccess
// it is given (the host ParamStore, or gpu::DeviceParams under a precision policy), and what only
// a GPU run needs is a hook of that loop: ZeRO-3's gather / prefetch / release / scatter_grads
// (no-ops on a store that holds every value whole), TrainStepOptions::on_grads_ready (the
// optimizer applied inside backward), phase marks, expert-exchange chunks (nn::RunContext).
#pragma once
#include <memory>
#include <optional>
#include <string>
#include <variant>

#include "models/causal_lm.h"
#include "nn/latent_attention.h"
#include "nn/layers.h"
#include "nn/mamba2.h"

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
  using CausalLM::forward;
  using CausalLM::forward_backward;
  ForwardOutputs forward(nn::ParamAccess& ps, const ForwardInputs& in, const Parallel& par) const override;
  TrainStepResult forward_backward(nn::ParamAccess& ps, const ForwardInputs& in, const TrainStepOptions& opts,
                                   const Parallel& par) const override;
  int64_t active_parameters() const override;
  std::unique_ptr<GenerationCache> start_generation(int64_t capacity, const Parallel& par = {}) const override;
  Tensor generation_step_batch(nn::ParamAccess& ps, const std::vector<std::vector<int64_t>>& ids,
                               const std::vector<GenerationCache*>& caches) const override;
  Tensor generation_step(nn::ParamAccess& ps, const std::vector<int64_t>& ids, GenerationCache& cache,
                         bool all_positions = false) const override;
  int64_t mtp_depths() const override { return static_cast<int64_t>(mtp_.size()); }
  void set_mtp_trainable(bool on) override;
  std::vector<std::string> add_lora(int64_t rank, float scale,
                                    const std::function<bool(const std::string& module)>& wants,
                                    nn::ExpertAdapters experts = nn::ExpertAdapters::None,
                                    float dropout = 0.f) override;

 private:
  struct Layer {
    nn::RMSNorm input_norm, post_attention_norm;
    nn::Attention attn;
    std::optional<nn::LatentAttention> mla;  // DeepSeek-V3: replaces `attn`
    std::variant<nn::DenseMLP, nn::SparseMoE> mlp;
    std::optional<nn::GatedSharedExpert> shared;  // beside the routed experts (Qwen2-MoE)
    std::optional<nn::DenseMLP> shared_experts;   // beside the routed experts, ungated (DeepSeek-V3)
    size_t moe_slot = 0;  // index among the MoE layers (selects the layer's routing record)
    // Nemotron-H: the layer is one pre-norm block (input_norm, this mixer, the residual) instead of
    // the attention + MLP pair: Mamba2, attention (`attn`), the MoE (`mlp`, with its relu^2 shared
    // expert) or a relu^2 MLP.
    std::optional<hf::ModelConfig::Block> block;
    std::optional<nn::Mamba2Mixer> mamba;
    std::optional<nn::Relu2MLP> relu2_mlp, relu2_shared;
  };
  // What one decoder layer keeps for backward.
  struct LayerCache {
    Tensor x_in, x_mid;    // layer input; input of the post-attention norm (the residual after attention)
    Tensor rstd1, rstd2;   // the two norms' statistics
    nn::Attention::Cache attn;
    nn::LatentAttention::Cache mla;
    nn::DenseMLP::Cache dense;
    nn::SparseMoE::Cache moe;
    nn::GatedSharedExpert::Cache shared;
    nn::DenseMLP::Cache shared_experts;
    nn::Mamba2Mixer::Cache mamba;
    nn::Relu2MLP::Cache relu2, relu2_shared;
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
    Tensor rstd_e, rstd_h, rstd_y;    // the enorm, hnorm and head norm statistics
    LayerCache layer;
  };
  // A generation's per-layer state: the attention layers' key/value caches and the Mamba2 mixers'
  // conv windows and scan states (each layer uses the one its kind needs).
  struct Generation : GenerationCache {
    std::vector<nn::KvCache> kv;
    std::vector<nn::MambaState> mamba;
  };
  static Generation* generation_of(GenerationCache* cache);
  // One step's inputs on the parameters' device, and what its layers share.
  struct Batch {
    int64_t b = 0, s = 0, t = 0;
    Device device;
    Tensor ids, cos, sin, docs, balanced;  // ids [T]; RoPE tables; doc ids; the balanced routing [T, k]
    const Tensor* doc_ids = nullptr;
    RoutingControl* routing = nullptr;
    nn::RunContext ctx;
    std::vector<Tensor> chosen;  // per layer, the expert choice of its first forward (replayed when recomputed)
    // A generation step: the sequences it runs (rows [gen_rows[i], gen_rows[i+1]) of its tokens
    // are sequence i's), whose states the layers read and extend.
    std::vector<Generation*> gens;
    std::vector<int64_t> gen_rows;
    bool generating() const { return !gens.empty(); }
    nn::KvCaches kv_caches(size_t l) const;
    nn::MambaStates mamba_states(size_t l) const;
  };
  Batch prepare(const nn::ParamAccess& ps, const ForwardInputs& in, const Parallel& par) const;
  // A generation step of the sequences `gens` on their new tokens `ids`: the logits of every new
  // token ([sum of tokens, V]) when `all_positions`, else of each sequence's last ([B, V]), host F32.
  Tensor run_generation(nn::ParamAccess& ps, const std::vector<std::vector<int64_t>>& ids,
                        const std::vector<Generation*>& gens, bool all_positions) const;
  // The embedding and the main layers, each gathered (the next one prefetched), run and released;
  // `caches` (null: inference) keeps each layer's state, or only its input when `ckpt`. Returns
  // the last layer's output with the final norm and LM head gathered.
  Tensor main_forward(nn::ParamAccess& ps, Batch& bt, std::vector<LayerCache>* caches, bool ckpt,
                      std::vector<nn::SparseMoE::RouterOut>& routers) const;
  // One decoder layer; `cache` may be null (inference); `router` receives the MoE routing; `replay`
  // (optional) is the choice of experts to repeat (a checkpointed layer's recomputation).
  Tensor layer_forward(const nn::ParamAccess& ps, size_t l, const Tensor& x, Batch& bt, LayerCache* cache,
                       nn::SparseMoE::RouterOut* router, const Tensor* replay = nullptr) const;
  Tensor layer_backward(nn::ParamAccess& ps, size_t l, LayerCache& c, const Batch& bt, const Tensor& dy,
                        const Tensor* dprobs_extra) const;
  // A Nemotron-H block's forward and backward (layer_forward / layer_backward call them).
  Tensor block_forward(const nn::ParamAccess& ps, size_t l, const Tensor& x, Batch& bt, LayerCache* cache,
                       nn::SparseMoE::RouterOut* router, const Tensor* replay) const;
  Tensor block_backward(nn::ParamAccess& ps, size_t l, LayerCache& c, const Batch& bt, const Tensor& dy,
                        const Tensor* dprobs_extra) const;
  // A MoE layer's routed experts with the routing control applied (replay, balanced, record) and
  // its shared experts added; and the backward of both.
  Tensor moe_forward(const nn::ParamAccess& ps, size_t l, const Tensor& n, Batch& bt, LayerCache* c,
                     nn::SparseMoE::RouterOut* router, const Tensor* replay) const;
  Tensor moe_backward(nn::ParamAccess& ps, size_t l, LayerCache& c, const Batch& bt, const Tensor& dy,
                      const Tensor* dprobs_extra) const;
  // A main layer's projections (the Linear layers LoRA can adapt), whichever its kind.
  static std::vector<nn::Linear*> projections(Layer& L);
  void add_block(int64_t l, const ExpertNaming& naming, size_t& moe_layers);
  void add_layer(int64_t l, const ExpertNaming& naming, size_t& moe_layers);
  // Whether a parameter belongs to an MTP depth (its layer's prefix, enorm/hnorm/eh_proj/head norm included).
  bool is_mtp_param(const std::string& name) const;
  void add_mtp_depth(int64_t depth, const ExpertNaming& naming, size_t& moe_layers);
  // The MTP depths' forward and backward for a training step: `h0` is the main model's final-norm
  // output; returns d(loss)/d(h0) from the depths (to add to the main model's).
  template <typename Ready>
  Tensor mtp_train(nn::ParamAccess& ps, const ForwardInputs& in, Batch& bt, const Tensor& h0,
                   const TrainStepOptions& opts, TrainStepResult& res, Ready& ready) const;
  // The load-balancing loss over the layers' routing and its gradient on the router probabilities,
  // scaled: [E] F32 on the device (undefined when the config has no such loss).
  Tensor aux_gradient(const std::vector<nn::SparseMoE::RouterOut>& routers, const Parallel& par, float scale,
                      float* loss, Device device) const;

  // The LM head's gradient, or null when it is frozen (LoRA).
  Tensor* head_grad(nn::ParamAccess& ps) const { return ps.trainable(lm_head_) ? &ps.grad(lm_head_) : nullptr; }
  size_t embed_ = 0, lm_head_ = 0;
  std::vector<Layer> layers_;  // the main model's num_hidden_layers, then one per MTP depth
  std::vector<std::vector<size_t>> layer_params_;  // each layer's parameters (ZeRO-3 gathers them together)
  size_t main_layers_ = 0;
  std::vector<MtpDepth> mtp_;
  nn::RMSNorm final_norm_;
  nn::RotaryEmbedding rope_;
  // The default positions' RoPE tables and the balanced routing depend on the shape only: made
  // once per shape and device (they cost milliseconds per step otherwise).
  struct ShapeTables {
    int64_t b = -1, s = -1;
    Device device;
    Tensor cos, sin, balanced;
  };
  mutable ShapeTables tables_;
};

std::unique_ptr<CausalLM> make_decoder(const hf::ModelConfig& cfg, const Parallel& par = {}, const ExpertNaming& naming = {});

}  // namespace moeforge::models
