// Rotary position embedding tables with Transformers' RoPE variants (default, linear, dynamic NTK,
// YaRN, Llama-3), computed as modeling_rope_utils does: inverse frequencies once, cos/sin per
// position, both multiplied by the variant's attention scaling.
#pragma once
#include "core/tensor.h"
#include "hf/config.h"

namespace moeforge::nn {

class RotaryEmbedding {
 public:
  RotaryEmbedding(const hf::RopeConfig& rope, int64_t head_dim, int64_t max_position_embeddings);
  int64_t rotary_dim() const { return dim_; }
  float attention_scaling() const { return attention_scaling_; }
  const std::vector<double>& inv_freq() const { return inv_freq_; }
  // cos/sin [N, rotary_dim] for N positions (I64).
  void tables(const Tensor& positions, Tensor& cos, Tensor& sin) const;

 private:
  std::vector<double> compute_inv_freq(double base) const;
  hf::RopeConfig rope_;
  int64_t dim_ = 0, max_pos_ = 0;
  float attention_scaling_ = 1.f;
  std::vector<double> inv_freq_;
};

}  // namespace moeforge::nn
