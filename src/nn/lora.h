// LoRA (Hu et al., 2021) on a linear layer, as PEFT computes it: y = base(x) + scale * (x A^T) B^T
// with A [r, in] and B [out, r] and scale = alpha / r (alpha / sqrt(r) with rsLoRA). A and B are
// ordinary parameters of the model's ParamStore, registered beside the base weight under PEFT's
// module names (`<module>.lora_A.weight`, `<module>.lora_B.weight`) and flagged `lora`.
#pragma once
#include <string>

#include "core/tensor.h"
#include "nn/params.h"

namespace moeforge::nn {

struct LoraAdapter {
  size_t a = 0, b = 0;
  float scale = 1.f;
  // module: the adapted layer's name without ".weight" ("model.layers.0.self_attn.q_proj").
  void init(ParamStore& ps, const std::string& module, int64_t in, int64_t out, int64_t rank, float scale_);
  // y += scale * (x A^T) B^T.
  void forward_add(const ParamAccess& ps, const Tensor& x, Tensor& y) const;
  // Accumulates the gradients of A and B and adds the adapter's part of d(x) into dx.
  void backward(ParamAccess& ps, const Tensor& x, const Tensor& dy, Tensor& dx) const;
};

}  // namespace moeforge::nn
