// Tests' shorthand for a model run on device parameters: the model's one layer loop with
// gpu::DeviceParams as its storage (what the GPU backend runs), keeping the last step's routing.
#pragma once
#include <memory>
#include <vector>

#include "gpu/device_params.h"
#include "models/causal_lm.h"
#include "ops/cuda/runtime.h"

namespace moeforge::test {

struct DeviceRun {
  DeviceRun(const models::CausalLM& m, gpu::DeviceParams p) : model(m), device(std::move(p)) {}
  models::TrainStepResult forward_backward(const models::ForwardInputs& in, const models::TrainStepOptions& o) {
    models::TrainStepResult r = model.forward_backward(device, in, o, {});
    routing = r.routing;
    return r;
  }
  Tensor forward_logits(const models::ForwardInputs& in) { return model.forward(device, in, {}).logits; }
  gpu::DeviceParams& params() { return device; }
  // The last step's expert choice per main-model MoE layer, on the host (I64 [T, k]).
  std::vector<Tensor> last_routing() const {
    std::vector<Tensor> out;
    for (const Tensor& c : routing) out.push_back(cuda::to_host_f32(c));  // I64 stays I64
    return out;
  }
  const models::CausalLM& model;
  gpu::DeviceParams device;
  std::vector<Tensor> routing;
};

inline std::unique_ptr<DeviceRun> on_device(const models::CausalLM& m, gpu::DeviceParams p) {
  return std::make_unique<DeviceRun>(m, std::move(p));
}

}  // namespace moeforge::test
