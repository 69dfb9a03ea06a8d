// A small argument parser for the subcommands: --flag value, --flag=value, boolean switches and
// positionals, with errors that name the flag.
#pragma once
#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace moeforge::cli {

class Args {
 public:
  // `valued` flags take a value, `switches` do not; anything else starting with -- is an error.
  Args(const std::vector<std::string>& argv, const std::set<std::string>& valued, const std::set<std::string>& switches);
  std::optional<std::string> get(const std::string& flag) const;
  std::string require(const std::string& flag) const;
  // The flag's integer value, `def` when absent; an error naming the flag when it is not an integer.
  int64_t get_int(const std::string& flag, int64_t def) const;
  bool has(const std::string& flag) const { return switches_.count(flag) != 0; }
  const std::vector<std::string>& positionals() const { return positionals_; }

 private:
  std::map<std::string, std::string> values_;
  std::set<std::string> switches_;
  std::vector<std::string> positionals_;
};

}  // namespace moeforge::cli
