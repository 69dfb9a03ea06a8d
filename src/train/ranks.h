// This process's place in a multi-rank training run (gloo between hosts' tensors, NCCL between GPUs'): every rank joins rank 0's store
// with the hash of its resolved recipe (a rank that never joins, or runs another recipe, is named),
// then the groups of the dp x ep mesh are connected: rank = dp_index * ep_size + ep_index; the
// expert-parallel group shares one dp_index, the expert-data-parallel group one ep_index.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "parallel/communicator.h"
#include "parallel/env.h"
#include "parallel/rendezvous.h"
#include "models/causal_lm.h"
#include "nn/params.h"

namespace moeforge::train {

// The one description of a multi-rank run a model, a backend or the bench needs (models::Parallel
// is the view of it a model's layers take).
struct RankGroups {
  int rank = 0, world = 1, ep_size = 1;
  // Per parameter of this rank's model: whether it is a shard of the experts (summed over the
  // expert-data-parallel group, not the world). Set by whoever built the model (models::expert_sharded_params).
  std::vector<bool> expert_sharded;
  // GPU ranks: 1 splits the dense parameters' AdamW moments (ZeRO-1); 3 also their values and
  // gradients (ZeRO-3, gathered layer by layer).
  int64_t zero_stage = 1;
  std::unique_ptr<parallel::Rendezvous> rendezvous;  // kept: rank 0 serves the store until the end
  std::unique_ptr<parallel::Communicator> world_group, ep, edp;  // gloo, host tensors
  // The same groups over NCCL for device tensors, when the run trains on GPUs (else null).
  std::unique_ptr<parallel::Communicator> dev_world, dev_ep, dev_edp;
  models::Parallel parallel() const { return {world_group.get(), ep.get()}; }
  // The same for a model running on GPUs: the exchange over the NCCL expert-parallel group (the
  // load-balancing statistics still sum over gloo, on the host).
  models::Parallel device_parallel() const { return {world_group.get(), dev_ep.get()}; }
  bool is_main() const { return rank == 0; }
  // Per parameter, the device group of the ranks holding copies of it (ZeRO's split groups): the
  // world for dense parameters, the expert-data-parallel group for expert shards (`expert_sharded`).
  std::vector<parallel::Communicator*> device_copy_groups() const {
    std::vector<parallel::Communicator*> g;
    for (bool expert : expert_sharded) g.push_back(expert ? dev_edp.get() : dev_world.get());
    return g;
  }
};

// `where`: the recipe file, for messages. Checks that ep_size divides the world and the experts.
// `gpus`: also connect the NCCL groups (on the CUDA device already chosen for this rank).
std::unique_ptr<RankGroups> join_ranks(const parallel::DistEnv& env, int64_t ep_size, int64_t experts,
                                       const std::string& recipe_hash, const std::string& where, bool gpus = false);

// One GPU per rank, by its place on this node (LOCAL_RANK), chosen before anything touches a
// device; an error naming `where` when the node has fewer GPUs than ranks.
void use_local_gpu(const parallel::DistEnv& env, const std::string& where);

// A sum over the world of one number per rank (the cross-entropy sums of the micro-batches).
double sum_over_world(RankGroups& g, double v);

}  // namespace moeforge::train
