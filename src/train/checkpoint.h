// Training checkpoints: output_dir/checkpoint-<step>/ is a standard Hugging Face model folder (the
// source's names, layout and dtypes) plus training_state/ with what an exact resume needs: the
// fp32 parameters (internal names), the AdamW moments, and trainer_state.json (step, data cursor,
// seed, recipe hash). The folder is built under a temporary name, fsynced and renamed.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

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

void save_checkpoint(const std::string& dir, const models::CausalLM& model, const std::string& source_dir,
                     const AdamW& opt, const TrainerState& st, uint64_t max_shard_bytes);

// Restores parameters and optimizer state into an already built model/optimizer.
TrainerState load_checkpoint(const std::string& dir, models::CausalLM& model, AdamW& opt);

// Checkpoint folders in output_dir, oldest first (complete ones only: temporary folders are skipped).
std::vector<std::string> list_checkpoints(const std::string& output_dir);
// Removes temporary folders a killed save left behind.
void remove_partial_checkpoints(const std::string& output_dir);

}  // namespace moeforge::train
