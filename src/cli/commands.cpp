#include "cli/commands.h"

#include "build_info.h"

namespace moeforge::cli {

const std::vector<Command>& commands() {
  static const std::vector<Command> table = {
      {"train", cmd_train, "RECIPE.yaml [key=value ...]", "full or LoRA fine-tuning from a recipe (docs/training.md)"},
      {"generate", cmd_generate, "--model DIR (--prompt TEXT | --messages FILE | --prompt-ids IDS) [...]",
       "generate text, streamed (KV cache; greedy or sampled; --adapter LORA_DIR)"},
      {"eval", cmd_eval, "--model DIR --data FILE.jsonl [--adapter DIR]",
       "loss and perplexity on a dataset in any training format"},
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
  std::string s = std::string("moeforge ") + MOEFORGE_VERSION + " (commit " + MOEFORGE_GIT_COMMIT + ")\n";
#ifdef MOEFORGE_CUDA_VERSION
  s += std::string("CUDA ") + MOEFORGE_CUDA_VERSION;
#ifdef MOEFORGE_CUDNN_VERSION
  s += std::string(", cuDNN ") + MOEFORGE_CUDNN_VERSION;
#else
  s += ", cuDNN: not compiled in (native attention kernels)";
#endif
#ifdef MOEFORGE_NCCL_VERSION
  s += std::string(", NCCL ") + MOEFORGE_NCCL_VERSION;
#else
  s += ", NCCL: not compiled in";
#endif
  s += "\n";
#else
  s += "CUDA: not compiled in (CPU backend only)\n";
#endif
  return s;
}

}  // namespace moeforge::cli
