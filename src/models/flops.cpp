#include "models/flops.h"

namespace moeforge::models {

namespace {

// Attention projections and the causal core of one token (shared/BENCHMARKS.md: QK^T and PV over
// half the square). Latent attention counts its LoRA-style projections and its own q/k and v widths.
double attention_flops(const hf::ModelConfig& c, double s) {
  const double h = static_cast<double>(c.hidden_size), heads = static_cast<double>(c.num_attention_heads);
  if (const auto& m = c.mla) {
    const double qk = static_cast<double>(m->qk_nope_head_dim + m->qk_rope_head_dim), v = static_cast<double>(m->v_head_dim);
    const double qr = static_cast<double>(m->q_lora_rank), kvr = static_cast<double>(m->kv_lora_rank);
    const double q = qr > 0 ? 2 * h * qr + 2 * qr * heads * qk : 2 * h * heads * qk;
    const double kv = 2 * h * (kvr + static_cast<double>(m->qk_rope_head_dim)) + 2 * kvr * heads * (qk - m->qk_rope_head_dim + v);
    return q + kv + 2 * heads * v * h + s * heads * (qk + v);
  }
  const double q = heads * static_cast<double>(c.head_dim),
               kv = static_cast<double>(c.num_key_value_heads * c.head_dim);
  return 2 * h * (q + 2 * kv) + 2 * q * h + 2 * s * q;
}

// Mamba2's mixer per token, in its recurrent form: in_proj, the depthwise conv, per head the state
// update (decay times state, plus dt x B^T: 3 FLOPs per state element) and the readout state C (2
// per element) and the D skip, out_proj. (Norms and activations are not counted, as elsewhere.)
double mamba_flops(const hf::ModelConfig& c) {
  const auto& m = *c.mamba;
  const double h = static_cast<double>(c.hidden_size), heads = static_cast<double>(m.heads);
  const double p = static_cast<double>(m.head_dim), n = static_cast<double>(m.state), inner = heads * p;
  const double conv = inner + 2 * static_cast<double>(m.groups) * n;
  return 2 * h * (inner + conv + heads) + 2 * static_cast<double>(m.conv_kernel) * conv + heads * (5 * p * n + 2 * p) +
         2 * inner * h;
}

// A Nemotron-H block: one mixer of its kind (relu^2 MLPs and experts have two matrices).
double block_flops(const hf::ModelConfig& c, hf::ModelConfig::Block b, double s) {
  const double h = static_cast<double>(c.hidden_size);
  switch (b) {
    case hf::ModelConfig::Block::Mamba: return mamba_flops(c);
    case hf::ModelConfig::Block::Attention: return attention_flops(c, s);
    case hf::ModelConfig::Block::Mlp: return 2 * 2 * h * static_cast<double>(c.intermediate_size);
    case hf::ModelConfig::Block::Moe: {
      const double width = c.moe_latent_size > 0 ? static_cast<double>(c.moe_latent_size) : h;
      double f = static_cast<double>(c.num_experts_per_tok) * 2 * 2 * width * static_cast<double>(c.moe_intermediate_size) +
                 2 * h * static_cast<double>(c.num_experts) + 2 * 2 * h * static_cast<double>(c.relu2_shared_intermediate_size);
      if (c.moe_latent_size > 0) f += 2 * 2 * h * width;
      return f;
    }
  }
  return 0;
}

}  // namespace

FlopsPerToken flops_per_token(const hf::ModelConfig& c, int64_t seq) {
  const double h = static_cast<double>(c.hidden_size), s = static_cast<double>(seq);
  double layers = 0;
  for (const auto b : c.blocks) layers += block_flops(c, b, s);
  for (int64_t l = 0; l < (c.blocks.empty() ? c.num_hidden_layers : 0); ++l) {
    layers += attention_flops(c, s);
    if (c.is_moe_layer(l)) {
      layers += static_cast<double>(c.num_experts_per_tok) * 3 * 2 * h * static_cast<double>(c.moe_intermediate_size) +
                2 * h * static_cast<double>(c.num_experts);
      if (c.shared_expert_intermediate_size > 0)  // Qwen2-MoE's shared expert and its gate
        layers += 3 * 2 * h * static_cast<double>(c.shared_expert_intermediate_size) + 2 * h;
      if (c.n_shared_experts > 0)  // DeepSeek-V3's shared experts
        layers += 3 * 2 * h * static_cast<double>(c.n_shared_experts * c.moe_intermediate_size);
    } else {
      layers += 3 * 2 * h * static_cast<double>(c.intermediate_size);
    }
  }
  FlopsPerToken f;
  f.forward = layers + 2 * h * static_cast<double>(c.vocab_size);
  f.training = 3 * f.forward;
  return f;
}

}  // namespace moeforge::models
