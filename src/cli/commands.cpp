#include "cli/commands.h"

#include <algorithm>

#include "build_info.h"

namespace moeforge::cli {

const std::vector<Command>& commands() {
  static const std::vector<Command> table = {
      {"train", cmd_train, "RECIPE.yaml [key=value ...]", "full or LoRA fine-tuning from a recipe (docs/training.md)"},
      {"generate", cmd_generate, "--model DIR (--prompt TEXT | --messages FILE | --prompt-ids IDS) [...]",
       "generate text, streamed (KV cache; greedy or sampled; --adapter LORA_DIR)"},
      {"eval", cmd_eval, "--model DIR --data FILE.jsonl|.parquet|.arrow [--adapter DIR]",
       "loss and perplexity on a dataset in any training format"},
      {"dataset", cmd_dataset, "--model DIR --data FILE.jsonl|.parquet|.arrow [--seq-len N] [--show K]",
       "a dataset as training sees it: rows, tokens, trained share, rows rendered with the loss marked"},
      {"cache", cmd_cache, "[--dir DIR] [--clear [--older-than DAYS]] [--json]",
       "the tokenized-data cache: what it holds, and removing it"},
      {"plot", cmd_plot, "OUTPUT_DIR [-o loss.png]", "loss, eval loss, lr and grad norm against step, as a PNG"},
      {"inspect", cmd_inspect, "MODEL_DIR|CONFIG.json [--gpus N] [--json]",
       "parameters (total, active), tensors found vs expected, training memory"},
      {"tokenize", cmd_tokenize, "--tokenizer DIR (--text T | --file F | --decode IDS | --messages FILE)",
       "encode, decode, or render a conversation with the chat template"},
      {"convert", cmd_convert, "--model DIR --out DIR [--max-shard-size 5GB] [--overwrite]",
       "load and save again (same names, layout, dtypes), re-sharded"},
      {"merge", cmd_merge, "--model BASE --adapter LORA_DIR --out DIR",
       "fold a PEFT LoRA adapter into its base model"},
      {"bench", cmd_bench, "CONFIG.json|MODEL_DIR [--layers N] [--seq 4096] [...]",
       "training-step benchmark on the GPU (docs/benchmarks.md)"},
      {"launch", cmd_launch, "--nproc-per-node N [--nnodes M ...] -- COMMAND ...",
       "one process per GPU with the torchrun variables set"},
      {"dist-check", cmd_dist_check, "[--timeout 60]", "join the rendezvous and report (checks a job's setup)"},
  };
  return table;
}

CommandFn find_command(const std::string& name) {
  for (const auto& c : commands())
    if (name == c.name) return c.run;
  return nullptr;
}

std::string version_text() {
  // The build's accelerated paths, each on or off with the reason (CMakeLists.txt's summary).
  std::string s = std::string("moeforge ") + MOEFORGE_VERSION + " (commit " + MOEFORGE_GIT_COMMIT + ")\n";
  const std::string features = MOEFORGE_BUILD_FEATURES;
  size_t at = 0;
  while (at <= features.size()) {
    const size_t nl = std::min(features.find('\n', at), features.size());
    if (nl > at) s += "  " + features.substr(at, nl - at) + "\n";
    at = nl + 1;
  }
  return s;
}

}  // namespace moeforge::cli
