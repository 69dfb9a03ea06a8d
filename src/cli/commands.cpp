#include "cli/commands.h"

#include <map>

namespace moeforge::cli {

CommandFn find_command(const std::string& name) {
  static const std::map<std::string, CommandFn> table = {
      {"inspect", cmd_inspect}, {"eval", cmd_eval}, {"generate", cmd_generate},   {"convert", cmd_convert}, {"merge", cmd_merge}, {"train", cmd_train},
      {"tokenize", cmd_tokenize}, {"bench", cmd_bench}, {"launch", cmd_launch}, {"dist-check", cmd_dist_check}};
  const auto it = table.find(name);
  return it == table.end() ? nullptr : it->second;
}

}  // namespace moeforge::cli
