// The training-step benchmark of shared/BENCHMARKS.md: random weights in a config's architecture,
// vocab-uniform random tokens, forward + loss + backward + AdamW per step; medians over the timed
// steps after warm-up; model FLOPs counted from the config. Started by moeforge launch / torchrun /
// srun it runs on one GPU per rank: experts split over ep_size ranks (NCCL all-to-all), dense
// weights replicated with their gradients summed over all ranks (and expert gradients over the
// expert-data-parallel group) before each update, or under zero_stage 3 split over the ranks and
// gathered layer by layer (gradients reduce-scattered); every rank its own batch. Figures are per GPU:
// the slowest rank's step time and the largest peak memory.
#pragma once
#include <optional>
#include <cstdint>
#include <string>

#include "models/lora.h"
#include "gpu/precision.h"
#include "hf/config.h"

namespace moeforge::gpu {

struct BenchOptions {
  int64_t seq = 4096, batch = 1, steps = 10, warmup = 3;
  bool balanced_routing = false;
  Precision precision = Precision::BF16;
  bool activation_checkpointing = false;
  // AdamW applied layer by layer during backward, each layer's gradients freed once applied (the
  // same update as a step after backward when, as here, there is no clipping or accumulation).
  bool optimizer_in_backward = false;
  // Gradient clipping as `moeforge train` does it (torch's clip_grad_norm_ rule; 0: none, as the
  // Transformers baseline, which does not clip). Not with optimizer_in_backward.
  double max_grad_norm = 0;
  int64_t ep_size = 0;  // several ranks: experts split over this many (0: all of them)
  int zero_stage = 1;   // several ranks: 1 splits dense AdamW moments; 3 also dense weights and gradients
  uint64_t seed = 1234;
  double lr = 1e-5, weight_decay = 0.01;  // torch.optim.AdamW's default decay, as the baseline
  // LoRA (one GPU): adapters on these targets, the base frozen in the compute dtype.
  std::optional<models::LoraOptions> lora;
};

struct BenchResult {
  double tokens_per_s = 0, tflops = 0;
  double forward_ms = 0, backward_ms = 0, optimizer_ms = 0, step_ms = 0;  // medians
  double peak_allocated_gib = 0, peak_reserved_gib = 0, device_used_gib = 0;
  double first_loss = 0, last_loss = 0;
  double last_grad_norm = 0;  // the last step's whole gradient norm (when clipping)
  int64_t params = 0;            // of the whole model (the base's, with LoRA)
  int64_t trainable_params = 0;  // those trained (LoRA: the adapters')
  std::string device;
  int world = 1, ep_size = 1;
};

// `progress` is called after every step with (step, steps in all, loss, step ms).
BenchResult run_bench(const hf::ModelConfig& cfg, const BenchOptions& opts,
                      void (*progress)(int64_t, int64_t, double, double) = nullptr);

}  // namespace moeforge::gpu
