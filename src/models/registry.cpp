#include "models/registry.h"

#include <functional>
#include <map>

#include "core/error.h"
#include "models/decoder/decoder.h"

namespace moeforge::models {

namespace {
using Builder = std::function<std::unique_ptr<CausalLM>(const hf::ModelConfig&, const Parallel&)>;

// The families built on models::Decoder differ only in their config (hf/family_configs.cpp) and in
// where their checkpoints keep the experts.
Builder decoder_family(ExpertNaming naming = {}) {
  return [naming](const hf::ModelConfig& cfg, const Parallel& par) { return make_decoder(cfg, par, naming); };
}

const std::map<std::string, Builder>& builders() {
  static const std::map<std::string, Builder> m = {
      {"qwen3_moe", decoder_family()},
      {"qwen2_moe", decoder_family()},
      {"olmoe", decoder_family()},
      {"mixtral", decoder_family({"block_sparse_moe", "w1.weight", "w3.weight", "w2.weight"})},
      {"llama", decoder_family()},
      {"mistral", decoder_family()},
      {"qwen2", decoder_family()},
      {"qwen3", decoder_family()},
      {"gpt_oss", decoder_family()},
      {"deepseek_v3", decoder_family()},
      {"nemotron_h", decoder_family()},  // its hybrid blocks: ModelConfig::blocks
  };
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
