// A model's expert-parallel copy: the same family built with this rank's groups, its parameters
// taken from a full (one-rank) model, experts sliced to the rank's shard; and the way back, the
// shards gathered into the full model (for saving one Hugging Face folder).
#pragma once
#include <memory>
#include <vector>

#include "models/causal_lm.h"

namespace moeforge::models {

struct ShardedModel {
  std::unique_ptr<CausalLM> model;
  std::vector<bool> sharded;  // per parameter: holds this rank's experts only
};

// Builds `full`'s family with `par` and copies every parameter, slicing the ones whose first
// dimension is split over the expert-parallel group.
ShardedModel shard_experts(const CausalLM& full, const Parallel& par);

// Writes `part`'s parameters into `full`: dense ones as they are, sharded ones gathered over
// `par.ep` (every rank of the group takes part).
void gather_experts(const ShardedModel& part, const Parallel& par, CausalLM& full);

}  // namespace moeforge::models
