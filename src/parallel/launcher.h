// The local half of `moeforge launch` (as torchrun --no-python): starts one process per GPU on this
// node with the torchrun variables set, forwards SIGINT/SIGTERM/SIGHUP to them, and when one fails
// stops the rest, so a job never hangs on a dead rank.
#pragma once
#include <chrono>
#include <string>
#include <vector>

namespace moeforge::parallel {

struct LaunchOptions {
  int nproc_per_node = 1, nnodes = 1, node_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  std::chrono::milliseconds grace{5000};  // SIGTERM, then SIGKILL after this long
};

// Runs `argv` (argv[0] looked up on PATH) nproc_per_node times with RANK, LOCAL_RANK, WORLD_SIZE,
// LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT set. Returns 0 when every process succeeds;
// otherwise prints one line naming the first rank that failed, stops the others, and returns its
// exit code (128 + signal for a process killed by a signal).
int launch_local(const LaunchOptions& o, const std::vector<std::string>& argv);

}  // namespace moeforge::parallel
