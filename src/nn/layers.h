// Decoder building blocks with explicit forward and backward passes (no autograd tape), written
// once for every device: they compute only through ops:: (which dispatch on the tensors' device)
// and read weights / write gradients through nn::ParamAccess (the host ParamStore, or a device
// copy under a precision policy), so activations come in the storage's compute dtype. Each layer
// registers its parameters in the model's ParamStore under their internal names and keeps the
// indices. forward() takes an optional cache: when given, it keeps what backward() needs (what is
// cheap to recompute, such as an activation or a permutation, is recomputed instead of kept, to
// keep the memory a step holds down); backward() takes the cache, frees what it has used,
// accumulates parameter gradients and returns the input gradient.
#pragma once
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "parallel/communicator.h"
#include "parallel/expert_exchange.h"
#include "hf/config.h"
#include "nn/generation_state.h"
#include "nn/lora.h"
#include "nn/params.h"
#include "ops/op_types.h"
#include "nn/rotary.h"

namespace moeforge::nn {

// What a step's layers share beyond their inputs: the expert-parallel group the MoE exchange runs
// over (null: every expert is on this rank), how many token chunks a MoE layer splits its exchange
// into (each chunk's rows travel while another chunk's experts compute), and the hook that marks
// the step's phases (MOEFORGE_PHASE_TIMES; null: none).
struct RunContext {
  parallel::Communicator* ep = nullptr;
  int ep_chunks = 1;
  std::function<void(const char*)> mark;
  void phase(const char* name) const {
    if (mark) mark(name);
  }
};

struct RMSNorm {
  size_t weight = 0;
  float eps = 1e-6f;
  void init(ParamStore& ps, const std::string& name, int64_t dim, float eps_);
  // `rstd` (optional) keeps the per-row statistics for the backward, which recomputes them without.
  Tensor forward(const ParamAccess& ps, const Tensor& x, Tensor* rstd = nullptr) const;
  // With `residual_grad`: dx + residual_grad (a pre-norm block's input gradient) in one pass.
  Tensor backward(ParamAccess& ps, const Tensor& x, const Tensor& dy, const Tensor* rstd = nullptr,
                  const Tensor* residual_grad = nullptr) const;
  // Per-head norm then RoPE in one op (ops::rms_norm_rope) on x [T, H, D], and its backward (dy in
  // the rotated space; may be overwritten).
  Tensor forward_rope(const ParamAccess& ps, const Tensor& x, const Tensor& cos, const Tensor& sin,
                      Tensor* rstd = nullptr) const;
  Tensor backward_rope(ParamAccess& ps, const Tensor& x, Tensor& dy, const Tensor& cos, const Tensor& sin,
                       const Tensor* rstd = nullptr) const;

 private:
  Tensor& grad_target(ParamAccess& ps, Tensor& scratch, Device device) const;
};

struct Linear {
  size_t weight = 0;
  std::optional<size_t> bias;
  std::optional<LoraAdapter> lora;  // set by CausalLM::add_lora on the targeted projections
  void init(ParamStore& ps, const std::string& prefix, int64_t in, int64_t out, bool with_bias);
  Tensor forward(const ParamAccess& ps, const Tensor& x) const;
  Tensor backward(ParamAccess& ps, const Tensor& x, const Tensor& dy) const;
  // The backward with d(x) written into `dx` (added to it when `accumulate`), saving a buffer.
  void backward_into(ParamAccess& ps, const Tensor& x, const Tensor& dy, Tensor& dx, bool accumulate) const;
  // The backward in two halves, for a caller that gets x only after d(x) (SwiGLU's activation out
  // of its backward); without LoRA, whose gradients these halves leave out.
  Tensor input_grad(const ParamAccess& ps, const Tensor& dy) const;
  void weight_grads(ParamAccess& ps, const Tensor& x, const Tensor& dy) const;  // of the trainable ones
};

// Grouped-query attention. Variants: biases on q/k/v and on o; RMSNorm on q and k per head (Qwen3)
// or over the whole projection (OLMoE); q/k/v clamped to [-clip, clip] (OLMoE's clip_qkv); a
// sliding window.
struct AttentionOptions {
  bool qkv_bias = false, o_bias = false;
  hf::ModelConfig::QkNorm qk_norm = hf::ModelConfig::QkNorm::None;
  std::optional<float> clip_qkv;
  std::optional<int64_t> window;
  float eps = 1e-6f;  // of the q/k norms
  bool sinks = false;  // GPT-OSS: a learned logit per head in every softmax (param prefix.sinks)
  bool rope = true;    // false: no position encoding (Nemotron-H's attention)
};

struct Attention {
  struct Cache {
    Tensor x, q_pre, k_pre, rstd_q, rstd_k;  // input; q/k before their norms (with norms only) and its statistics
    Tensor q, k, v, o, lse;  // attention inputs [B,S,heads,D] after norm + RoPE, output [T, heads*D], log-sum-exp
    Tensor q_unclipped, k_unclipped, v_unclipped;  // clip_qkv only: the values before the clamp
  };
  Linear q_proj, k_proj, v_proj, o_proj;
  std::optional<RMSNorm> q_norm, k_norm;
  bool full_qk_norm = false;  // the norms span all heads' values of a token (else one head's)
  std::optional<float> clip;
  std::optional<size_t> sinks;
  int64_t heads = 0, kv_heads = 0, head_dim = 0;
  std::optional<int64_t> window;
  bool rope = true;
  void init(ParamStore& ps, const std::string& prefix, int64_t hidden, int64_t heads_, int64_t kv_heads_,
            int64_t head_dim_, const AttentionOptions& opts);
  // x [B*S, hidden]; cos/sin [B*S, rot]; doc_ids [B,S] optional. `kv` (generation; x's rows are
  // the new tokens of one or more sequences, batch 1): each sequence's keys and values of the
  // positions before its rows, which its rows' are appended to and attended over.
  Tensor forward(const ParamAccess& ps, const Tensor& x, int64_t batch, int64_t seq, const Tensor& cos,
                 const Tensor& sin, const Tensor* doc_ids, Cache* cache = nullptr, const KvCaches* kv = nullptr) const;
  Tensor backward(ParamAccess& ps, Cache& c, int64_t batch, int64_t seq, const Tensor& cos, const Tensor& sin,
                  const Tensor* doc_ids, const Tensor& dy) const;
  float scale() const;

 private:
  // q or k [T, n * head_dim] through its norm (when any; without one `x` itself is returned, for
  // RoPE to rotate in place) and the clamp (when set). `rstd` and `unclipped` (optional) receive
  // the norm's statistics and the values before the clamp.
  Tensor normalise(const ParamAccess& ps, const std::optional<RMSNorm>& norm, const Tensor& x, int64_t n,
                   Tensor* rstd, Tensor* unclipped) const;
  // d(pre) from d(q or k) [T, n * head_dim] (which the clamp's backward modifies in place).
  Tensor normalise_backward(ParamAccess& ps, const std::optional<RMSNorm>& norm, const Tensor& pre,
                            const Tensor& rstd, const Tensor& unclipped, Tensor dy, int64_t n) const;
  // Per-head q/k norms followed directly by RoPE (no clamp between): one fused op each way.
  bool norm_then_rope() const { return q_norm && !full_qk_norm && !clip && rope; }
};

// SwiGLU MLP: down(silu(gate(x)) * up(x)). Keeps its input and the [T, 2I] gate|up projection,
// not the [T, I] activation: backward gets it from SwiGLU's backward kernel after d(act) (with
// LoRA on down_proj, whose gradients need it first, it is recomputed).
struct DenseMLP {
  struct Cache {
    Tensor x, gate_up;
  };
  Linear gate_proj, up_proj, down_proj;
  void init(ParamStore& ps, const std::string& prefix, int64_t hidden, int64_t inter, bool bias = false);
  Tensor forward(const ParamAccess& ps, const Tensor& x, Cache* cache = nullptr) const;
  Tensor backward(ParamAccess& ps, Cache& c, const Tensor& dy) const;
};

// Qwen2-MoE's shared expert: a SwiGLU MLP every token goes through, scaled per token by
// sigmoid(x . w) with its own [1, hidden] gate, added to the routed experts' output.
struct GatedSharedExpert {
  struct Cache {
    DenseMLP::Cache mlp;
    Tensor y, logit;  // the MLP's output [T, H]; the gate's logit [T, 1]
  };
  DenseMLP mlp;
  Linear gate;
  // prefix: the MoE block ("model.layers.3.mlp"): prefix.shared_expert.*, prefix.shared_expert_gate.
  void init(ParamStore& ps, const std::string& prefix, int64_t hidden, int64_t inter);
  // Adds the gated expert's output for x to `out` (the routed experts' output).
  void forward_add(const ParamAccess& ps, const Tensor& x, Tensor& out, Cache* cache = nullptr) const;
  // forward_add in its two parts, so that the expert can run while the routed experts' rows travel:
  // the MLP's output and the gate's logit, then their gated sum into `out` (the same arithmetic).
  struct Parts {
    Tensor y, logit;
  };
  Parts compute(const ParamAccess& ps, const Tensor& x, Cache* cache = nullptr) const;
  static void add_to(Tensor& out, const Parts& p);
  Tensor backward(ParamAccess& ps, Cache& c, const Tensor& dy) const;
};

// Softmax router + top-k + SwiGLU experts held as one tensor per projection:
// gate_up [E, 2I, H] (gate rows first, then up) and down [E, H, I]. Under expert parallelism the
// layer holds only its shard of the experts (gate_up [E/ep, 2I, H], ...), and the (token, slot)
// pairs, grouped by expert (ops::plan_routing), travel to the rank of their expert and back
// (parallel::ExpertExchange over RunContext::ep); with one rank the same path runs with a one-rank
// group. The local experts run as grouped GEMMs over their rows. With RunContext::ep_chunks > 1
// the tokens go in chunks: every chunk's rows start travelling, then each chunk's experts run
// while later chunks' rows travel and earlier chunks' outputs travel back.
struct SparseMoE {
  // One chunk of tokens [t0, t0 + tc): its routing plan, its exchange, and what its backward needs.
  struct Chunk {
    int64_t t0 = 0, tc = 0;
    ops::RoutingPlan plan;                               // each pair's row, grouped by global expert
    std::shared_ptr<parallel::ExpertExchange> exchange;  // their trip to the experts' ranks
    Tensor xs;      // the rows received, by local expert: kept only when they came from other ranks
                    // (recomputing them would be a second exchange; else a permute recomputes them)
    Tensor h;       // the local experts' gate_up output (the activation is recomputed from it)
    Tensor y_perm;  // each pair's expert output, back home [tc*k, H]
  };
  struct Cache {
    Tensor x, probs, chosen, weights;  // probs (DeepSeek: scores) [T,E]; chosen/weights [T,k]
    Tensor xe, out_latent;             // latent MoE: the experts' input [T, L] and summed output [T, L]
    std::vector<Chunk> chunks;
  };
  // Nemotron-H's experts: down(relu(up(x))^2), ungated: up [E, I, in] (param prefix.experts.up_proj)
  // and down [E, in, I]. With a latent width L the experts run on fc1_latent_proj(x) [T, L] and their
  // summed output goes through fc2_latent_proj back to the hidden width (Nemotron 3 Super).
  struct Relu2Experts {
    int64_t latent = 0;  // 0: the experts take the hidden state itself
    bool latent_bias = false;
  };
  // GPT-OSS's variant: the router (prefix.router, with a bias) softmaxes its top-k logits; the
  // experts keep Transformers' layout gate_up [E, H, 2I] with gate and up interleaved and down
  // [E, I, H], have biases (gate_up_proj_bias [E, 2I], down_proj_bias [E, H]), and use
  // ops::clamped_swiglu(alpha, limit).
  struct GptOssStyle {
    float alpha = 1.702f, limit = 7.f;
  };
  // DeepSeek-V3's router: sigmoid scores; the choice adds the correction bias (a buffer,
  // prefix.gate.e_score_correction_bias) and keeps the topk_group best of n_group groups; the
  // weights are the chosen scores (renormalised when norm_topk_prob, with +1e-20) times `scaling`.
  struct GroupedSigmoid {
    int64_t n_group = 1, topk_group = 1;
    float scaling = 1.f;
  };
  size_t router = 0, gate_up = 0, down = 0;
  std::optional<size_t> router_bias, gate_up_bias, down_bias;  // GPT-OSS
  std::optional<size_t> correction_bias;                        // DeepSeek-V3
  int64_t experts = 0, top_k = 0, inter = 0, hidden = 0;
  bool norm_topk_prob = false;
  std::optional<GptOssStyle> gpt_oss;
  std::optional<GroupedSigmoid> grouped;
  std::optional<Relu2Experts> relu2;
  std::optional<Linear> latent_in, latent_out;  // fc1_latent_proj, fc2_latent_proj
  std::optional<ExpertLora> lora;               // LoRA on the local experts (CausalLM::add_lora)
  int64_t expert_width = 0;                     // the experts' input and output width (hidden, or latent)
  parallel::ExpertShard shard;  // the experts this rank holds (of the expert-parallel group's size)
  int ep_size = 1;
  void init(ParamStore& ps, const std::string& prefix, int64_t hidden_, int64_t experts_, int64_t top_k_,
            int64_t inter_, bool norm_topk, parallel::Communicator* ep_group = nullptr,
            std::optional<GptOssStyle> gpt_oss_style = std::nullopt,
            std::optional<GroupedSigmoid> grouped_sigmoid = std::nullopt,
            std::optional<Relu2Experts> relu2_experts = std::nullopt);
  // Parameters per expert (weights and biases), for active-parameter counts.
  int64_t params_per_expert() const;
  // Whether the routing weights are renormalised over the chosen experts (GPT-OSS's softmax over
  // its top-k logits is the top-k of the softmax, renormalised).
  bool renormalised() const { return norm_topk_prob || gpt_oss.has_value(); }
  // x [T, H] -> [T, H]. `router` receives the router's softmax probabilities [T, E] (the
  // load-balancing loss's input; none from DeepSeek-V3's sigmoid router, which has no such loss),
  // the chosen experts [T, k] and the rows routed to each expert (host, [E]). `forced` [T, k]
  // (I64, on x's device), when given, replaces the top-k choice of experts (replayed or balanced
  // routing); the routing weights are still the router's probabilities at those experts, so
  // gradients flow.
  struct RouterOut {
    Tensor probs, chosen;
    std::vector<int64_t> expert_rows;
  };
  // `alongside`: work that does not depend on the routed experts (the layer's shared experts): run
  // while the rows travel when they go to other ranks (right after the dispatches start), else after
  // everything else, as if called after forward (or backward) returned.
  Tensor forward(const ParamAccess& ps, const RunContext& ctx, const Tensor& x, RouterOut* router,
                 Cache* cache = nullptr, const Tensor* forced = nullptr, const std::function<void()>& alongside = {}) const;
  // `dprobs_extra` [E] F32 (optional) is a gradient on every row's router probabilities from
  // elsewhere (the load-balancing loss).
  Tensor backward(ParamAccess& ps, const RunContext& ctx, Cache& c, const Tensor& dy, const Tensor* dprobs_extra,
                  const std::function<void()>& alongside = {}) const;
  // The experts' activation on their gate_up (or up) output, and its backward.
  Tensor activation(const Tensor& h) const;
  Tensor activation_backward(const Tensor& h, const Tensor& d_act) const;

};

// Switch-Transformer load-balancing loss as Transformers computes it over all MoE layers' router
// probabilities (concatenated), with no attention mask: E * sum_e(fraction routed to e * mean prob of e).
// The routed fractions count the experts each layer chose (Transformers recomputes the same top-k
// from the same softmax; taking the layers' choice keeps replayed routing consistent). The
// probabilities may live on any device (they are summed on the host); entries without them (dense
// layers) take no part.
// `dp`, when given, is the group whose ranks split the batch: the statistics are summed over it, so
// the loss is that of the whole batch.
float load_balancing_loss(const std::vector<SparseMoE::RouterOut>& routers, int64_t experts,
                          parallel::Communicator* dp = nullptr);
// d(loss)/d(probs) of one layer's rows: E * f_e / rows_total, the same for every row; f_e is the
// routed fraction over all layers. Returns [E].
std::vector<float> load_balancing_prob_grad(const std::vector<SparseMoE::RouterOut>& routers, int64_t experts,
                                            parallel::Communicator* dp = nullptr);

}  // namespace moeforge::nn
