#include "gpu/adamw.h"

#include "ops/cuda/ops_cuda.h"
#include "ops/cuda/runtime.h"

namespace moeforge::gpu {

DeviceAdamW::DeviceAdamW(DeviceParams& params, train::AdamWOptions opts) : params_(params), opts_(opts) {
  const DType mdt = params.precision() == Precision::BF16 ? DType::BF16 : DType::F32;
  for (size_t i = 0; i < params.size(); ++i) {
    const Shape& s = params.value(i).shape();
    exp_avg_.push_back(cuda::empty(s, mdt, "AdamW exp_avg"));
    exp_avg_sq_.push_back(cuda::empty(s, mdt, "AdamW exp_avg_sq"));
    cuda::zero(exp_avg_.back());
    cuda::zero(exp_avg_sq_.back());
  }
}

double DeviceAdamW::clip_grad_norm(double max_norm) {
  std::vector<Tensor> grads;
  for (size_t i = 0; i < params_.size(); ++i) grads.push_back(params_.grad(i));
  const double norm = cuda::global_grad_norm(grads);
  if (max_norm > 0) {
    const double coef = max_norm / (norm + 1e-6);
    if (coef < 1.0) cuda::scale_inplace(grads, static_cast<float>(coef));
  }
  return norm;
}

void DeviceAdamW::step(double lr) {
  begin_step(lr);
  std::vector<size_t> all(params_.size());
  for (size_t i = 0; i < all.size(); ++i) all[i] = i;
  update(all);
}

void DeviceAdamW::begin_step(double lr) {
  ++step_;
  lr_ = lr;
  scalars_ = train::adamw_scalars(opts_, lr, step_);
}

void DeviceAdamW::update(const std::vector<size_t>& indices) {
  std::vector<cuda::AdamWTensors> ts;
  for (size_t i : indices) {
    const bool decay = opts_.decay_norms_and_biases || params_.decay(i);
    cuda::AdamWTensors t;
    t.param = params_.master(i);
    t.grad = params_.grad(i);  // zeros if backward never wrote it (an unused parameter)
    t.exp_avg = exp_avg_[i];
    t.exp_avg_sq = exp_avg_sq_[i];
    t.weight_decay_mul = static_cast<float>(1.0 - lr_ * (decay ? opts_.weight_decay : 0.0));
    if (params_.has_masters()) t.param_bf16_copy = params_.value(i);
    ts.push_back(std::move(t));
  }
  cuda::adamw_multi_tensor(ts, scalars_);
}

int64_t DeviceAdamW::bytes() const {
  int64_t b = 0;
  for (const auto* list : {&exp_avg_, &exp_avg_sq_})
    for (const Tensor& t : *list) b += static_cast<int64_t>(t.nbytes());
  return b;
}

}  // namespace moeforge::gpu
