#include "train/backend.h"
#include "train/gradients.h"

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
    return train::finish_gradients(groups_, model_.params(), max_norm, &clip_scale_);
  }
  models::ForwardOutputs evaluate(const models::ForwardInputs& in) override { return model_.forward(in); }
  void step(double lr) override {
    opt_.step(lr, clip_scale_);  // the clipping finish_gradients decided
    clip_scale_ = 1.f;
  }
  std::function<void(const std::vector<size_t>&)> begin_step_in_backward(double lr) override {
    opt_.begin_step(lr);
    squares_ = {};
    return [this](const std::vector<size_t>& idx) {
      sum_gradients(groups_, model_.params(), idx, &squares_);
      opt_.update(idx);
    };
  }
  double end_step_in_backward() override { return whole_norm(groups_, squares_); }
  void sync_to_host() override {}
  std::string describe() const override { return "cpu, fp32"; }

 private:
  models::CausalLM& model_;
  AdamW& opt_;
  RankGroups* groups_;
  GradSquares squares_;  // this step's, under optimizer_in_backward
  float clip_scale_ = 1.f;  // from finish_gradients, applied by the next step
};

}  // namespace

std::unique_ptr<StepBackend> make_cpu_backend(models::CausalLM& model, AdamW& opt, RankGroups* groups) {
  return std::make_unique<CpuBackend>(model, opt, groups);
}

}  // namespace moeforge::train
