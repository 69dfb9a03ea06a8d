// Training checkpoints of a multi-rank run, in the one-rank format: the expert shards of the
// parameters and of the AdamW moments are gathered into the full model and a full optimizer
// (rank 0 then writes an ordinary checkpoint), and on resume every rank slices its shard back out.
// So a run resumes on any world size and ep_size (resharding on load). Every rank holds the whole
// state while it is gathered, which bounds the model size; rank-local shards are owed (issue 6).
#pragma once
#include "models/expert_shards.h"
#include "train/optimizer.h"

namespace moeforge::train {

// Collective over par.ep: `full` (the full model's optimizer) receives every moment, the step count too.
void gather_optimizer(const models::ShardedModel& part, const AdamW& part_opt, const models::Parallel& par,
                      AdamW& full);
// This rank's share of `full`'s moments into `part_opt` (no communication).
void slice_optimizer(const models::ShardedModel& part, const AdamW& full, const models::Parallel& par, AdamW& part_opt);

}  // namespace moeforge::train
