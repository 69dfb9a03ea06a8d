// moeforge inspect on a PEFT LoRA adapter folder: what it adapts (its config and tensors, the routed
// experts per expert or as PEFT's fused target_parameters tensors), and, given its base model,
// whether the base takes it (every tensor a module of the base, with its shape).
#include <cstdio>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>

#include "cli/commands.h"
#include "core/error.h"
#include "hf/config.h"
#include "hf/fs_util.h"
#include "hf/safetensors.h"
#include "models/lora.h"
#include "models/registry.h"

namespace moeforge::cli {

namespace fs = std::filesystem;

int inspect_adapter(const std::string& dir, const std::string& base_flag, bool json) {
  const models::LoraOptions o = models::read_adapter_config(dir);  // one error naming the file and field
  const std::string weights = (fs::path(dir) / "adapter_model.safetensors").string();
  MF_CHECK(fs::exists(weights), dir, ": no adapter_model.safetensors");
  const auto file = hf::SafetensorsFile::open(weights);
  int64_t params = 0, per_expert = 0, fused = 0;
  std::set<std::string> modules;
  const std::regex expert_key(R"(\.experts\.\d+\.)");
  for (const auto& e : file.entries()) {
    params += shape_numel(e.shape);
    const size_t cut = e.name.rfind(".lora_");
    modules.insert(e.name.substr(0, cut == std::string::npos ? e.name.size() : cut));
    per_expert += std::regex_search(e.name, expert_key);
    fused += e.name.find(".experts.base_layer.") != std::string::npos || e.name.find(".experts.lora_") != std::string::npos;
  }
  const nlohmann::ordered_json raw = hf::read_json_file((fs::path(dir) / "adapter_config.json").string());
  const std::string named_base = raw.value("base_model_name_or_path", std::string());
  // The base to check against: --base, else the folder the adapter names when it exists here.
  const std::string base = !base_flag.empty() ? base_flag : (fs::exists(fs::path(named_base) / "config.json") ? named_base : "");

  nlohmann::ordered_json j;
  j["path"] = dir;
  j["peft_type"] = "LORA";
  j["r"] = o.rank;
  j["lora_alpha"] = o.alpha;
  j["scaling"] = o.scale();
  j["use_rslora"] = o.rslora;
  j["lora_dropout"] = o.dropout;
  j["target_modules"] = o.targets;
  j["target_parameters"] = o.target_parameters;
  j["base_model_name_or_path"] = named_base;
  j["tensors"] = file.entries().size();
  j["modules"] = modules.size();
  j["parameters"] = params;
  j["routed_experts"] = fused ? "fused (PEFT target_parameters: one tensor per weight for all experts)"
                        : per_expert ? "per expert (experts.<e>.<projection>)"
                                     : "not adapted";
  if (!base.empty()) {
    MF_CHECK(fs::exists(base), "inspect --base: ", base, ": no such folder");
    auto model = models::build_model(hf::load_config(base));  // shapes only: no base weights are read
    const models::LoraState st = models::apply_adapter_folder(*model, dir);
    j["base"] = {{"path", base}, {"model_type", model->config().model_type}, {"takes_it", true},
                 {"adapted_modules", st.modules.size()}};
  }
  if (json) {
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }
  std::printf("LoRA adapter %s\n", dir.c_str());
  std::printf("  rank %lld, alpha %g (scaling %g%s), dropout %g\n", static_cast<long long>(o.rank), o.alpha, o.scale(),
              o.rslora ? ", rsLoRA" : "", o.dropout);
  std::printf("  target_modules %s\n", j["target_modules"].dump().c_str());
  if (!o.target_parameters.empty()) std::printf("  target_parameters %s\n", j["target_parameters"].dump().c_str());
  std::printf("  %zu tensors on %zu modules, %lld parameters (%.1f MiB in F32)\n", file.entries().size(),
              modules.size(), static_cast<long long>(params), params * 4.0 / (1 << 20));
  std::printf("  routed experts: %s\n", j["routed_experts"].get<std::string>().c_str());
  std::printf("  base_model_name_or_path: %s\n", named_base.empty() ? "(none)" : named_base.c_str());
  if (j.contains("base"))
    std::printf("  %s (%s) takes it: %zu adapted modules, every tensor a module of the base with its shape\n",
                base.c_str(), j["base"]["model_type"].get<std::string>().c_str(),
                j["base"]["adapted_modules"].get<size_t>());
  else
    std::printf("  (give --base MODEL_DIR to check it against its base model)\n");
  return 0;
}

}  // namespace moeforge::cli
