// Training checkpoints: output_dir/checkpoint-<step>/ is a standard Hugging Face model folder (the
// source's names, layout and dtypes) plus training_state/ with what an exact resume needs: the
// fp32 parameters (internal names) and AdamW moments in part files, and trainer_state.json (step,
// data cursor, seed, recipe hash, and which experts each part holds). A run whose ranks split the
// experts writes one part per rank of its first expert-parallel group (each its experts' slices,
// part 0 the dense parameters too), so no rank ever holds the whole state; one process writes one
// part. Loading takes, for each parameter, the rows of the experts this model holds from whichever
// parts have them: a checkpoint resumes on any world size and ep_size. The folder is built under a
// temporary name, fsynced and renamed once complete.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "models/lora.h"
#include "models/causal_lm.h"
#include "train/optimizer.h"

namespace moeforge::train {

struct TrainerState {
  int64_t step = 0;     // optimizer steps done
  int64_t cursor = 0;   // rows of the data stream consumed
  uint64_t seed = 0;
  int64_t total_steps = 0;
  std::string recipe_hash;
};

// `par` (several ranks): every rank calls it with its own shard of the model and optimizer.
void save_checkpoint(const std::string& dir, const models::CausalLM& model, const std::string& source_dir,
                     const AdamW& opt, const TrainerState& st, uint64_t max_shard_bytes,
                     const models::Parallel* par = nullptr, const models::LoraState* lora = nullptr);

// Restores parameters and optimizer state into an already built model/optimizer (whole, or this
// rank's shard of the experts). Reads format 2 (parts) and format 1 (params.safetensors +
// optimizer.safetensors, the whole model).
TrainerState load_checkpoint(const std::string& dir, models::CausalLM& model, AdamW& opt);

// Checkpoint folders in output_dir, oldest first (complete ones only: temporary folders are skipped).
std::vector<std::string> list_checkpoints(const std::string& output_dir);
// Removes an old checkpoint (renamed aside first: a kill midway leaves no half-deleted checkpoint-N).
void prune_checkpoint(const std::string& dir);
// After a kill: puts back a folder a save had moved aside when its replacement never got the name,
// then removes the temporary, old and pruned folders left behind.
void remove_partial_checkpoints(const std::string& output_dir);

}  // namespace moeforge::train
