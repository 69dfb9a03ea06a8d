#include "train/optimizer.h"

#include <cmath>
#include <cstring>

#include "core/error.h"
#include "ops/ops.h"

namespace moeforge::train {

AdamW::AdamW(nn::ParamStore& params, AdamWOptions opts, bool allocate_state) : params_(params), opts_(opts) {
  exp_avg_.resize(params_.all().size());
  exp_avg_sq_.resize(params_.all().size());
  if (allocate_state) ensure_state();
}

void AdamW::ensure_state() {
  const auto& all = params_.all();
  for (size_t i = 0; i < all.size(); ++i) {
    if (all[i].frozen) continue;  // a base weight under LoRA: never updated, no moments
    if (!exp_avg_[i].defined()) exp_avg_[i] = Tensor::zeros(all[i].shape, DType::F32);
    if (!exp_avg_sq_[i].defined()) exp_avg_sq_[i] = Tensor::zeros(all[i].shape, DType::F32);
  }
}

void AdamW::release_state() {
  for (auto* list : {&exp_avg_, &exp_avg_sq_})
    for (Tensor& t : *list) t = Tensor();
}

Tensor zero_moment_rows(const Tensor& exp_avg, const Tensor& exp_avg_sq, int64_t rows) {
  MF_CHECK(exp_avg.device().is_cpu() && exp_avg_sq.device().is_cpu() && exp_avg.numel() == exp_avg_sq.numel() &&
               rows > 0 && exp_avg.numel() % rows == 0,
           "internal: zero_moment_rows needs two host moments of one size, cut into whole rows");
  const Tensor& a = exp_avg;
  const Tensor& b = exp_avg_sq;
  const size_t bytes_a = a.nbytes() / static_cast<size_t>(rows), bytes_b = b.nbytes() / static_cast<size_t>(rows);
  const auto all_zero = [](const uint8_t* p, size_t n) {
    for (size_t i = 0; i < n; ++i)
      if (p[i]) return false;
    return true;
  };
  Tensor out = Tensor::empty({rows}, DType::U8);
  for (int64_t r = 0; r < rows; ++r)
    out.data<uint8_t>()[r] = all_zero(static_cast<const uint8_t*>(a.raw()) + r * bytes_a, bytes_a) &&
                             all_zero(static_cast<const uint8_t*>(b.raw()) + r * bytes_b, bytes_b);
  return out;
}

ops::AdamWScalars adamw_scalars(const AdamWOptions& o, double lr, int64_t step) {
  // As torch (single-tensor path): fp32 tensors, python-float scalars.
  const double bc1 = 1.0 - std::pow(o.beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(o.beta2, static_cast<double>(step));
  return {static_cast<float>(1.0 - o.beta1), static_cast<float>(o.beta2), static_cast<float>(1.0 - o.beta2),
          static_cast<float>(std::sqrt(bc2)), static_cast<float>(o.eps), static_cast<float>(lr / bc1)};
}

void AdamW::step(double lr, float grad_scale) {
  begin_step(lr, grad_scale);
  std::vector<size_t> every(params_.all().size());
  for (size_t i = 0; i < every.size(); ++i) every[i] = i;
  update(every);
}

void AdamW::begin_step(double lr, float grad_scale) {
  ensure_state();
  ++step_;
  lr_ = lr;
  scalars_ = adamw_scalars(opts_, lr, step_);
  scalars_.grad_scale = grad_scale;
}

void AdamW::update(const std::vector<size_t>& indices) {
  MF_CHECK(step_ > 0, "internal: AdamW::update before begin_step");
  std::vector<ops::AdamWTensors> ts;
  auto& all = params_.all();
  for (const size_t i : indices) {
    auto& p = all.at(i);
    if (!p.trainable) continue;
    MF_CHECK(p.value.dtype() == DType::F32, "AdamW: parameter '", p.name, "' must be F32 (the CPU policy is fp32)");
    MF_CHECK(p.grad.defined(), "AdamW: parameter '", p.name, "' has no gradient");
    const bool decay = opts_.decay_norms_and_biases || p.decay;
    ops::AdamWTensors t;
    t.param = p.value;
    t.grad = p.grad;
    t.exp_avg = exp_avg_[i];
    t.exp_avg_sq = exp_avg_sq_[i];
    t.weight_decay_mul = static_cast<float>(1.0 - lr_ * (decay ? opts_.weight_decay : 0.0));
    ts.push_back(t);
  }
  ops::adamw_multi_tensor(ts, scalars_);
}

hf::NamedTensors AdamW::state() const {
  hf::NamedTensors out;
  const auto& all = params_.all();
  for (size_t i = 0; i < all.size(); ++i) {
    if (all[i].frozen) continue;
    MF_CHECK(exp_avg_[i].defined(), "AdamW state of '", all[i].name, "' is not on the host");
    out.emplace_back("exp_avg." + all[i].name, exp_avg_[i]);
    out.emplace_back("exp_avg_sq." + all[i].name, exp_avg_sq_[i]);
  }
  return out;
}

int64_t ScheduleOptions::warmup_of(int64_t total) const {
  return warmup_ratio > 0 ? static_cast<int64_t>(std::ceil(warmup_ratio * static_cast<double>(total))) : warmup_steps;
}

double lr_multiplier(const ScheduleOptions& s, int64_t step, int64_t total) {
  const int64_t warmup = s.warmup_of(total);
  const double warm = static_cast<double>(step) / std::max<int64_t>(1, warmup);
  // Transformers' wsd warms up from min_lr_ratio, the other schedules from 0.
  if (step < warmup) return s.type == "wsd" ? s.min_lr_ratio + (1.0 - s.min_lr_ratio) * warm : warm;
  if (s.type == "constant") return 1.0;
  if (s.type == "wsd") {
    const int64_t decay = s.decay_steps > 0 ? s.decay_steps
                                            : static_cast<int64_t>(std::ceil(s.decay_ratio * static_cast<double>(total)));
    const int64_t stable = std::max<int64_t>(0, total - warmup - decay);
    if (step < warmup + stable) return 1.0;
    if (step >= warmup + stable + decay) return s.min_lr_ratio;
    const double p = static_cast<double>(step - warmup - stable) / std::max<int64_t>(1, decay);
    double f = 0;
    if (s.decay_type == "linear") f = 1.0 - p;
    else if (s.decay_type == "cosine") f = 0.5 * (1.0 + std::cos(M_PI * p));
    else if (s.decay_type == "1-sqrt") f = 1.0 - std::sqrt(p);
    else MF_THROW("unknown wsd decay_type '", s.decay_type, "' (expected linear, cosine or 1-sqrt)");
    return std::max(0.0, f * (1.0 - s.min_lr_ratio) + s.min_lr_ratio);
  }
  const double progress = static_cast<double>(step - warmup) / std::max<int64_t>(1, total - warmup);
  double m = 1.0;
  if (s.type == "linear") m = std::max(0.0, 1.0 - progress);
  else if (s.type == "cosine") m = std::max(0.0, 0.5 * (1.0 + std::cos(M_PI * progress)));
  else MF_THROW("unknown schedule '", s.type, "' (expected constant, linear, cosine or wsd)");
  return s.min_lr_ratio + (1.0 - s.min_lr_ratio) * m;
}

}  // namespace moeforge::train
