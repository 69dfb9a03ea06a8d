#include "train/ranks.h"

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "core/error.h"
#include "ops/cuda/runtime.h"

namespace moeforge::train {

namespace {

// MOEFORGE_DIST_TIMEOUT (seconds, default 120): how long start-up and each collective may wait.
std::chrono::milliseconds dist_timeout() {
  const char* v = std::getenv("MOEFORGE_DIST_TIMEOUT");
  const double s = v ? std::atof(v) : 120.0;
  MF_CHECK(s > 0, "MOEFORGE_DIST_TIMEOUT must be a positive number of seconds, got '", v ? v : "", "'");
  return std::chrono::milliseconds(static_cast<int64_t>(s * 1000));
}

// The address peers reach this rank at: loopback when every rank is on this machine.
std::string this_host(const parallel::DistEnv& env) {
  if (env.world_size == env.local_world_size) return "127.0.0.1";
  char name[256] = {0};
  MF_CHECK(gethostname(name, sizeof name - 1) == 0, "gethostname failed");
  return name;
}


}  // namespace

std::unique_ptr<RankGroups> join_ranks(const parallel::DistEnv& env, int64_t ep_size, int64_t experts,
                                       const std::string& recipe_hash, const std::string& where, bool gpus) {
  MF_CHECK(ep_size >= 1 && env.world_size % ep_size == 0, where, ": key 'ep_size': ", ep_size,
           " does not divide the world size ", env.world_size);
  MF_CHECK(experts % ep_size == 0, where, ": key 'ep_size': ", ep_size, " does not divide the model's ", experts,
           " experts");
  MF_CHECK(parallel::gloo_available(), where, ": a multi-rank run needs gloo (host-side collectives), and this moeforge was "
           "built without it (install libgloo-dev: scripts/install-deps.sh)");
  MF_CHECK(!gpus || parallel::nccl_available(), where, ": a multi-GPU run needs NCCL, and this moeforge was built without it");
  const auto timeout = dist_timeout();
  auto g = std::make_unique<RankGroups>();
  g->rank = env.rank;
  g->world = env.world_size;
  g->ep_size = static_cast<int>(ep_size);
  g->rendezvous = std::make_unique<parallel::Rendezvous>(env, recipe_hash, timeout);
  const std::string host = this_host(env);
  const int ep = g->ep_size, dp_index = env.rank / ep, ep_index = env.rank % ep;
  auto& store = g->rendezvous->store();
  g->world_group = parallel::connect_gloo(store, "world", env.rank, env.world_size, host, timeout);
  g->ep = parallel::connect_gloo(store, "ep" + std::to_string(dp_index), ep_index, ep, host, timeout);
  g->edp = parallel::connect_gloo(store, "edp" + std::to_string(ep_index), dp_index, env.world_size / ep, host, timeout);
  if (gpus) {
    g->dev_world = parallel::connect_nccl(store, "world", env.rank, env.world_size, timeout);
    g->dev_ep = parallel::connect_nccl(store, "ep" + std::to_string(dp_index), ep_index, ep, timeout);
    g->dev_edp = parallel::connect_nccl(store, "edp" + std::to_string(ep_index), dp_index, env.world_size / ep, timeout);
  }
  // A collective that times out says which rank stopped answering (the rendezvous' heartbeats,
  // watched for kDiagnosisWindow, plus connecting and reading: the collectives wait that much less).
  constexpr std::chrono::milliseconds kDiagnosisWindow(1500);
  for (auto* c : {&g->world_group, &g->ep, &g->edp, &g->dev_world, &g->dev_ep, &g->dev_edp})
    if (*c) (*c)->set_timeout_diagnosis([rv = g->rendezvous.get()] { return rv->stalled_peers(kDiagnosisWindow); },
                                        kDiagnosisWindow + std::chrono::milliseconds(500));
  return g;
}

void use_local_gpu(const parallel::DistEnv& env, const std::string& where) {
  MF_CHECK(cuda::device_count() >= env.local_world_size, where, ": cuda with ", env.local_world_size,
           " ranks on this node, but it has ", cuda::device_count(), " GPU(s)");
  cuda::set_device(env.local_rank);
}

double sum_over_world(RankGroups& g, double v) {
  Tensor t = Tensor::empty({1}, DType::F64);
  t.data<double>()[0] = v;
  g.world_group->all_reduce_sum(t);
  return t.data<double>()[0];
}

}  // namespace moeforge::train
