// Decoder building blocks with explicit forward passes. Each layer registers its parameters in the
// model's ParamStore under their internal names and keeps the indices; backward passes (and the
// state they need) arrive with the training work.
#pragma once
#include <optional>
#include <string>

#include "core/tensor.h"
#include "nn/params.h"
#include "nn/rotary.h"

namespace moeforge::nn {

struct RMSNorm {
  size_t weight = 0;
  float eps = 1e-6f;
  void init(ParamStore& ps, const std::string& name, int64_t dim, float eps_);
  Tensor forward(const ParamStore& ps, const Tensor& x) const;
};

struct Linear {
  size_t weight = 0;
  std::optional<size_t> bias;
  void init(ParamStore& ps, const std::string& prefix, int64_t in, int64_t out, bool with_bias);
  Tensor forward(const ParamStore& ps, const Tensor& x) const;
};

// Grouped-query attention with optional per-head q/k RMSNorm (Qwen3) and an optional sliding window.
struct Attention {
  Linear q_proj, k_proj, v_proj, o_proj;
  std::optional<RMSNorm> q_norm, k_norm;
  int64_t heads = 0, kv_heads = 0, head_dim = 0;
  std::optional<int64_t> window;
  void init(ParamStore& ps, const std::string& prefix, int64_t hidden, int64_t heads_, int64_t kv_heads_,
            int64_t head_dim_, bool bias, bool qk_norm, float eps, std::optional<int64_t> window_);
  // x [B*S, hidden]; cos/sin [B*S, rot]; doc_ids [B,S] optional.
  Tensor forward(const ParamStore& ps, const Tensor& x, int64_t batch, int64_t seq, const Tensor& cos,
                 const Tensor& sin, const Tensor* doc_ids) const;
};

// SwiGLU MLP: down(silu(gate(x)) * up(x)).
struct DenseMLP {
  Linear gate_proj, up_proj, down_proj;
  void init(ParamStore& ps, const std::string& prefix, int64_t hidden, int64_t inter);
  Tensor forward(const ParamStore& ps, const Tensor& x) const;
};

// Softmax router + top-k + SwiGLU experts held as one tensor per projection:
// gate_up [E, 2I, H] (gate rows first, then up) and down [E, H, I].
struct SparseMoE {
  size_t router = 0, gate_up = 0, down = 0;
  int64_t experts = 0, top_k = 0, inter = 0, hidden = 0;
  bool norm_topk_prob = false;
  void init(ParamStore& ps, const std::string& prefix, int64_t hidden_, int64_t experts_, int64_t top_k_,
            int64_t inter_, bool norm_topk);
  // x [T, H] -> [T, H]; router_logits [T, E] is returned for the auxiliary loss.
  Tensor forward(const ParamStore& ps, const Tensor& x, Tensor* router_logits) const;
};

// Switch-Transformer load-balancing loss as Transformers computes it over all MoE layers' router
// logits (concatenated), with no attention mask: E * sum_e(fraction routed to e * mean prob of e).
float load_balancing_loss(const std::vector<Tensor>& router_logits, int64_t experts, int64_t top_k);

}  // namespace moeforge::nn
