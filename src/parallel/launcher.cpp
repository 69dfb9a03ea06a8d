#include "parallel/launcher.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "core/error.h"

namespace moeforge::parallel {

namespace {

volatile sig_atomic_t g_signal = 0;
void on_signal(int sig) { g_signal = sig; }

int exit_code(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return 1;
}

std::string describe(int status) {
  if (WIFSIGNALED(status)) return std::string("was killed by signal ") + std::to_string(WTERMSIG(status)) + " (" +
                                  strsignal(WTERMSIG(status)) + ")";
  return "exited with code " + std::to_string(exit_code(status));
}

}  // namespace

int launch_local(const LaunchOptions& o, const std::vector<std::string>& argv) {
  MF_CHECK(!argv.empty(), "launch: no command to run (put it after --)");
  MF_CHECK(o.nproc_per_node >= 1 && o.nnodes >= 1 && o.node_rank >= 0 && o.node_rank < o.nnodes,
           "launch: need --nproc-per-node >= 1, --nnodes >= 1 and 0 <= --node-rank < --nnodes");
  MF_CHECK(o.master_port >= 1 && o.master_port <= 65535, "launch: --master-port ", o.master_port, " is not a TCP port");
  const int world = o.nproc_per_node * o.nnodes;
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  struct sigaction old_int {}, old_term {}, old_hup {};
  sigaction(SIGINT, &sa, &old_int);
  sigaction(SIGTERM, &sa, &old_term);
  sigaction(SIGHUP, &sa, &old_hup);
  g_signal = 0;

  std::vector<pid_t> pids(static_cast<size_t>(o.nproc_per_node), -1);
  for (int local = 0; local < o.nproc_per_node; ++local) {
    const pid_t pid = ::fork();
    MF_CHECK(pid >= 0, "launch: fork failed: ", std::strerror(errno));
    if (pid == 0) {
      // Child: default signal handling, then the command with this rank's variables.
      signal(SIGINT, SIG_DFL);
      signal(SIGTERM, SIG_DFL);
      signal(SIGHUP, SIG_DFL);
      const int rank = o.node_rank * o.nproc_per_node + local;
      setenv("RANK", std::to_string(rank).c_str(), 1);
      setenv("LOCAL_RANK", std::to_string(local).c_str(), 1);
      setenv("WORLD_SIZE", std::to_string(world).c_str(), 1);
      setenv("LOCAL_WORLD_SIZE", std::to_string(o.nproc_per_node).c_str(), 1);
      setenv("MASTER_ADDR", o.master_addr.c_str(), 1);
      setenv("MASTER_PORT", std::to_string(o.master_port).c_str(), 1);
      std::vector<char*> args;
      for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      ::execvp(args[0], args.data());
      std::fprintf(stderr, "moeforge launch: cannot run %s: %s\n", argv[0].c_str(), std::strerror(errno));
      std::_Exit(127);
    }
    pids[local] = pid;
  }

  int result = 0, running = o.nproc_per_node;
  bool stopping = false;
  auto stop_others = [&](int sig) {
    for (pid_t p : pids)
      if (p > 0) ::kill(p, sig);
  };
  std::chrono::steady_clock::time_point kill_at{};
  while (running > 0) {
    if (g_signal && !stopping) {
      std::fprintf(stderr, "moeforge launch: got signal %d, passing it to the %d processes\n", static_cast<int>(g_signal),
                   running);
      stop_others(g_signal);
      result = 128 + g_signal;
      stopping = true;
      kill_at = std::chrono::steady_clock::now() + o.grace;
    }
    int status = 0;
    const pid_t done = ::waitpid(-1, &status, WNOHANG);
    if (done > 0) {
      for (int local = 0; local < o.nproc_per_node; ++local) {
        if (pids[local] != done) continue;
        pids[local] = -1;
        --running;
        const int code = exit_code(status);
        if (code != 0 && !stopping) {
          const int rank = o.node_rank * o.nproc_per_node + local;
          std::fprintf(stderr, "moeforge launch: rank %d (local rank %d, pid %d) %s; stopping the other %d\n", rank, local,
                       static_cast<int>(done), describe(status).c_str(), running);
          result = code;
          stopping = true;
          stop_others(SIGTERM);
          kill_at = std::chrono::steady_clock::now() + o.grace;
        }
      }
      continue;
    }
    if (stopping && std::chrono::steady_clock::now() >= kill_at) {
      stop_others(SIGKILL);
      kill_at = std::chrono::steady_clock::now() + std::chrono::hours(1);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  sigaction(SIGINT, &old_int, nullptr);
  sigaction(SIGTERM, &old_term, nullptr);
  sigaction(SIGHUP, &old_hup, nullptr);
  return result;
}

}  // namespace moeforge::parallel
