// The trainer's step on a GPU: the model's one layer loop over its DeviceParams, and DeviceAdamW,
// behind train::StepBackend. Under several
// ranks (one GPU each) the model computes its experts across the NCCL expert-parallel group, and
// the gradients are summed over NCCL before the norm: dense ones over the world, expert shards over
// the expert-data-parallel group.
#include <cmath>

#include "core/error.h"
#include "ops/ops.h"
#include "ops/cuda/ops_cuda.h"
#include "gpu/adamw.h"
#include "gpu/device_params.h"
#include "parallel/env.h"
#include "ops/cuda/runtime.h"
#include "train/backend.h"
#include "train/gradients.h"

namespace moeforge::train {

namespace {

class GpuBackend : public StepBackend {
 public:
  GpuBackend(models::CausalLM& model, AdamW& host_opt, gpu::Precision p, RankGroups* groups)
      : model_(model),
        host_opt_(host_opt),
        groups_(groups),
        params_(device_params(model, p, groups)),
        par_(parallel_of(groups)),
        opt_(params_, host_opt.options(), sharding_of(groups)),
        precision_(p) {
    // A resumed run: continue from the host optimizer's state (none: zero moments).
    for (size_t i = 0; i < params_.size(); ++i)
      if (host_opt.exp_avg(i).defined()) opt_.load_moments(i, host_opt.exp_avg(i), host_opt.exp_avg_sq(i));
    opt_.set_steps(host_opt.steps());
    params_.keep_squares(true);  // every step takes the norm (logged; clipping): experts' need no second read
    release_host_copies();  // the device holds the state now
  }
  void release_host_copies() override {
    for (auto& p : model_.params().all()) p.value = Tensor();
    host_opt_.release_state();
  }
  void zero_grad() override { params_.zero_grad(); }
  models::TrainStepResult forward_backward(const models::ForwardInputs& in, const models::TrainStepOptions& o) override {
    models::TrainStepOptions run = o;
    run.ep_chunks = par_.ep && par_.ep->size() > 1 ? parallel::ep_chunks_from_env() : 1;
    return model_.forward_backward(params_, in, run, par_);
  }
  double finish_gradients(double max_norm) override {
    return train::finish_gradients(groups_, params_, max_norm, &clip_scale_);
  }
  models::ForwardOutputs evaluate(const models::ForwardInputs& in) override { return model_.forward(params_, in, par_); }
  void step(double lr) override {
    opt_.step(lr, clip_scale_);  // the clipping finish_gradients decided
    clip_scale_ = 1.f;
  }
  std::function<void(const std::vector<size_t>&)> begin_step_in_backward(double lr) override {
    opt_.begin_step(lr);
    squares_ = {};
    return [this](const std::vector<size_t>& idx) {
      sum_gradients(groups_, params_, idx, &squares_);
      opt_.update(idx);
      params_.release_grads(idx);  // applied: all the gradients never exist at once
    };
  }
  double end_step_in_backward() override { return whole_norm(groups_, squares_); }
  void sync_to_host() override {
    params_.copy_to_host(model_.params());
    for (size_t i = 0; i < params_.size(); ++i) {  // collectives for split moments: same order on every rank
      host_opt_.exp_avg(i) = opt_.exp_avg_host(i);
      host_opt_.exp_avg_sq(i) = opt_.exp_avg_sq_host(i);
    }
    host_opt_.set_steps(opt_.steps());
  }
  std::string describe() const override {
    return "cuda (" + cuda::device_name() + "), " + gpu::precision_name(precision_);
  }

 private:
  // The device copy of the model's parameters; under ZeRO-3 (recipe zero_stage: 3) each keeps
  // only this rank's block over its copy group, gathered layer by layer as the model runs.
  static gpu::DeviceParams device_params(const models::CausalLM& model, gpu::Precision p, const RankGroups* g) {
    gpu::DeviceParams d(model.params(), p);
    if (g && g->zero_stage == 3) d.shard(g->device_copy_groups());
    return d;
  }

  // ZeRO-1: the moments split over each parameter's copy group.
  static gpu::OptimizerSharding sharding_of(const RankGroups* g) {
    if (!g) return {};
    return {g->device_copy_groups()};
  }

  static models::Parallel parallel_of(const RankGroups* g) {
    if (!g) return {};
    MF_CHECK(g->dev_ep && g->dev_world && g->dev_edp, "internal: a multi-GPU run without NCCL groups");
    return g->device_parallel();
  }

  models::CausalLM& model_;
  AdamW& host_opt_;
  RankGroups* groups_;
  gpu::DeviceParams params_;
  models::Parallel par_;
  gpu::DeviceAdamW opt_;
  gpu::Precision precision_;
  GradSquares squares_;  // this step's, under optimizer_in_backward
  float clip_scale_ = 1.f;  // from finish_gradients, applied by the next step
};

}  // namespace

std::unique_ptr<StepBackend> make_gpu_backend(models::CausalLM& model, AdamW& opt, const std::string& precision,
                                              RankGroups* groups) {
  MF_CHECK(cuda::available(), "device: cuda, but no CUDA device is available on this machine");
  return std::make_unique<GpuBackend>(model, opt, gpu::parse_precision(precision, "recipe"), groups);
}

}  // namespace moeforge::train
