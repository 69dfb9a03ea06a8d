// The trainer's step on a GPU: GpuModel + DeviceAdamW behind train::StepBackend. Under several
// ranks (one GPU each) the model computes its experts across the NCCL expert-parallel group, and
// the gradients are summed over NCCL before the norm: dense ones over the world, expert shards over
// the expert-data-parallel group.
#include <array>
#include <cmath>

#include "core/error.h"
#include "ops/ops.h"
#include "ops/cuda/ops_cuda.h"
#include "gpu/adamw.h"
#include "gpu/gpu_model.h"
#include "ops/cuda/runtime.h"
#include "train/backend.h"

namespace moeforge::train {

namespace {

class GpuBackend : public StepBackend {
 public:
  GpuBackend(models::CausalLM& model, AdamW& host_opt, gpu::Precision p, RankGroups* groups)
      : model_(model),
        host_opt_(host_opt),
        groups_(groups),
        gm_(gpu::make_gpu_model(model, device_params(model, p, groups), parallel_of(groups))),
        opt_(gm_->params(), host_opt.options(), sharding_of(groups)),
        precision_(p) {
    // A resumed run: continue from the host optimizer's state (none: zero moments).
    for (size_t i = 0; i < gm_->params().size(); ++i)
      if (host_opt.exp_avg(i).defined()) opt_.load_moments(i, host_opt.exp_avg(i), host_opt.exp_avg_sq(i));
    opt_.set_steps(host_opt.steps());
    release_host_copies();  // the device holds the state now
  }
  void release_host_copies() override {
    for (auto& p : model_.params().all()) p.value = Tensor();
    host_opt_.release_state();
  }
  void zero_grad() override { gm_->params().zero_grad(); }
  models::TrainStepResult forward_backward(const models::ForwardInputs& in, const models::TrainStepOptions& o) override {
    return gm_->forward_backward(in, o);
  }
  double finish_gradients(double max_norm) override {
    if (!groups_) return opt_.clip_grad_norm(max_norm);
    RankGroups& g = *groups_;
    auto& params = gm_->params();
    // Every rank sums every parameter's gradient in the same order (a missing one is zero).
    std::vector<Tensor> dense, experts, blocks;
    std::vector<Tensor*> dense_grads, expert_grads;
    for (size_t i = 0; i < params.size(); ++i) {
      if (params.sharded(i)) {  // ZeRO-3: summed over its copy group in backward, this rank's block
        blocks.push_back(params.shard_grad(i));
        continue;
      }
      const bool shard = g.expert_sharded[i];
      (shard ? expert_grads : dense_grads).push_back(&params.grad(i));
      (shard ? experts : dense).push_back(params.grad(i));
    }
    if (g.dev_world->size() > 1) g.dev_world->all_reduce_sum_many(dense_grads);
    if (g.dev_edp->size() > 1) g.dev_edp->all_reduce_sum_many(expert_grads);
    // Dense gradients are now the same everywhere; expert shards' squares add up over the
    // expert-parallel group, ZeRO-3 blocks' over the world, where every rank holds distinct pieces
    // (host F64 through gloo: one number each).
    const double d = ops::global_grad_norm(dense), e = ops::global_grad_norm(experts);
    Tensor sq = Tensor::empty({1}, DType::F64);
    sq.data<double>()[0] = e * e;
    g.ep->all_reduce_sum(sq);
    double total = d * d + sq.data<double>()[0];
    if (params.any_sharded()) {
      const double b = ops::global_grad_norm(blocks);
      sq.data<double>()[0] = b * b;
      g.world_group->all_reduce_sum(sq);
      total += sq.data<double>()[0];
    }
    const double norm = std::sqrt(total);
    if (max_norm > 0) {
      const double coef = max_norm / (norm + 1e-6);  // torch.nn.utils.clip_grad_norm_'s rule
      if (coef < 1.0) {
        dense.insert(dense.end(), experts.begin(), experts.end());
        dense.insert(dense.end(), blocks.begin(), blocks.end());
        ops::scale_inplace(dense, static_cast<float>(coef));
      }
    }
    return norm;
  }
  void step(double lr) override { opt_.step(lr); }
  std::function<void(const std::vector<size_t>&)> begin_step_in_backward(double lr) override {
    opt_.begin_step(lr);
    squares_ = {0, 0, 0};
    return [this](const std::vector<size_t>& idx) {
      auto& params = gm_->params();
      // Sums over the ranks holding copies (ZeRO-3 blocks were summed by the layer loop already).
      std::vector<Tensor> dense, experts, blocks;
      std::vector<Tensor*> dense_grads, expert_grads;
      for (const size_t i : idx) {
        if (params.sharded(i)) {
          blocks.push_back(params.shard_grad(i));
          continue;
        }
        const bool shard = groups_ && groups_->expert_sharded[i];
        (shard ? expert_grads : dense_grads).push_back(&params.grad(i));
        (shard ? experts : dense).push_back(params.grad(i));
      }
      if (groups_) {
        RankGroups& g = *groups_;
        if (g.dev_world->size() > 1 && !dense_grads.empty()) g.dev_world->all_reduce_sum_many(dense_grads);
        if (g.dev_edp->size() > 1 && !expert_grads.empty()) g.dev_edp->all_reduce_sum_many(expert_grads);
      }
      const double d = ops::global_grad_norm(dense), e = ops::global_grad_norm(experts), b = ops::global_grad_norm(blocks);
      squares_[0] += d * d;
      squares_[1] += e * e;
      squares_[2] += b * b;
      opt_.update(idx);
      params.release_grads(idx);
    };
  }
  double end_step_in_backward() override {
    if (!groups_) return std::sqrt(squares_[0] + squares_[1] + squares_[2]);
    // Dense squares count once; expert shards' add up over the expert-parallel group, ZeRO-3
    // blocks' over the world (host F64 through gloo).
    RankGroups& g = *groups_;
    double total = norm_across(g, squares_[0], squares_[1]);
    total *= total;
    Tensor sq = Tensor::empty({1}, DType::F64);
    sq.data<double>()[0] = squares_[2];
    g.world_group->all_reduce_sum(sq);
    return std::sqrt(total + sq.data<double>()[0]);
  }
  void sync_to_host() override {
    gm_->params().copy_to_host(model_.params());
    for (size_t i = 0; i < gm_->params().size(); ++i) {  // collectives for split moments: same order on every rank
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
  std::unique_ptr<gpu::GpuModel> gm_;
  gpu::DeviceAdamW opt_;
  gpu::Precision precision_;
  std::array<double, 3> squares_{};  // this step's gradient squares (dense, expert shards, ZeRO-3 blocks)
};

}  // namespace

std::unique_ptr<StepBackend> make_gpu_backend(models::CausalLM& model, AdamW& opt, const std::string& precision,
                                              RankGroups* groups) {
  MF_CHECK(cuda::available(), "device: cuda, but no CUDA device is available on this machine");
  return std::make_unique<GpuBackend>(model, opt, gpu::parse_precision(precision, "recipe"), groups);
}

}  // namespace moeforge::train
