// A training recipe: YAML (nested maps are flattened to dotted keys) plus key=value overrides from
// the command line. Every key is declared with its type; an unknown key is an error with a
// did-you-mean, a wrong type names the key and the value.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "models/lora.h"
#include "train/optimizer.h"

namespace moeforge::train {

struct Recipe {
  std::string source;  // file the recipe came from, for messages

  std::string model;       // Hugging Face model folder
  std::string data;        // jsonl file, folder or glob (data/dataset.h lists the row forms)
  std::string tokenizer;   // folder with tokenizer.json for text rows; "" = the model folder
  std::string chat_template;  // a .jinja file for messages rows; "" = the tokenizer folder's template
  bool packing = false;    // pack documents into rows of seq_len (boundaries kept)
  bool skip_bad_lines = false;  // malformed data lines: skip and count instead of failing
  bool add_eos = true;     // append the tokenizer's EOS to text and completion rows
  // Where tokenized data is cached between runs (data/token_cache.h): "" = the default folder
  // (data::default_token_cache_dir), "none" = no cache.
  std::string data_cache;
  std::string output_dir;  // checkpoints, metrics.jsonl and the final model (output_dir/final)
  // Rows longer than this are truncated; 0 = 2048 or the model's max_position_embeddings when
  // smaller (resolved by the trainer).
  int64_t seq_len = 0;
  int64_t micro_batch = 1;
  int64_t global_batch = 1;  // rows per optimizer step; a multiple of micro_batch
  int64_t steps = 0;         // optimizer steps; 0 = derive from epochs
  double epochs = 0;
  AdamWOptions optimizer;
  ScheduleOptions schedule;
  double max_grad_norm = 1.0;  // 0 = no clipping
  Device::Kind device = Device::Kind::CPU;  // cpu | cuda (one GPU per rank)
  std::string precision;        // fp32 | bf16-mixed | bf16; "" = the device's default (cpu fp32, cuda bf16-mixed)
  bool activation_checkpointing = false;
  // AdamW applied layer by layer during backward, each layer's gradients freed once applied (on a
  // GPU), so all the gradients never exist at once: the same update as a step after backward,
  // which it needs to be (no clipping, max_grad_norm 0; no accumulation, global_batch = micro_batch).
  bool optimizer_in_backward = false;
  int64_t log_every = 1;
  int64_t save_every = 0;       // 0 = only at the end
  int64_t save_total_limit = 2;  // training checkpoints kept (oldest removed first)
  std::string max_shard_size = "5GB";
  uint64_t seed = 42;
  bool overwrite = false;  // replace an existing output_dir
  std::string resume;      // "" (no), "true" (latest checkpoint in output_dir) or a checkpoint path
  // A resumed run whose recipe differs from the one that wrote the checkpoint in what changes the
  // training (data, model, lr, schedule, seq_len, batch sizes, seed, ...) is an error unless this is set.
  bool resume_allow_changes = false;
  // Validation: eval_data (the same row forms as data) evaluated every eval_every steps (0: only
  // at the end) over at most eval_max_batches micro-batches (0: all of it); the loss goes to the
  // progress line and metrics.jsonl. save_best writes output_dir/best (as final/) whenever the
  // validation loss is the lowest so far.
  std::string eval_data;
  // Or this fraction of data's rows held out for validation instead (data::hold_out; 0: none).
  double eval_split = 0;
  int64_t eval_every = 0;
  int64_t eval_max_batches = 0;
  bool save_best = false;
  // Where logged metrics go besides metrics.jsonl: "none" or "tensorboard" (event files in
  // output_dir/tensorboard, for `tensorboard --logdir`).
  std::string report_to = "none";
  int64_t threads = 0;     // 0 = OpenMP's default
  // Expert parallelism in a multi-rank run: each group of ep_size ranks shares out the experts
  // (E / ep_size each); world / ep_size such groups hold copies. Must divide the world and E.
  int64_t ep_size = 1;
  // DeepSeek-V3's multi-token prediction layers (when the model folder holds them): > 0 trains
  // them, adding mtp_loss_scale / depths * each depth's mean cross-entropy to the loss (DeepSeek
  // used 0.3, then 0.1); 0 keeps them frozen and saves them back unchanged.
  double mtp_loss_scale = 0;
  // Multi-GPU runs: 1 splits the dense parameters' AdamW moments over the ranks (ZeRO-1); 3 also
  // their values and gradients (ZeRO-3: each layer's are gathered before it runs and its gradients
  // reduce-scattered after its backward). One process, or the CPU: nothing to split.
  int64_t zero_stage = 1;
  // Parameter-efficient fine-tuning: "" (full fine-tuning) or "lora" (peft.method), with LoRA's
  // options (peft.rank, peft.alpha, peft.dropout, peft.use_rslora, peft.target_modules, peft.adapter).
  std::string peft_method;
  models::LoraOptions lora;

  // The resolved recipe as YAML (every key, defaults included), for the output folder.
  std::string to_yaml() const;
};

// Reads `path` and applies `overrides` ("key=value", value parsed as YAML). Throws naming the file
// (or "command line") and the key.
Recipe load_recipe(const std::string& path, const std::vector<std::string>& overrides);
// The same from YAML text (a dict from Python, as JSON); `origin` names it in errors, relative paths
// resolve from `base_dir`.
Recipe load_recipe_text(const std::string& yaml, const std::string& origin, const std::string& base_dir,
                        const std::vector<std::string>& overrides);
// All keys a recipe accepts, dotted.
std::vector<std::string> recipe_keys();
// The keys that change what a run computes (data, model, optimizer, schedule, batch shapes, seed,
// LoRA, ...) whose values differ between two resolved recipes (Recipe::to_yaml texts), as
// "key: old -> new"; what only changes where or how it runs (threads, logging, saving, device,
// ep_size) is not compared, nor steps and epochs (extending a run is what resume is for).
std::vector<std::string> changed_training_keys(const std::string& old_yaml, const std::string& new_yaml);

}  // namespace moeforge::train
