// moeforge merge: fold a PEFT LoRA adapter into its base model and write a standard Hugging Face
// folder (the base's tensor names, layout and dtypes; merged weights = base + scale * B @ A).
#include <cstdio>

#include "cli/app.h"
#include "cli/commands.h"
#include "core/error.h"
#include "hf/safetensors.h"
#include "models/lora.h"
#include "models/pretrained.h"

namespace moeforge::cli {

int cmd_merge(const std::vector<std::string>& argv) {
  auto app = make_app("merge", "Fold a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors, as moeforge "
                      "train or PEFT\nwrites it) into its base model: W + (lora_alpha / r) * B @ A per adapted "
                      "projection, saved as a\nstandard Hugging Face folder in the base's names and dtypes (written "
                      "to a temporary folder, then renamed).",
                      "\nExample: moeforge merge --model BASE --adapter out/final --out merged");
  std::string base, adapter, out, shard = "5GB";
  bool overwrite = false;
  app->add_option("--model", base, "the base model folder")->required();
  app->add_option("--adapter", adapter, "the PEFT adapter folder")->required();
  app->add_option("--out", out, "output folder")->required();
  app->add_option("--max-shard-size", shard, "largest safetensors file");
  app->add_flag("--overwrite", overwrite, "replace an existing output folder");
  if (auto code = parse(*app, argv)) return *code;
  models::SaveOptions opts;
  opts.overwrite = overwrite;
  opts.max_shard_bytes = hf::parse_size(shard);
  auto loaded = models::from_pretrained(base);
  const models::LoraState lora = models::apply_adapter_folder(*loaded.model, adapter);
  models::merge_lora(*loaded.model, lora);
  models::save_pretrained(*loaded.model, loaded.source_dir, out, opts);
  std::printf("wrote %s: %zu projections merged (rank %lld, scale %g)\n", out.c_str(), lora.modules.size(),
              static_cast<long long>(lora.options.rank), static_cast<double>(lora.options.scale()));
  return 0;
}

}  // namespace moeforge::cli
