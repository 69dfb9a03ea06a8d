#include "train/backend.h"

#include <cmath>

#include "ops/ops.h"

namespace moeforge::train {

namespace {

class CpuBackend : public StepBackend {
 public:
  CpuBackend(models::CausalLM& model, AdamW& opt, RankGroups* groups) : model_(model), opt_(opt), groups_(groups) {
    model_.params().ensure_grads();
  }
  void zero_grad() override { model_.params().zero_grad(); }
  models::TrainStepResult forward_backward(const models::ForwardInputs& in, const models::TrainStepOptions& o) override {
    return model_.forward_backward(in, o);
  }
  double finish_gradients(double max_norm) override {
    if (groups_) {
      reduce_gradients(*groups_, model_.params());
      return clip_grad_norm_across(*groups_, model_.params(), max_norm);
    }
    return max_norm > 0 ? train::clip_grad_norm(model_.params(), max_norm) : global_grad_norm(model_.params());
  }
  void step(double lr) override { opt_.step(lr); }
  std::function<void(const std::vector<size_t>&)> begin_step_in_backward(double lr) override {
    opt_.begin_step(lr);
    dense_squares_ = expert_squares_ = 0;
    return [this](const std::vector<size_t>& idx) {
      nn::ParamStore& ps = model_.params();
      if (groups_) reduce_gradients(*groups_, ps, &idx);
      for (const size_t i : idx) {
        const double n = ops::global_grad_norm({ps.grad(i)});
        (groups_ && groups_->expert_sharded[i] ? expert_squares_ : dense_squares_) += n * n;
      }
      opt_.update(idx);
    };
  }
  double end_step_in_backward() override {
    return groups_ ? norm_across(*groups_, dense_squares_, expert_squares_)
                         : std::sqrt(dense_squares_ + expert_squares_);
  }
  void sync_to_host() override {}
  std::string describe() const override { return "cpu, fp32"; }

 private:
  models::CausalLM& model_;
  AdamW& opt_;
  RankGroups* groups_;
  double dense_squares_ = 0, expert_squares_ = 0;  // this step's, under optimizer_in_backward
};

}  // namespace

std::unique_ptr<StepBackend> make_cpu_backend(models::CausalLM& model, AdamW& opt, RankGroups* groups) {
  return std::make_unique<CpuBackend>(model, opt, groups);
}

}  // namespace moeforge::train
