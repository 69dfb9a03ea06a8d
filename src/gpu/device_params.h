// A model's parameters on the GPU, index for index with its host ParamStore: the compute copy
// (in the policy's compute dtype), the gradient, and under bf16-mixed the F32 master copy the
// optimizer updates. Uploaded once; the training step never moves weights across PCIe. Gradients
// are allocated when backward first writes them, so a path that applies and frees them layer by
// layer (optimizer in backward) never holds them all.
#pragma once
#include <vector>

#include "core/tensor.h"
#include "gpu/precision.h"
#include "nn/params.h"

namespace moeforge::gpu {

class DeviceParams {
 public:
  DeviceParams(const nn::ParamStore& host, Precision precision);
  // Random weights on the device for the store's shapes (no host values needed): N(0, std) for
  // matrices, 1 for 1-D parameters (norm weights), as Transformers' _init_weights; for benchmarks.
  static DeviceParams random(const nn::ParamStore& shapes, Precision precision, float std, uint64_t seed);

  Precision precision() const { return precision_; }
  size_t size() const { return values_.size(); }
  const Tensor& value(size_t i) const { return values_.at(i); }
  // The gradient, allocated (zeroed) on first use: F32 for 1-D parameters, the compute dtype else.
  Tensor& grad(size_t i);
  bool has_grad(size_t i) const { return grads_.at(i).defined(); }
  // Frees these gradients (the optimizer-in-backward path, once they have been applied).
  void release_grads(const std::vector<size_t>& indices);
  // What the optimizer updates: the F32 master under bf16-mixed, the compute copy otherwise.
  Tensor& master(size_t i) { return masters_.empty() ? values_.at(i) : masters_.at(i); }
  bool has_masters() const { return !masters_.empty(); }
  bool decay(size_t i) const { return decay_.at(i); }
  bool trainable(size_t i) const { return trainable_.at(i); }  // false: a buffer AdamW leaves alone

  void zero_grad();
  // Every parameter's current value into the host store (F32 from the master when there is one).
  void copy_to_host(nn::ParamStore& host) const;
  // Bytes held on the device by values, gradients and masters.
  int64_t bytes() const;

 private:
  explicit DeviceParams(Precision p) : precision_(p) {}
  void add_param_slot(bool decay, bool trainable);
  Precision precision_;
  std::vector<Tensor> values_, grads_, masters_;
  std::vector<bool> decay_, trainable_;
};

}  // namespace moeforge::gpu
