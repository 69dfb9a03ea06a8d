// moeforge launch: one process per GPU on this node (as torchrun --no-python); and moeforge
// dist-check: joins the rendezvous from the launcher's environment and reports, to check a
// multi-process or multi-node setup before a long job.
#include <unistd.h>

#include <chrono>
#include <cstdio>

#include "cli/args.h"
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
  Args args(own, {"--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port"}, {});
  MF_CHECK(args.positionals().empty(), "launch: unexpected '", args.positionals().empty() ? "" : args.positionals()[0],
           "' (the command goes after --)");
  MF_CHECK(!command.empty(), "launch: no command; usage: moeforge launch --nproc-per-node N -- train RECIPE.yaml");
  parallel::LaunchOptions o;
  o.nproc_per_node = static_cast<int>(args.get_int("--nproc-per-node", 1));
  o.nnodes = static_cast<int>(args.get_int("--nnodes", 1));
  o.node_rank = static_cast<int>(args.get_int("--node-rank", 0));
  o.master_addr = args.get("--master-addr").value_or("127.0.0.1");
  o.master_port = static_cast<int>(args.get_int("--master-port", 29500));
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
  Args args(argv, {"--timeout", "--fingerprint"}, {});
  double timeout_s = 60;
  if (const auto t = args.get("--timeout")) {
    try {
      timeout_s = std::stod(*t);
    } catch (const std::exception&) {
      MF_THROW("dist-check: --timeout needs seconds, got '", *t, "'");
    }
  }
  const parallel::DistEnv env = parallel::dist_env();
  parallel::Rendezvous rv(env, args.get("--fingerprint").value_or(""),
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
