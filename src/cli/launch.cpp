// moeforge launch: one process per GPU on this node (as torchrun --no-python); and moeforge
// dist-check: joins the rendezvous from the launcher's environment and reports, to check a
// multi-process or multi-node setup before a long job.
#include <unistd.h>

#include <chrono>
#include <cstdio>

#include "cli/app.h"
#include "cli/commands.h"
#include "core/error.h"
#include "parallel/launcher.h"
#include "parallel/rendezvous.h"

namespace moeforge::cli {

int cmd_launch(const std::vector<std::string>& argv) {
  std::vector<std::string> own, command;
  bool after = false;
  for (const auto& a : argv) {
    if (!after && a == "--") {
      after = true;
      continue;
    }
    (after ? command : own).push_back(a);
  }
  auto app = make_app("launch", "One process per GPU on this node with the torchrun variables set (RANK, WORLD_SIZE, "
                      "LOCAL_RANK,\nMASTER_ADDR, MASTER_PORT, ...); stops them all when one fails. The command goes "
                      "after --: a moeforge\ncommand runs this binary, anything else as given.",
                      "\nExamples:\n  moeforge launch --nproc-per-node 8 -- train recipe.yaml device=cuda ep_size=8\n"
                      "  moeforge launch --nnodes 2 --node-rank 0 --master-addr HOST --nproc-per-node 8 -- dist-check");
  parallel::LaunchOptions o;
  o.master_addr = "127.0.0.1";
  o.master_port = 29500;
  app->add_option("--nproc-per-node", o.nproc_per_node, "processes (GPUs) on this node")->check(at_least(1));
  app->add_option("--nnodes", o.nnodes, "nodes in the job")->check(at_least(1));
  app->add_option("--node-rank", o.node_rank, "this node's index")->check(at_least(0));
  app->add_option("--master-addr", o.master_addr, "the rendezvous host (node 0)");
  app->add_option("--master-port", o.master_port, "the rendezvous port")->check(CLI::Range(1, 65535));
  if (auto code = parse(*app, own)) return *code;
  MF_CHECK(!command.empty(), "launch: no command; usage: moeforge launch --nproc-per-node N -- train RECIPE.yaml");
  // A moeforge subcommand after -- runs this same binary.
  if (command[0] != "launch" && find_command(command[0])) {
    char self[4096] = {0};
    const ssize_t n = ::readlink("/proc/self/exe", self, sizeof self - 1);
    MF_CHECK(n > 0, "launch: cannot find this moeforge binary (/proc/self/exe)");
    command.insert(command.begin(), std::string(self, static_cast<size_t>(n)));
  }
  return parallel::launch_local(o, command);
}

int cmd_dist_check(const std::vector<std::string>& argv) {
  auto app = make_app("dist-check", "Join the rendezvous from the torchrun or Slurm environment and report: checks a "
                      "job's setup\nbefore a long run.",
                      "\nExample: moeforge launch --nproc-per-node 4 -- dist-check");
  double timeout_s = 60;
  std::string fingerprint;
  app->add_option("--timeout", timeout_s, "seconds to wait for every rank")->check(at_least(0.001));
  app->add_option("--fingerprint", fingerprint, "a string every rank must agree on (e.g. a recipe's hash)");
  if (auto code = parse(*app, argv)) return *code;
  const parallel::DistEnv env = parallel::dist_env();
  parallel::Rendezvous rv(env, fingerprint,
                      std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000)));
  const std::string token = rv.broadcast("check", "hello from rank 0");
  char host[256] = {0};
  ::gethostname(host, sizeof host - 1);
  std::printf("rank %d of %d (local %d of %d, %s) on %s: rendezvous at %s:%d ok, broadcast '%s'\n", env.rank,
              env.world_size, env.local_rank, env.local_world_size, env.source.c_str(), host, env.master_addr.c_str(),
              env.master_port, token.c_str());
  return 0;
}

}  // namespace moeforge::cli
