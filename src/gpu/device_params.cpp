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
    // 1-D parameters (norm weights, biases) keep F32 gradients: their kernels accumulate in F32.
    const DType gdt = p.value.dim() == 1 ? DType::F32 : dt;
    grads_.push_back(cuda::empty(p.value.shape(), gdt, "a parameter gradient"));
    cuda::zero(grads_.back());
    if (precision == Precision::BF16Mixed) masters_.push_back(cuda::to_device(p.value, DType::F32));
    decay_.push_back(p.decay);
  }
}

void DeviceParams::zero_grad() {
  for (Tensor& g : grads_) cuda::zero(g);
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
