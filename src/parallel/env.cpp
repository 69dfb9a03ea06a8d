#include "parallel/env.h"

#include <cstdlib>
#include <string>

#include "core/error.h"

namespace moeforge::parallel {

namespace {

int int_var(const std::function<const char*(const char*)>& get, const char* name, int def, int min_value) {
  const char* v = get(name);
  if (!v) return def;
  const std::string s(v);
  size_t used = 0;
  long long x = 0;
  try {
    x = std::stoll(s, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  MF_CHECK(used == s.size() && !s.empty() && x >= min_value && x <= 1 << 24, "environment variable ", name, "='", s,
           "' is not an integer >= ", min_value);
  return static_cast<int>(x);
}

}  // namespace

DistEnv dist_env_from(const std::function<const char*(const char*)>& get) {
  DistEnv e;
  if (get("RANK") || get("WORLD_SIZE")) {
    MF_CHECK(get("RANK") && get("WORLD_SIZE"), "environment: RANK and WORLD_SIZE must be set together (torchrun sets both)");
    e.source = "torchrun";
    e.rank = int_var(get, "RANK", 0, 0);
    e.world_size = int_var(get, "WORLD_SIZE", 1, 1);
    e.local_rank = int_var(get, "LOCAL_RANK", e.rank, 0);
    e.local_world_size = int_var(get, "LOCAL_WORLD_SIZE", e.world_size, 1);
  } else if (get("SLURM_PROCID") && get("SLURM_NTASKS")) {
    e.source = "slurm";
    e.rank = int_var(get, "SLURM_PROCID", 0, 0);
    e.world_size = int_var(get, "SLURM_NTASKS", 1, 1);
    e.local_rank = int_var(get, "SLURM_LOCALID", 0, 0);
    // SLURM_NTASKS_PER_NODE is "8" or, with --ntasks alone, may be absent; "8(x2)" forms keep the count.
    if (const char* per = get("SLURM_NTASKS_PER_NODE")) {
      const std::string s(per);
      const std::string head = s.substr(0, s.find('('));
      auto only = [&](const char*) -> const char* { return head.c_str(); };
      e.local_world_size = int_var(only, "SLURM_NTASKS_PER_NODE", 1, 1);
    } else {
      e.local_world_size = e.world_size;
    }
    if (!get("MASTER_ADDR") && get("SLURM_LAUNCH_NODE_IPADDR")) e.master_addr = get("SLURM_LAUNCH_NODE_IPADDR");
  } else {
    return e;
  }
  if (const char* a = get("MASTER_ADDR")) e.master_addr = a;
  MF_CHECK(!e.master_addr.empty(), "environment variable MASTER_ADDR is empty");
  e.master_port = int_var(get, "MASTER_PORT", 29500, 1);
  MF_CHECK(e.master_port <= 65535, "environment variable MASTER_PORT=", e.master_port, " is not a TCP port");
  MF_CHECK(e.rank < e.world_size, "environment (", e.source, "): rank ", e.rank, " is not below the world size ",
           e.world_size);
  MF_CHECK(e.local_rank < e.local_world_size, "environment (", e.source, "): local rank ", e.local_rank,
           " is not below the local world size ", e.local_world_size);
  return e;
}

DistEnv dist_env() {
  return dist_env_from([](const char* name) { return static_cast<const char*>(std::getenv(name)); });
}

int ep_chunks_from_env() {
  static const int configured = [] {
    const char* v = std::getenv("MOEFORGE_EP_CHUNKS");
    const int n = v ? std::atoi(v) : 1;
    MF_CHECK(n >= 1 && n <= 16, "MOEFORGE_EP_CHUNKS must be 1..16, got '", v ? v : "", "'");
    return n;
  }();
  return configured;
}

}  // namespace moeforge::parallel
