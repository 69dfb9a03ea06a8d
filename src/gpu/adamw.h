// AdamW over DeviceParams: the moments live on the device (BF16 under the bf16 policy, as torch
// AdamW keeps them on a BF16 model; F32 otherwise), and a step is one multi-tensor launch with the
// CPU optimizer's per-element arithmetic (ops/adamw_math.h). Under bf16-mixed the F32 masters are
// updated and the BF16 compute copies refreshed in the same pass.
//
// ZeRO-1 under several ranks: the moments of parameters that every rank of a group holds a copy of
// (dense weights over the world, expert shards over their expert-data-parallel group; their
// gradients already summed over the group) are split over the group, each
// rank keeping and updating only its block of each one (parallel::block_of over the flat elements); the
// updated blocks are then exchanged in place (Communicator::all_gather_blocks), so every copy
// again holds the same values. The same update as the unsharded optimizer, element for element.
//
// Rows nothing has reached yet: a parameter whose gradient comes with row flags (the experts'
// weights, the embedding) gets per-row zero-moment flags when its first update finds its moments
// as constructed (all +0), and the kernel keeps them (ops::AdamWTensors::zero_moment_rows): an
// expert no token was ever routed to, or an embedding row of a token the data never held, then
// costs its update no bytes. Moments loaded from a checkpoint give flags from their values (rows
// by the first dimension); an update without row flags ends the parameter's flags for the run.
#pragma once
#include <vector>

#include "parallel/communicator.h"
#include "gpu/device_params.h"
#include "train/optimizer.h"

namespace moeforge::gpu {

// Which parameters' optimizer state is split, and over which device group: per parameter, the
// ranks that hold copies of it (the world for dense weights, the expert-data-parallel group for an
// expert shard); null or a one-rank group: not split. Empty: nothing is split.
struct OptimizerSharding {
  std::vector<parallel::Communicator*> group_of;
};

class DeviceAdamW {
 public:
  DeviceAdamW(DeviceParams& params, train::AdamWOptions opts, OptimizerSharding sharding = {});
  // One full step: begin_step(lr) then update(every parameter). `grad_scale`: gradient clipping's
  // coefficient, applied as the gradients are read (1: none).
  void step(double lr, float grad_scale = 1.f);
  // A step applied in pieces (optimizer in backward): begin_step counts the step and fixes its
  // scalars; update applies them to the given parameters, each exactly once per step.
  void begin_step(double lr, float grad_scale = 1.f);
  void update(const std::vector<size_t>& indices);
  int64_t steps() const { return step_; }
  // Parameter i's whole moments, F32 on the host (gathered from every rank's block when split: a
  // collective then, every rank of the group calls it for the same i), and setting them from the
  // whole host moments (each rank keeps its block). Checkpoints and resumes go through these.
  Tensor exp_avg_host(size_t i) { return moment_host(exp_avg_.at(i), i); }
  Tensor exp_avg_sq_host(size_t i) { return moment_host(exp_avg_sq_.at(i), i); }
  void load_moments(size_t i, const Tensor& exp_avg, const Tensor& exp_avg_sq);
  void set_steps(int64_t steps) { step_ = steps; }
  bool split(size_t i) const { return split_.at(i); }
  int64_t bytes() const;  // device bytes of the moments this rank holds

 private:
  Tensor moment_host(const Tensor& m, size_t i);
  // Parameter i's zero-moment row flags for an update whose gradient has `written_rows` (undefined:
  // none, and the flags end); made all ones while its moments are fresh.
  Tensor zero_moment_flags(size_t i, const Tensor& written_rows);
  parallel::Block block(size_t i) const;

  DeviceParams& params_;
  train::AdamWOptions opts_;
  OptimizerSharding sharding_;
  std::vector<bool> split_;
  std::vector<Tensor> exp_avg_, exp_avg_sq_;  // the block of a split parameter, else the whole
  // Per parameter: whether its moments are still as constructed (+0, never updated or loaded), and
  // its zero-moment row flags once an update with row flags has made them.
  std::vector<bool> moments_fresh_;
  std::vector<Tensor> zero_moment_rows_;
  // Per parameter, after load_moments: its rows (first dimension) whose loaded moments are all +0,
  // on the host, for the first update with row flags of that count to take up.
  std::vector<Tensor> loaded_zero_rows_;
  int64_t step_ = 0;
  double lr_ = 0;
  ops::AdamWScalars scalars_{};
};

}  // namespace moeforge::gpu
