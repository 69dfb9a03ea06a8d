#include "train/backend.h"

namespace moeforge::train {

namespace {

class CpuBackend : public StepBackend {
 public:
  CpuBackend(models::CausalLM& model, AdamW& opt) : model_(model), opt_(opt) { model_.params().ensure_grads(); }
  void zero_grad() override { model_.params().zero_grad(); }
  models::TrainStepResult forward_backward(const models::ForwardInputs& in, const models::TrainStepOptions& o) override {
    return model_.forward_backward(in, o);
  }
  double clip_grad_norm(double max_norm) override {
    return max_norm > 0 ? train::clip_grad_norm(model_.params(), max_norm) : global_grad_norm(model_.params());
  }
  void step(double lr) override { opt_.step(lr); }
  void sync_to_host() override {}
  std::string describe() const override { return "cpu, fp32"; }

 private:
  models::CausalLM& model_;
  AdamW& opt_;
};

}  // namespace

std::unique_ptr<StepBackend> make_cpu_backend(models::CausalLM& model, AdamW& opt) {
  return std::make_unique<CpuBackend>(model, opt);
}

}  // namespace moeforge::train
