#include "cli/args.h"

#include "core/error.h"

namespace moeforge::cli {

Args::Args(const std::vector<std::string>& argv, const std::set<std::string>& valued,
           const std::set<std::string>& switches) {
  for (size_t i = 0; i < argv.size(); ++i) {
    const std::string& a = argv[i];
    if (a.rfind("--", 0) != 0 || a == "--") {
      positionals_.push_back(a);
      continue;
    }
    std::string flag = a, value;
    bool inline_value = false;
    if (auto eq = a.find('='); eq != std::string::npos) {
      flag = a.substr(0, eq);
      value = a.substr(eq + 1);
      inline_value = true;
    }
    if (valued.count(flag)) {
      if (!inline_value) {
        MF_CHECK(i + 1 < argv.size(), "option ", flag, " needs a value");
        value = argv[++i];
      }
      values_[flag] = value;
    } else if (switches.count(flag)) {
      MF_CHECK(!inline_value, "option ", flag, " takes no value");
      switches_.insert(flag);
    } else {
      MF_THROW("unknown option ", flag);
    }
  }
}

std::optional<std::string> Args::get(const std::string& flag) const {
  auto it = values_.find(flag);
  if (it == values_.end()) return std::nullopt;
  return it->second;
}

std::string Args::require(const std::string& flag) const {
  auto v = get(flag);
  MF_CHECK(v.has_value(), "missing required option ", flag);
  return *v;
}

int64_t Args::get_int(const std::string& flag, int64_t def) const {
  const auto v = get(flag);
  if (!v) return def;
  try {
    size_t used = 0;
    const long long x = std::stoll(*v, &used);
    if (used == v->size()) return x;
  } catch (const std::exception&) {
  }
  MF_THROW(flag, " needs an integer, got '", *v, "'");
}

}  // namespace moeforge::cli
