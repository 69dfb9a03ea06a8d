#pragma once
#include <string>
#include <vector>

namespace moeforge::cli {

int cmd_inspect(const std::vector<std::string>& args);
// inspect on a PEFT adapter folder (cli/inspect_adapter.cpp); `base`: a model folder to check it against.
int inspect_adapter(const std::string& dir, const std::string& base, bool json);
int cmd_eval(const std::vector<std::string>& args);
int cmd_dataset(const std::vector<std::string>& args);
int cmd_cache(const std::vector<std::string>& args);
int cmd_generate(const std::vector<std::string>& args);
int cmd_convert(const std::vector<std::string>& args);
int cmd_merge(const std::vector<std::string>& args);
int cmd_train(const std::vector<std::string>& args);
int cmd_tokenize(const std::vector<std::string>& args);
int cmd_bench(const std::vector<std::string>& args);
int cmd_launch(const std::vector<std::string>& args);
int cmd_dist_check(const std::vector<std::string>& args);
int cmd_plot(const std::vector<std::string>& args);

// Every subcommand by name: main() dispatches through it, and `launch` uses it to know that a
// command after -- is one of ours (run with this binary).
using CommandFn = int (*)(const std::vector<std::string>&);
struct Command {
  const char* name;
  CommandFn run;
  const char* usage;    // the arguments, for the top-level usage
  const char* summary;  // one line
};
const std::vector<Command>& commands();
CommandFn find_command(const std::string& name);  // nullptr when unknown

// `moeforge --version`: the version, git commit and the CUDA / cuDNN / NCCL versions compiled in.
std::string version_text();

}  // namespace moeforge::cli
