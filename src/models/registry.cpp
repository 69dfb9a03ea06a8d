#include "models/registry.h"

#include <functional>
#include <map>

#include "core/error.h"
#include "models/qwen3_moe/qwen3_moe.h"

namespace moeforge::models {

namespace {
using Builder = std::function<std::unique_ptr<CausalLM>(const hf::ModelConfig&, const Parallel&)>;
const std::map<std::string, Builder>& builders() {
  static const std::map<std::string, Builder> m = {{"qwen3_moe", make_qwen3_moe}};
  return m;
}
}  // namespace

std::unique_ptr<CausalLM> build_model(const hf::ModelConfig& cfg, const Parallel& par) {
  auto it = builders().find(cfg.model_type);
  MF_CHECK(it != builders().end(), cfg.source, ": field 'model_type' value '", cfg.model_type, "' is not supported");
  return it->second(cfg, par);
}

std::vector<std::string> supported_model_types() {
  std::vector<std::string> v;
  for (const auto& [k, _] : builders()) v.push_back(k);
  return v;
}

}  // namespace moeforge::models
