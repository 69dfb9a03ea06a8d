// moeforge command line: one subcommand per job (cli/commands.cpp lists them). Exit status: 0 on
// success (and after --help), 1 for an error in the work (one line naming the file and field), 2
// for a usage error (an unknown command or option, a bad option value).
#include <cstdio>
#include <cstring>
#include <exception>
#include <new>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "core/error.h"

namespace {

std::string usage() {
  std::string s = "usage: moeforge <command> [options]   (moeforge help <command>, or <command> --help, for its options)\n\ncommands:\n";
  for (const auto& c : moeforge::cli::commands()) {
    s += std::string("  ") + c.name + " " + c.usage + "\n";
    s += std::string("      ") + c.summary + "\n";
  }
  s += "\n  help [COMMAND]    this list, or a command's options\n  --version         version, git commit, CUDA/cuDNN/NCCL compiled in\n";
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty()) {
    std::fputs(usage().c_str(), stderr);
    return 2;
  }
  std::string cmd = args[0];
  std::vector<std::string> rest(args.begin() + 1, args.end());
  if (cmd == "--help" || cmd == "-h" || (cmd == "help" && rest.empty())) {
    std::fputs(usage().c_str(), stdout);
    return 0;
  }
  if (cmd == "--version" || cmd == "version") {
    std::fputs(moeforge::cli::version_text().c_str(), stdout);
    return 0;
  }
  if (cmd == "help") {  // moeforge help COMMAND = moeforge COMMAND --help
    cmd = rest[0];
    rest = {"--help"};
  }
  try {
    if (const auto run = moeforge::cli::find_command(cmd)) return run(rest);
    std::fprintf(stderr, "moeforge: unknown command '%s' (moeforge --help lists them)\n", cmd.c_str());
    return 2;
  } catch (const moeforge::Error& e) {
    std::fprintf(stderr, "moeforge %s: error: %s\n", cmd.c_str(), e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    // A library's "std::bad_alloc" says nothing to a user: name what ran out.
    std::fprintf(stderr, "moeforge %s: error: out of host memory (an input asked for more than this machine has; "
                 "check the sizes in the config, recipe or dataset)\n", cmd.c_str());
    return 1;
  } catch (const std::exception& e) {
    // Not one of moeforge's own errors: a bug or an unchecked input, reported as such.
    std::fprintf(stderr, "moeforge %s: error: internal error (%s); please report it with the command that caused it\n",
                 cmd.c_str(), e.what());
    return 1;
  }
}
