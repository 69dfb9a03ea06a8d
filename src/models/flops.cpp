#include "models/flops.h"

namespace moeforge::models {

FlopsPerToken flops_per_token(const hf::ModelConfig& c, int64_t seq) {
  const double h = static_cast<double>(c.hidden_size), q = static_cast<double>(c.num_attention_heads * c.head_dim),
               kv = static_cast<double>(c.num_key_value_heads * c.head_dim), s = static_cast<double>(seq);
  const double attention = 2 * h * (q + 2 * kv) + 2 * q * h + 2 * s * q;
  double layers = 0;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    layers += attention;
    if (c.is_moe_layer(l))
      layers += static_cast<double>(c.num_experts_per_tok) * 3 * 2 * h * static_cast<double>(c.moe_intermediate_size) +
                2 * h * static_cast<double>(c.num_experts) +
                (c.shared_expert_intermediate_size > 0  // the shared expert and its gate
                     ? 3 * 2 * h * static_cast<double>(c.shared_expert_intermediate_size) + 2 * h
                     : 0);
    else
      layers += 3 * 2 * h * static_cast<double>(c.intermediate_size);
  }
  FlopsPerToken f;
  f.forward = layers + 2 * h * static_cast<double>(c.vocab_size);
  f.training = 3 * f.forward;
  return f;
}

}  // namespace moeforge::models
