// The trainer's step on one GPU: GpuModel + DeviceAdamW behind train::StepBackend.
#include "core/error.h"
#include "gpu/adamw.h"
#include "gpu/gpu_model.h"
#include "ops/cuda/runtime.h"
#include "train/backend.h"

namespace moeforge::train {

namespace {

class GpuBackend : public StepBackend {
 public:
  GpuBackend(models::CausalLM& model, AdamW& host_opt, gpu::Precision p)
      : model_(model),
        host_opt_(host_opt),
        gm_(gpu::make_gpu_model(model, gpu::DeviceParams(model.params(), p))),
        opt_(gm_->params(), host_opt.options()),
        precision_(p) {
    // A resumed run: continue from the host optimizer's state.
    for (size_t i = 0; i < gm_->params().size(); ++i) {
      opt_.exp_avg(i) = cuda::to_device(host_opt.exp_avg(i), opt_.exp_avg(i).dtype());
      opt_.exp_avg_sq(i) = cuda::to_device(host_opt.exp_avg_sq(i), opt_.exp_avg_sq(i).dtype());
    }
    opt_.set_steps(host_opt.steps());
  }
  void zero_grad() override { gm_->params().zero_grad(); }
  models::TrainStepResult forward_backward(const models::ForwardInputs& in, const models::TrainStepOptions& o) override {
    gpu::GpuStepOptions go;
    go.ce_scale = o.ce_scale;
    go.aux_scale = o.aux_scale;
    go.activation_checkpointing = o.activation_checkpointing;
    const gpu::GpuStepResult r = gm_->forward_backward(in, go);
    models::TrainStepResult out;
    out.ce_sum = r.ce_sum;
    out.tokens = r.tokens;
    out.aux_loss = r.aux_loss;
    return out;
  }
  double clip_grad_norm(double max_norm) override { return opt_.clip_grad_norm(max_norm); }
  void step(double lr) override { opt_.step(lr); }
  void sync_to_host() override {
    gm_->params().copy_to_host(model_.params());
    for (size_t i = 0; i < gm_->params().size(); ++i) {
      host_opt_.exp_avg(i) = cuda::to_host_f32(opt_.exp_avg(i)).view(host_opt_.exp_avg(i).shape());
      host_opt_.exp_avg_sq(i) = cuda::to_host_f32(opt_.exp_avg_sq(i)).view(host_opt_.exp_avg_sq(i).shape());
    }
    host_opt_.set_steps(opt_.steps());
  }
  std::string describe() const override {
    return "cuda (" + cuda::device_name() + "), " + gpu::precision_name(precision_);
  }

 private:
  models::CausalLM& model_;
  AdamW& host_opt_;
  std::unique_ptr<gpu::GpuModel> gm_;
  gpu::DeviceAdamW opt_;
  gpu::Precision precision_;
};

}  // namespace

std::unique_ptr<StepBackend> make_gpu_backend(models::CausalLM& model, AdamW& opt, const std::string& precision) {
  MF_CHECK(cuda::available(), "device: cuda, but no CUDA device is available on this machine");
  return std::make_unique<GpuBackend>(model, opt, gpu::parse_precision(precision, "recipe"));
}

}  // namespace moeforge::train
