// A run's metrics.jsonl read back: the training records (step, loss, lr, grad_norm) and the
// validation records (step, eval_loss), as the trainer writes them (train/progress.h).
#pragma once
#include <string>
#include <vector>

namespace moeforge::report {

struct RunMetrics {
  std::vector<double> step, loss, lr, grad_norm;  // training records, in file order
  std::vector<double> eval_step, eval_loss;       // validation records
};

// `path`: metrics.jsonl or the run's output folder holding it. A malformed line is an error naming file:line.
RunMetrics read_metrics(const std::string& path);

}  // namespace moeforge::report
