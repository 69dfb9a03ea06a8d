// moeforge merge: fold a PEFT LoRA adapter into its base model and write a standard Hugging Face
// folder (the base's tensor names, layout and dtypes; merged weights = base + scale * B @ A).
#include <cstdio>

#include "cli/args.h"
#include "cli/commands.h"
#include "core/error.h"
#include "hf/safetensors.h"
#include "models/lora.h"
#include "models/pretrained.h"

namespace moeforge::cli {

int cmd_merge(const std::vector<std::string>& argv) {
  Args args(argv, {"--model", "--adapter", "--out", "--max-shard-size"}, {"--overwrite", "--help"});
  if (args.has("--help")) {
    std::puts("usage: moeforge merge --model BASE_DIR --adapter ADAPTER_DIR --out OUT_DIR [--max-shard-size 5GB]\n"
              "                      [--overwrite]\n"
              "  folds a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors, as moeforge train\n"
              "  or PEFT writes it) into the base model: W + (lora_alpha / r) * B @ A per adapted projection,\n"
              "  saved as a standard Hugging Face folder in the base's names and dtypes (written to a\n"
              "  temporary folder, then renamed)");
    return 0;
  }
  MF_CHECK(args.positionals().empty(), "merge: unexpected argument '", args.positionals().front(), "'");
  const std::string base = args.require("--model"), adapter = args.require("--adapter"), out = args.require("--out");
  models::SaveOptions opts;
  opts.overwrite = args.has("--overwrite");
  if (auto s = args.get("--max-shard-size")) opts.max_shard_bytes = hf::parse_size(*s);
  auto loaded = models::from_pretrained(base);
  const models::LoraState lora = models::apply_adapter_folder(*loaded.model, adapter);
  models::merge_lora(*loaded.model, lora);
  models::save_pretrained(*loaded.model, loaded.source_dir, out, opts);
  std::printf("wrote %s: %zu projections merged (rank %lld, scale %g)\n", out.c_str(), lora.modules.size(),
              static_cast<long long>(lora.options.rank), static_cast<double>(lora.options.scale()));
  return 0;
}

}  // namespace moeforge::cli
