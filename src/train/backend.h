// Where the training step runs: the trainer's loop is the same on the CPU and on a GPU; a backend
// owns the step's arithmetic (forward/backward, gradient norm and clipping, AdamW) and keeps the
// host model and optimizer current when the trainer needs them (checkpoints, the final save).
#pragma once
#include <functional>
#include <memory>
#include <string>

#include "models/causal_lm.h"
#include "train/optimizer.h"
#include "train/ranks.h"

namespace moeforge::train {

class StepBackend {
 public:
  virtual ~StepBackend() = default;
  virtual void zero_grad() = 0;
  // One micro-batch; gradients accumulate.
  virtual models::TrainStepResult forward_backward(const models::ForwardInputs& in, const models::TrainStepOptions& o) = 0;
  // Ends the step's gradients: sums them over the ranks (when several share the run), returns
  // the whole model's gradient norm, and clips them to max_norm when above it (<= 0: no clipping).
  // The clipping is applied by the next step(), as AdamW reads the gradients (one pass over them
  // fewer than scaling them in place first; the same update).
  virtual double finish_gradients(double max_norm) = 0;
  // A forward without gradients (validation): the summed cross-entropy of the micro-batch's
  // counted tokens and their count (ForwardOutputs::ce_sum, loss_tokens; no host logits).
  virtual models::ForwardOutputs evaluate(const models::ForwardInputs& in) = 0;
  virtual void step(double lr) = 0;
  // The optimizer applied inside backward (recipe optimizer_in_backward), instead of
  // finish_gradients + step: begin_step_in_backward(lr) counts the step and returns the callback
  // for TrainStepOptions::on_grads_ready, which sums a group of finished gradients over the ranks,
  // adds their squares to the step's gradient norm and applies AdamW to them;
  // end_step_in_backward returns that norm (the whole model's, as finish_gradients').
  virtual std::function<void(const std::vector<size_t>&)> begin_step_in_backward(double lr) = 0;
  virtual double end_step_in_backward() = 0;
  // Copies parameters and optimizer state into the host model and `AdamW` (a no-op on the CPU),
  // and frees those host copies again once a checkpoint has been written from them (a no-op on the
  // CPU, where they are the state itself; on a GPU the state lives on the device).
  virtual void sync_to_host() = 0;
  virtual void release_host_copies() {}
  virtual std::string describe() const = 0;
};

// The CPU reference: the model and optimizer themselves.
// `groups`: this rank's place in a multi-rank run (its expert_sharded and zero_stage set); null: one process.
std::unique_ptr<StepBackend> make_cpu_backend(models::CausalLM& model, AdamW& opt, RankGroups* groups = nullptr);
// One GPU under a precision policy ("fp32" | "bf16-mixed" | "bf16"): uploads the model's
// parameters and `opt`'s state (so a resumed run continues from them). Under several ranks the
// groups must have their device (NCCL) communicators. Defined in src/gpu; a build without the
// CUDA backend throws.
std::unique_ptr<StepBackend> make_gpu_backend(models::CausalLM& model, AdamW& opt, const std::string& precision,
                                              RankGroups* groups = nullptr);

}  // namespace moeforge::train
