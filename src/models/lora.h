// LoRA fine-tuning of a loaded model (the adapters themselves: nn/lora.h): which projections get
// adapters (PEFT's target_modules), their initialisation, freezing the base, and the adapter
// folder in PEFT's own format (adapter_model.safetensors + adapter_config.json, keys
// `base_model.model.<module>.lora_A.weight`), which PeftModel.from_pretrained loads.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "models/causal_lm.h"

namespace moeforge::models {

struct LoraOptions {
  int64_t rank = 16;
  double alpha = 32;
  double dropout = 0;  // only 0 is built
  bool rslora = false;  // scale alpha / sqrt(rank) instead of alpha / rank
  // PEFT's target_modules: module names matched as PEFT does (the whole name, or its last dotted
  // components), "all-linear" for every projection, or a container module ("shared_expert",
  // "shared_experts") for the projections inside it.
  std::vector<std::string> targets = {"q_proj", "k_proj", "v_proj", "o_proj"};
  // PEFT's target_parameters: the routed experts' fused 3-D weights by name ("mlp.experts.gate_up_proj",
  // "mlp.experts.down_proj"; both), on the families whose experts take fused adapters
  // (expert_adapter_layout); "experts" in `targets` means the same there.
  std::vector<std::string> target_parameters;
  std::string init_adapter;  // a PEFT adapter folder to start from ("": A random, B zero, as PEFT)

  float scale() const;
};

// What apply_lora did: the adapted modules and the target_modules list to write (every entry a
// PEFT suffix match, so PEFT adapts exactly these modules).
struct LoraState {
  LoraOptions options;
  std::vector<std::string> modules;
  std::vector<std::string> written_targets;
  std::vector<std::string> written_parameters;  // target_parameters to write (fused expert adapters)
};

// How a family's routed experts take LoRA so that PEFT loads it into Transformers 5 (and vLLM
// serves it): PerExpert where PEFT maps per-expert module names (experts.{e}.gate_proj, ...) onto
// the fused experts (qwen3_moe, deepseek_v3, olmoe, mixtral); Fused, one adapter per fused 3-D
// weight as PEFT's target_parameters puts it (keys `<experts>.base_layer.lora_A.weight` for
// gate_up, `<experts>.lora_A.weight` for down; A [E*r, in] expert-major, B [out, r*E] with column
// j*E + e), where it has no per-expert mapping (gpt_oss, qwen2_moe, nemotron_h); None without experts.
nn::ExpertAdapters expert_adapter_layout(const std::string& model_type);

// Adds the adapters to `model` (after its weights are loaded), initialises them (A uniform in
// +-1/sqrt(in) as PEFT's Kaiming init, B zero; or from options.init_adapter) and freezes every
// other parameter: no gradient, no optimizer state. Throws naming `source` on a target that
// matches nothing, or one LoRA cannot take (the routed experts are not adapted yet).
LoraState apply_lora(CausalLM& model, const LoraOptions& options, uint64_t seed, const std::string& source);

// Writes `dir` (a temporary folder renamed into place): adapter_model.safetensors (F32) and
// adapter_config.json naming `base_model` (the base model's folder).
void save_adapter(const CausalLM& model, const LoraState& lora, const std::string& base_model, const std::string& dir,
                  bool overwrite);
// The same files into an existing folder (a training checkpoint's).
void write_adapter_files(const CausalLM& model, const LoraState& lora, const std::string& base_model,
                         const std::string& dir);
// Under several ranks (every rank calls it): the experts' adapters gathered over the expert-parallel
// group, the files written by world rank 0 (into `dir`, which only rank 0 needs).
void write_adapter_files_across(const CausalLM& model, const LoraState& lora, const Parallel& par,
                                const std::string& base_model, const std::string& dir);
// save_adapter across ranks (always replacing `dir`); ends with a barrier.
void save_adapter_across(const CausalLM& model, const LoraState& lora, const Parallel& par,
                         const std::string& base_model, const std::string& dir);

// Reads a PEFT LoRA folder's adapter_config.json into options (rank, alpha, dropout, rslora,
// target_modules); throws naming the file and field on anything moeforge cannot apply.
LoraOptions read_adapter_config(const std::string& dir);
// Fills the model's adapters from a PEFT folder's adapter_model.safetensors; every adapter must be
// there with its shape, and every tensor there must belong to one.
void load_adapter_weights(CausalLM& model, const std::string& dir);

// Whether the model carries LoRA adapters.
bool has_lora(const CausalLM& model);

// The model with a PEFT adapter folder applied (its adapter_config.json and weights), base frozen.
LoraState apply_adapter_folder(CausalLM& model, const std::string& dir);

// Folds every adapter into its base weight, W += scale * B A (F32 on the host), and zeroes B: the
// model computes what it did, and exports (export_tensors skips adapters) merged weights under
// the checkpoint's names, in its dtypes.
void merge_lora(CausalLM& model, const LoraState& lora);

}  // namespace moeforge::models
