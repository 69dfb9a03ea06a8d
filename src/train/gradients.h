// A training step's gradients across the ranks of a run, on either device: summing them over the
// ranks that hold copies of their parameters, the whole model's norm, and clipping. One
// implementation for the CPU and GPU backends, the optimizer-in-backward callbacks and the bench.
#pragma once
#include <vector>

#include "nn/params.h"
#include "train/ranks.h"

namespace moeforge::train {

// This rank's sums of squared gradients, by how the gradients are shared once summed: dense ones
// are the same on every rank, expert shards differ over the expert-parallel group, ZeRO-3 blocks
// over the world.
struct GradSquares {
  double dense = 0, experts = 0, blocks = 0;
};

// Sums the gradients of parameters `idx` over the ranks holding copies (`g` null: one process,
// nothing to sum): dense ones over the world, expert shards (g->expert_sharded) over the
// expert-data-parallel group, through the host groups or, for parameters on a GPU, the NCCL ones;
// ZeRO-3 blocks (ParamAccess::block_grad) were summed by the layer loop. Adds their squares to
// `sq` (null: no norm wanted, nothing read). Every rank passes the same list.
void sum_gradients(RankGroups* g, nn::ParamAccess& ps, const std::vector<size_t>& idx, GradSquares* sq);
// The whole model's gradient norm from every rank's squares (a collective when `g` is set).
double whole_norm(RankGroups* g, const GradSquares& sq);
// Every gradient: sum_gradients, whole_norm, and torch.nn.utils.clip_grad_norm_'s rule (scaled by
// max_norm / (norm + 1e-6) when that is below 1; max_norm <= 0: no clipping). Returns the norm.
// With `deferred_scale` the gradients are left as they are and the coefficient (1: none) is
// written there for the optimizer to apply as it reads them (AdamWScalars::grad_scale).
double finish_gradients(RankGroups* g, nn::ParamAccess& ps, double max_norm, float* deferred_scale = nullptr);
// The same on one process (the reference the tests hold the rest to).
double clip_grad_norm(nn::ParamAccess& ps, double max_norm);
double global_grad_norm(nn::ParamAccess& ps);

}  // namespace moeforge::train
