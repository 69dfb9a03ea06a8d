// moeforge command line: one subcommand per job. Errors print one line and exit 1; usage errors exit 2.
#include <cstdio>
#include <cstring>
#include <new>
#include <exception>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "core/error.h"

namespace {

const char* kUsage =
    "usage: moeforge <command> [options]\n"
    "\n"
    "commands:\n"
    "  inspect MODEL_DIR|CONFIG.json [--json]\n"
    "      architecture, total and active parameters, tensors found vs expected, training memory\n"
    "  eval --model MODEL_DIR --tokens FILE.jsonl [--adapter LORA_DIR] [--logits-out FILE.safetensors] [--threads N]\n"
    "      per-line loss of {\"input_ids\": [...]} rows (optional \"labels\"), printed as one JSON object\n"
    "  train RECIPE.yaml [key=value ...]\n"
    "      full or LoRA fine-tuning (docs/training.md); resume=true continues from the latest checkpoint\n"
    "  tokenize --tokenizer DIR (--text TEXT | --file FILE | --decode ID,ID,...) [--no-special-tokens]\n"
    "      encode with a tokenizer.json as the tokenizers library does (ids and tokens as JSON)\n"
    "  tokenize --tokenizer DIR --messages FILE.json [--chat-template T.jinja] [--add-generation-prompt]\n"
    "      render a conversation with the chat template as apply_chat_template does; ids and the\n"
    "      assistant-token mask that training uses for the loss\n"
    "  convert --model MODEL_DIR --out OUT_DIR [--max-shard-size 5GB] [--overwrite]\n"
    "      load and save again: same tensor names, layout and dtypes; atomic\n"
    "  merge --model BASE_DIR --adapter ADAPTER_DIR --out OUT_DIR [--max-shard-size 5GB] [--overwrite]\n"
    "      fold a PEFT LoRA adapter into the base: a standard Hugging Face folder, the base's names and dtypes\n"
    "  bench CONFIG.json|MODEL_DIR [--layers N] [--seq 4096] [--batch 1] [--steps 10] [--warmup 3]\n"
    "        [--routing native|balanced] [--precision bf16-mixed|bf16|fp32] [--activation-checkpointing]\n"
    "        [--optimizer-in-backward] [--ep-size E] [--zero-stage 1|3]\n"
    "      training-step benchmark on the GPU (random weights and tokens): tokens/s, TFLOP/s, peak\n"
    "      memory, forward/backward/optimizer times, as a table and one JSON line (docs/benchmarks.md)\n"
    "  launch --nproc-per-node N [--nnodes M --node-rank R --master-addr A --master-port P] -- COMMAND...\n"
    "      one process per GPU with the torchrun variables set; stops them all when one fails\n"
    "  dist-check [--timeout 60] [--fingerprint S]\n"
    "      join the rendezvous from the torchrun/Slurm environment and report (checks a job's setup)\n";

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h")) {
    std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  const std::string cmd = argv[1];
  const std::vector<std::string> rest(argv + 2, argv + argc);
  try {
    if (const auto run = moeforge::cli::find_command(cmd)) return run(rest);
    std::fprintf(stderr, "moeforge: unknown command '%s'\n%s", cmd.c_str(), kUsage);
    return 2;
  } catch (const moeforge::Error& e) {
    std::fprintf(stderr, "moeforge %s: error: %s\n", cmd.c_str(), e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    // A library's "std::bad_alloc" says nothing to a user: name what ran out.
    std::fprintf(stderr, "moeforge %s: error: out of host memory (an input asked for more than this machine has; "
                 "check the sizes in the config, recipe or dataset)\n", cmd.c_str());
    return 1;
  } catch (const std::exception& e) {
    // Not one of moeforge's own errors: a bug or an unchecked input, reported as such.
    std::fprintf(stderr, "moeforge %s: error: internal error (%s); please report it with the command that caused it\n",
                 cmd.c_str(), e.what());
    return 1;
  }
}
