// The named parameters of a model in its internal layout (experts fused into [E, ...] tensors).
// Order is stable: it is the order of registration, which is the order of the forward pass.
#pragma once
#include <map>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace moeforge::nn {

struct Param {
  std::string name;  // internal name, e.g. "model.layers.0.mlp.experts.gate_up_proj"
  Shape shape;       // the shape the config implies
  Tensor value;      // filled by the loader
  Tensor grad;       // F32, same shape; allocated by ensure_grads()
  bool decay = true;  // AdamW weight decay applies (false for norms and biases when excluded)
  // False for a buffer that is loaded and saved but never updated (DeepSeek-V3's routing
  // correction bias): it gets no gradient and the optimizers leave it as it is.
  bool trainable = true;
};

class ParamStore {
 public:
  // Registers a parameter; returns its index for the layer to keep.
  size_t add(std::string name, Shape shape);
  Tensor& at(size_t i) { return params_[i].value; }
  const Tensor& at(size_t i) const { return params_[i].value; }
  std::vector<Param>& all() { return params_; }
  const std::vector<Param>& all() const { return params_; }
  Param* find(const std::string& name);
  const Param* find(const std::string& name) const;
  int64_t numel() const;
  Tensor& grad(size_t i) { return params_[i].grad; }
  // Allocates (zeroed) gradients for every parameter that has none; zero_grad() clears them.
  void ensure_grads();
  void zero_grad();

 private:
  std::vector<Param> params_;
  std::map<std::string, size_t> index_;
};

}  // namespace moeforge::nn
