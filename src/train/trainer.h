// The training loop: model and data from a recipe, micro-batches accumulated into global batches
// (loss = summed token cross-entropy / tokens in the global batch, as Transformers' Trainer with
// num_items_in_batch), clipping, AdamW, schedule, progress, checkpoints and exact resume.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "train/progress.h"
#include "train/recipe.h"

namespace moeforge::train {

struct TrainResult {
  int64_t steps_done = 0;
  std::vector<double> losses;  // per optimizer step run in this call
  std::string final_dir;
};

// Called on the main rank after every optimizer step and every validation (the Python Trainer's
// callbacks); an exception thrown from one stops the run.
struct TrainCallbacks {
  std::function<void(const StepMetrics&)> on_step;
  std::function<void(int64_t step, double eval_loss)> on_eval;
};

TrainResult run_training(const Recipe& recipe, const TrainCallbacks& callbacks = {});

}  // namespace moeforge::train
