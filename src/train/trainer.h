// The training loop: model and data from a recipe, micro-batches accumulated into global batches
// (loss = summed token cross-entropy / tokens in the global batch, as Transformers' Trainer with
// num_items_in_batch), clipping, AdamW, schedule, progress, checkpoints and exact resume.
#pragma once
#include <string>
#include <vector>

#include "train/recipe.h"

namespace moeforge::train {

struct TrainResult {
  int64_t steps_done = 0;
  std::vector<double> losses;  // per optimizer step run in this call
  std::string final_dir;
};

TrainResult run_training(const Recipe& recipe);

}  // namespace moeforge::train
