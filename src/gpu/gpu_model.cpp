#include "gpu/gpu_model.h"

#include <cstdlib>

#include "core/error.h"
#include "ops/cuda/runtime.h"

namespace moeforge::gpu {

GpuModel::GpuModel(const models::CausalLM& model, DeviceParams params, models::Parallel par)
    : model_(model), params_(std::move(params)), par_(par) {
  MF_CHECK(params_.size() == model.params().all().size(), "GPU model: ", params_.size(),
           " device parameters for a model with ", model.params().all().size());
}

models::TrainStepResult GpuModel::forward_backward(const models::ForwardInputs& in, models::TrainStepOptions opts) {
  opts.ep_chunks = par_.ep && par_.ep->size() > 1 ? ep_chunks_from_env() : 1;
  if (phases_.enabled()) {
    phases_.start();
    opts.mark_phase = [this](const char* phase) { phases_.mark(phase); };
  }
  models::TrainStepResult r = model_.forward_backward(params_, in, opts, par_);
  last_routing_ = std::move(r.routing);
  r.routing.clear();
  return r;
}

Tensor GpuModel::forward_logits(const models::ForwardInputs& in) {
  models::ForwardInputs plain = in;
  plain.labels = nullptr;
  return model_.forward(params_, plain, par_).logits;
}

std::vector<Tensor> GpuModel::last_routing() const {
  std::vector<Tensor> out;
  for (const Tensor& c : last_routing_) out.push_back(cuda::to_host_f32(c));  // I64 stays I64
  return out;
}

int ep_chunks_from_env() {
  static const int configured = [] {
    const char* v = std::getenv("MOEFORGE_EP_CHUNKS");
    const int n = v ? std::atoi(v) : 1;
    MF_CHECK(n >= 1 && n <= 16, "MOEFORGE_EP_CHUNKS must be 1..16, got '", v ? v : "", "'");
    return n;
  }();
  return configured;
}

std::unique_ptr<GpuModel> make_gpu_model(const models::CausalLM& model, DeviceParams params, models::Parallel par) {
  return std::make_unique<GpuModel>(model, std::move(params), par);
}

}  // namespace moeforge::gpu
