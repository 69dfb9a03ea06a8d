// Where this process sits in a distributed job, read from the launcher's environment: torchrun's
// (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT; also what `moeforge
// launch` sets) or Slurm's (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, SLURM_NTASKS_PER_NODE, with
// MASTER_ADDR given by the job script or SLURM_LAUNCH_NODE_IPADDR). With neither, one process.
#pragma once
#include <functional>
#include <string>

namespace moeforge::parallel {

struct DistEnv {
  int rank = 0, local_rank = 0, world_size = 1, local_world_size = 1;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  std::string source = "single process";  // "torchrun", "slurm" or "single process"
};

// Looks variables up through `get` (returns nullptr when unset), so tests can pass their own.
// Throws naming the variable when one is malformed or the set is inconsistent.
DistEnv dist_env_from(const std::function<const char*(const char*)>& get);
// From the process environment.
DistEnv dist_env();

// MOEFORGE_EP_CHUNKS: the token chunks a MoE layer splits its expert exchange into under expert
// parallelism (nn::RunContext::ep_chunks; default 1, no overlap of the exchange with the experts).
// 2 chunks measured slower on 2 H200s at EP 2 (8,443 against 8,895 tok/s, q30 48 layers):
// half-size expert GEMMs, twice the routing plans and count exchanges, and NCCL's copies taking
// SMs from the GEMMs cost more than the hidden exchange saved (docs/perf-notes.md). Kept for
// larger expert-parallel groups, where the exchange is a larger share. Throws outside 1..16.
int ep_chunks_from_env();

}  // namespace moeforge::parallel
