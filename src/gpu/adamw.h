// AdamW over DeviceParams: the moments live on the device (BF16 under the bf16 policy, as torch
// AdamW keeps them on a BF16 model; F32 otherwise), and a step is one multi-tensor launch with the
// CPU optimizer's per-element arithmetic (ops/adamw_math.h). Under bf16-mixed the F32 masters are
// updated and the BF16 compute copies refreshed in the same pass.
#pragma once
#include <vector>

#include "gpu/device_params.h"
#include "train/optimizer.h"

namespace moeforge::gpu {

class DeviceAdamW {
 public:
  DeviceAdamW(DeviceParams& params, train::AdamWOptions opts);
  // The global gradient norm, and the gradients scaled to max_norm when above it (max_norm <= 0:
  // the norm only). torch.nn.utils.clip_grad_norm_'s rule, as train::clip_grad_norm.
  double clip_grad_norm(double max_norm);
  // One full step: begin_step(lr) then update(every parameter).
  void step(double lr);
  // A step applied in pieces (optimizer in backward): begin_step counts the step and fixes its
  // scalars; update applies them to the given parameters, each exactly once per step.
  void begin_step(double lr);
  void update(const std::vector<size_t>& indices);
  int64_t steps() const { return step_; }
  // Parameter i's moments on the device and the step count (checkpoints move them to the host).
  Tensor& exp_avg(size_t i) { return exp_avg_.at(i); }
  Tensor& exp_avg_sq(size_t i) { return exp_avg_sq_.at(i); }
  void set_steps(int64_t steps) { step_ = steps; }
  int64_t bytes() const;

 private:
  DeviceParams& params_;
  train::AdamWOptions opts_;
  std::vector<Tensor> exp_avg_, exp_avg_sq_;
  int64_t step_ = 0;
  double lr_ = 0;
  ops::AdamWScalars scalars_{};
};

}  // namespace moeforge::gpu
