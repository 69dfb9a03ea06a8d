// AdamW with exactly torch.optim.AdamW's update (decoupled weight decay applied first, bias
// corrections, eps added outside the square root), and learning-rate schedules as Transformers'
// get_scheduler. Gradient norms and clipping: train/gradients.h.
#pragma once
#include <string>
#include <vector>

#include "hf/safetensors.h"
#include "nn/params.h"
#include "ops/adamw_math.h"

namespace moeforge::train {

struct AdamWOptions {
  double lr = 1e-5;
  double beta1 = 0.9, beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  bool decay_norms_and_biases = true;  // false: parameters marked decay=false get no weight decay
};

// The scalars of update number `step` (1-based) at learning rate `lr`.
ops::AdamWScalars adamw_scalars(const AdamWOptions& o, double lr, int64_t step);

class AdamW {
 public:
  // `allocate_state` false: the moments are allocated when first needed (step, load, ensure_state),
  // for a GPU run whose state lives on the device and comes to the host only for checkpoints.
  AdamW(nn::ParamStore& params, AdamWOptions opts, bool allocate_state = true);
  // Zero moments for every parameter that has none; and freeing them all (the GPU backend keeps
  // host copies only while a checkpoint is written).
  void ensure_state();
  void release_state();
  // One update with learning rate `lr` (the schedule's value for this step): begin_step(lr) then
  // update(every parameter). A step applied in pieces (optimizer in backward): begin_step counts
  // the step and fixes its scalars; update applies them to the given parameters (each exactly once
  // per step). The arithmetic is ops::adamw_multi_tensor's, the same op the GPU optimizer runs.
  // `grad_scale`: gradient clipping's coefficient, applied as the gradients are read (1: none).
  void step(double lr, float grad_scale = 1.f);
  void begin_step(double lr, float grad_scale = 1.f);
  void update(const std::vector<size_t>& indices);
  int64_t steps() const { return step_; }
  const AdamWOptions& options() const { return opts_; }
  // The moments as exp_avg.<name>, exp_avg_sq.<name> (F32), the names checkpoints use.
  hf::NamedTensors state() const;
  // Parameter i's moments (F32, host) and the step count, for moving the state to and from a device.
  Tensor& exp_avg(size_t i) { return exp_avg_.at(i); }
  Tensor& exp_avg_sq(size_t i) { return exp_avg_sq_.at(i); }
  const Tensor& exp_avg(size_t i) const { return exp_avg_.at(i); }
  const Tensor& exp_avg_sq(size_t i) const { return exp_avg_sq_.at(i); }
  void set_steps(int64_t steps) { step_ = steps; }

 private:
  nn::ParamStore& params_;
  AdamWOptions opts_;
  std::vector<Tensor> exp_avg_, exp_avg_sq_;
  int64_t step_ = 0;
  double lr_ = 0;
  ops::AdamWScalars scalars_{};
};

// Per row of a parameter's moments cut into `rows` equal rows (its first dimension, as gradient row
// flags count them): 1 where every value of both moments is +0 (all bytes zero), else 0; U8
// [rows] on the host. The GPU optimizer's zero-moment flags for moments loaded from a checkpoint
// (gpu/adamw.h).
Tensor zero_moment_rows(const Tensor& exp_avg, const Tensor& exp_avg_sq, int64_t rows);

// Learning-rate schedules as Transformers' get_scheduler builds them: a linear warmup, then
// constant, linear or cosine decay to min_lr_ratio, or warmup-stable-decay (wsd: the peak held
// until the last decay_steps -- or decay_ratio of the steps -- which decay as decay_type).
struct ScheduleOptions {
  std::string type = "constant";  // constant | linear | cosine | wsd
  int64_t warmup_steps = 0;
  double warmup_ratio = 0.0;  // > 0: warmup_steps = ceil(warmup_ratio * total) (TrainingArguments' rule)
  double min_lr_ratio = 0.0;  // the floor of the decay as a fraction of the peak
  int64_t decay_steps = 0;    // wsd: the decay's length; 0 = decay_ratio of the steps
  double decay_ratio = 0.1;
  std::string decay_type = "cosine";  // wsd: linear | cosine | 1-sqrt
  int64_t warmup_of(int64_t total) const;
};
// Multiplier of the peak learning rate for optimizer step `step` (0-based) of `total`.
double lr_multiplier(const ScheduleOptions& s, int64_t step, int64_t total);

}  // namespace moeforge::train
