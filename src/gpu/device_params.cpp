#include "gpu/device_params.h"

#include "core/error.h"
#include "ops/cuda/ops_cuda.h"
#include "ops/cuda/runtime.h"

namespace moeforge::gpu {

DeviceParams::DeviceParams(const nn::ParamStore& host, Precision precision) : precision_(precision) {
  const DType dt = compute_dtype(precision);
  for (const nn::Param& p : host.all()) {
    MF_CHECK(p.value.defined(), "parameter ", p.name, " has no value (was the checkpoint loaded?)");
    values_.push_back(cuda::to_device(p.value, dt));
    if (precision == Precision::BF16Mixed) masters_.push_back(cuda::to_device(p.value, DType::F32));
    add_param_slot(p.decay, p.trainable);
  }
}

DeviceParams DeviceParams::random(const nn::ParamStore& shapes, Precision precision, float std, uint64_t seed) {
  DeviceParams d(precision);
  const DType dt = compute_dtype(precision);
  for (const nn::Param& p : shapes.all()) {
    const bool one_dim = p.shape.size() == 1;
    Tensor v = cuda::empty(p.shape, precision == Precision::BF16Mixed ? DType::F32 : dt, "a parameter");
    if (one_dim) cuda::fill(v, 1.f);
    else cuda::fill_normal(v, 0.f, std, seed + 0x1000 * d.values_.size());
    if (precision == Precision::BF16Mixed) {
      d.masters_.push_back(v);
      Tensor c = cuda::empty(p.shape, DType::BF16, "a parameter");
      d.values_.push_back(c);
    } else {
      d.values_.push_back(v);
    }
    d.add_param_slot(p.decay, p.trainable);
  }
  if (precision == Precision::BF16Mixed)
    for (size_t i = 0; i < d.values_.size(); ++i) cuda::convert(d.masters_[i], d.values_[i]);
  return d;
}

void DeviceParams::add_param_slot(bool decay, bool trainable) {
  grads_.emplace_back();
  decay_.push_back(decay);
  trainable_.push_back(trainable);
}

Tensor& DeviceParams::grad(size_t i) {
  Tensor& g = grads_.at(i);
  if (!g.defined()) {
    // 1-D parameters (norm weights, biases) keep F32 gradients: their kernels accumulate in F32.
    const Shape& shape = values_.at(i).shape();
    g = cuda::empty(shape, shape.size() == 1 ? DType::F32 : compute_dtype(precision_), "a parameter gradient");
    cuda::zero(g);
  }
  return g;
}

void DeviceParams::release_grads(const std::vector<size_t>& indices) {
  for (size_t i : indices) grads_.at(i) = Tensor();
}

void DeviceParams::zero_grad() {
  for (Tensor& g : grads_)
    if (g.defined()) cuda::zero(g);
}

void DeviceParams::copy_to_host(nn::ParamStore& host) const {
  auto& all = host.all();
  MF_CHECK(all.size() == values_.size(), "copy_to_host: the host store has ", all.size(), " parameters, the device ",
           values_.size());
  for (size_t i = 0; i < all.size(); ++i) {
    Tensor v = cuda::to_host_f32(masters_.empty() ? values_[i] : masters_[i]);
    all[i].value = v.view(all[i].shape);
  }
}

int64_t DeviceParams::bytes() const {
  int64_t b = 0;
  for (const auto* list : {&values_, &grads_, &masters_})
    for (const Tensor& t : *list) b += static_cast<int64_t>(t.nbytes());
  return b;
}

}  // namespace moeforge::gpu
