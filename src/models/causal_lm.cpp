#include "models/causal_lm.h"

#include "core/error.h"
#include "ops/ops.h"

namespace moeforge::models {

std::vector<std::string> CausalLM::add_lora(int64_t, float, const std::function<bool(const std::string&)>&,
                                            nn::ExpertAdapters, float) {
  MF_THROW(cfg_.model_type, ": this model has no LoRA support");
}

std::unique_ptr<GenerationCache> CausalLM::start_generation(int64_t, const Parallel&) const {
  MF_THROW(cfg_.model_type, ": this model cannot generate");
}

Tensor CausalLM::generation_step(nn::ParamAccess&, const std::vector<int64_t>&, GenerationCache&, bool) const {
  MF_THROW(cfg_.model_type, ": this model cannot generate");
}

Tensor CausalLM::generation_step_batch(nn::ParamAccess&, const std::vector<std::vector<int64_t>>&,
                                       const std::vector<GenerationCache*>&) const {
  MF_THROW(cfg_.model_type, ": this model cannot generate");
}

ForwardOutputs CausalLM::forward(const ForwardInputs& in) const {
  // The host store is only read here (its residency hooks do nothing): the cast is for the
  // interface's non-const hooks, which device storage needs.
  return forward(const_cast<nn::ParamStore&>(params_), in, par_);
}

TrainStepResult CausalLM::forward_backward(const ForwardInputs& in, const TrainStepOptions& opts) {
  params_.ensure_grads();  // every parameter has one (zero where nothing flows, as a buffer's), LoRA's frozen base none
  return forward_backward(params_, in, opts, par_);
}

Tensor shifted_targets(const Tensor& labels) {
  const int64_t b = labels.size(0), s = labels.size(1);
  std::vector<int64_t> shifted(static_cast<size_t>(b * s), -100);
  for (int64_t i = 0; i < b; ++i)
    for (int64_t t = 0; t + 1 < s; ++t) shifted[i * s + t] = labels.i64()[i * s + t + 1];
  return Tensor::from_i64(shifted, {b * s});
}

Tensor mtp_targets(const Tensor& labels, const Tensor* doc_ids, int64_t depth) {
  MF_CHECK(depth >= 1, "multi-token prediction depth must be >= 1, got ", depth);
  const int64_t b = labels.size(0), s = labels.size(1), ahead = depth + 1;
  MF_CHECK(!doc_ids || doc_ids->shape() == labels.shape(), "doc_ids must match labels");
  std::vector<int64_t> out(static_cast<size_t>(b * s), -100);
  for (int64_t i = 0; i < b; ++i)
    for (int64_t t = 0; t + ahead < s; ++t) {
      const int64_t src = i * s + t + ahead;
      if (doc_ids && doc_ids->i64()[src] != doc_ids->i64()[i * s + t]) continue;
      out[i * s + t] = labels.i64()[src];
    }
  return Tensor::from_i64(out, {b * s});
}

Tensor mtp_input_ids(const Tensor& input_ids, int64_t depth) {
  const int64_t b = input_ids.size(0), s = input_ids.size(1);
  std::vector<int64_t> out(static_cast<size_t>(b * s), 0);
  for (int64_t i = 0; i < b; ++i)
    for (int64_t t = 0; t + depth < s; ++t) out[i * s + t] = input_ids.i64()[i * s + t + depth];
  return Tensor::from_i64(out, {b, s});
}

int64_t counted_targets(const Tensor& targets) {
  int64_t n = 0;
  for (int64_t i = 0; i < targets.numel(); ++i) n += targets.i64()[i] != -100;
  return n;
}

float causal_lm_loss(const Tensor& logits, const Tensor& labels, int64_t* counted) {
  const int64_t b = logits.size(0), s = logits.size(1), v = logits.size(2);
  MF_CHECK(labels.shape() == Shape({b, s}), "labels ", shape_str(labels.shape()), " do not match logits ",
           shape_str(logits.shape()));
  int64_t n = 0;
  const Tensor targets = ops::to_device(shifted_targets(labels), logits.device(), DType::I64);
  const Tensor per = ops::to_device(ops::cross_entropy_rows(logits.view({b * s, v}), targets, -100, &n), Device::cpu(),
                                    DType::F32);
  double sum = 0;
  for (int64_t i = 0; i < b * s; ++i) sum += per.f32()[i];
  if (counted) *counted = n;
  return n ? static_cast<float>(sum / n) : NAN;
}

}  // namespace moeforge::models
