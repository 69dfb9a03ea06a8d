// A model's training step on the GPU: forward, fused LM-head cross-entropy and backward composed
// from the CUDA ops, on device-resident parameters (DeviceParams), gradients accumulating there.
// The same computation as the model's CPU forward_backward, within the policy's rounding.
#pragma once
#include <cmath>
#include <functional>
#include <memory>
#include <vector>

#include "parallel/communicator.h"
#include "gpu/device_params.h"
#include "gpu/phase_times.h"
#include "models/causal_lm.h"

namespace moeforge::gpu {

struct GpuStepOptions {
  float ce_scale = 1.f;    // gradient of the summed token cross-entropy (1 / counted tokens for a mean)
  float aux_scale = 0.f;   // gradient of the load-balancing loss, when the config enables it
  bool balanced_routing = false;  // experts assigned round-robin (benchmarks); the router still learns
  bool activation_checkpointing = false;  // keep each layer's input only; recompute it in backward
  std::vector<float> mtp_scales;  // multi-token prediction depths to train (models::TrainStepOptions)
  // Called during backward with the parameters whose gradients are complete for this micro-batch
  // (a layer's, once its backward is done): the optimizer-in-backward path applies AdamW to them
  // and frees their gradients, so all the gradients never exist at once.
  std::function<void(const std::vector<size_t>&)> on_grads_ready;
};

struct GpuStepResult {
  double ce_sum = 0;       // summed cross-entropy over counted tokens
  int64_t tokens = 0;      // counted tokens
  float aux_loss = NAN;
  std::vector<double> mtp_ce_sums;  // per multi-token prediction depth trained
  std::vector<int64_t> mtp_tokens;
  // Wall time of the forward through the fused LM head + loss (which also produces the head's
  // gradients), and of the rest of the backward; each ends with a device synchronisation.
  double forward_ms = 0, backward_ms = 0;
};

class GpuModel {
 public:
  virtual ~GpuModel() = default;
  // One micro-batch (host tensors in `in`; labels required).
  virtual GpuStepResult forward_backward(const models::ForwardInputs& in, const GpuStepOptions& opts) = 0;
  // Host F32 logits [B,S,V] of a forward pass with the device weights (parity checks).
  virtual Tensor forward_logits(const models::ForwardInputs& in) = 0;
  virtual DeviceParams& params() = 0;
  // The experts each main-model MoE layer chose in the last forward_backward (host I64 [T, k] per
  // MoE layer, in layer order): tests compare runs' routing with it.
  virtual std::vector<Tensor> last_routing() const = 0;
  // Per-phase times (MOEFORGE_PHASE_TIMES=1), summed over the calls since the last clear().
  PhaseTimes& phase_times() { return phases_; }

 protected:
  PhaseTimes phases_;
};

// The groups a GPU model computes across when several ranks share a run (none: one GPU).
struct GpuParallel {
  // Device (NCCL) group over which the model's experts are split; `model` must hold this rank's
  // shard of them (models::shard_experts). Null: every expert is on this GPU.
  parallel::Communicator* ep = nullptr;
  // Host group of the ranks that split each batch: the load-balancing loss sums its statistics
  // over it, so it is the whole batch's loss. Null: this rank's batch is the whole batch.
  parallel::Communicator* dp = nullptr;
};

// The GPU path of `model`'s family over `params` (DeviceParams(model.params(), precision) to
// upload loaded weights, DeviceParams::random for benchmarks). Throws for families without one.
std::unique_ptr<GpuModel> make_gpu_model(const models::CausalLM& model, DeviceParams params, GpuParallel par = {});

}  // namespace moeforge::gpu
