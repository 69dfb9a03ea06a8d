#include "train/backend.h"

namespace moeforge::train {

namespace {

class CpuBackend : public StepBackend {
 public:
  CpuBackend(models::CausalLM& model, AdamW& opt, RankShare ranks) : model_(model), opt_(opt), ranks_(ranks) {
    model_.params().ensure_grads();
  }
  void zero_grad() override { model_.params().zero_grad(); }
  models::TrainStepResult forward_backward(const models::ForwardInputs& in, const models::TrainStepOptions& o) override {
    return model_.forward_backward(in, o);
  }
  double finish_gradients(double max_norm) override {
    if (ranks_.groups) {
      reduce_gradients(*ranks_.groups, model_.params(), *ranks_.sharded);
      return clip_grad_norm_across(*ranks_.groups, model_.params(), *ranks_.sharded, max_norm);
    }
    return max_norm > 0 ? train::clip_grad_norm(model_.params(), max_norm) : global_grad_norm(model_.params());
  }
  void step(double lr) override { opt_.step(lr); }
  void sync_to_host() override {}
  std::string describe() const override { return "cpu, fp32"; }

 private:
  models::CausalLM& model_;
  AdamW& opt_;
  RankShare ranks_;
};

}  // namespace

std::unique_ptr<StepBackend> make_cpu_backend(models::CausalLM& model, AdamW& opt, RankShare ranks) {
  return std::make_unique<CpuBackend>(model, opt, ranks);
}

}  // namespace moeforge::train
