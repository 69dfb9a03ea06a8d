#pragma once
#include <string>
#include <vector>

namespace moeforge::cli {

int cmd_inspect(const std::vector<std::string>& args);
int cmd_eval(const std::vector<std::string>& args);
int cmd_convert(const std::vector<std::string>& args);
int cmd_train(const std::vector<std::string>& args);
int cmd_tokenize(const std::vector<std::string>& args);
int cmd_bench(const std::vector<std::string>& args);
int cmd_launch(const std::vector<std::string>& args);
int cmd_dist_check(const std::vector<std::string>& args);

}  // namespace moeforge::cli
