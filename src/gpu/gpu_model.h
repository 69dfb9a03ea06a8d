// A model's parameters on one GPU and the model run on them: the one layer loop of the model
// (models::CausalLM::forward_backward over nn::ParamAccess) with DeviceParams as its storage, so
// it computes on the device in the precision policy's dtype, gradients accumulating there. This
// class adds only what a GPU run measures: per-phase times (MOEFORGE_PHASE_TIMES=1) and the
// expert-exchange chunk count (MOEFORGE_EP_CHUNKS).
#pragma once
#include <memory>
#include <vector>

#include "gpu/device_params.h"
#include "gpu/phase_times.h"
#include "models/causal_lm.h"

namespace moeforge::gpu {

class GpuModel {
 public:
  // `par`: the groups of a multi-GPU run (its expert-parallel group over NCCL, its world over
  // gloo for the load-balancing statistics); `model` must be built for that expert-parallel size.
  GpuModel(const models::CausalLM& model, DeviceParams params, models::Parallel par = {});
  // One micro-batch (host tensors in `in`; labels required).
  models::TrainStepResult forward_backward(const models::ForwardInputs& in, models::TrainStepOptions opts);
  // Host F32 logits [B,S,V] of a forward pass with the device weights (parity checks).
  Tensor forward_logits(const models::ForwardInputs& in);
  DeviceParams& params() { return params_; }
  // The experts each main-model MoE layer chose in the last forward_backward (host I64 [T, k] per
  // MoE layer, in layer order): tests compare runs' routing with it.
  std::vector<Tensor> last_routing() const;
  // Per-phase times (MOEFORGE_PHASE_TIMES=1), summed over the calls since the last clear().
  PhaseTimes& phase_times() { return phases_; }

 private:
  const models::CausalLM& model_;
  DeviceParams params_;
  models::Parallel par_;
  PhaseTimes phases_;
  std::vector<Tensor> last_routing_;
};

// MOEFORGE_EP_CHUNKS (default 1: no overlap of the exchange with the experts). 2 chunks measured
// slower on 2 H200s at EP 2 (8,443 against 8,895 tok/s, q30 48 layers): half-size expert GEMMs,
// twice the routing plans and count exchanges, and NCCL's copies taking SMs from the GEMMs cost
// more than the hidden exchange saved (docs/perf-notes.md). Kept for larger expert-parallel
// groups, where the exchange is a larger share.
int ep_chunks_from_env();

std::unique_ptr<GpuModel> make_gpu_model(const models::CausalLM& model, DeviceParams params, models::Parallel par = {});

}  // namespace moeforge::gpu
