// Progress while training: one line updated in place on a terminal (step/total, loss, lr, grad norm,
// tokens/s, ETA), plain lines otherwise; and metrics.jsonl with one record per logged step.
#pragma once
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>

#include "report/tensorboard.h"

namespace moeforge::train {

struct StepMetrics {
  int64_t step = 0, total = 0;
  double loss = 0, lr = 0, grad_norm = 0;
  double aux_loss = -1;  // < 0: not computed
  double mtp_loss = -1;  // multi-token prediction: the depths' mean cross-entropy, averaged; < 0: not trained
  int64_t tokens = 0;    // tokens in this step's global batch
};

class Progress {
 public:
  Progress(const std::string& metrics_path, int64_t first_step, bool append);
  ~Progress();
  // Records a step; prints and writes metrics when `log` is set.
  void step(const StepMetrics& m, bool log);
  // A validation result: its own line and metrics.jsonl record ({"step", "eval_loss",
  // "eval_perplexity", "eval_tokens"}); later progress lines show the latest eval loss.
  void eval(int64_t step, double loss, int64_t tokens);
  void message(const std::string& line);  // a plain line that does not clobber the progress line
  // Also writes every logged value as TensorBoard scalars (train/loss, train/learning_rate,
  // train/grad_norm, ..., eval/loss) into event files under `dir`.
  void report_to_tensorboard(const std::string& dir);
  void finish();

 private:
  FILE* metrics_ = nullptr;
  bool tty_ = false, line_open_ = false;
  std::chrono::steady_clock::time_point start_;
  int64_t first_step_ = 0, tokens_since_start_ = 0;
  double last_eval_ = -1;  // < 0: none yet
  std::unique_ptr<report::EventWriter> tensorboard_;
};

}  // namespace moeforge::train
