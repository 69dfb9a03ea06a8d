#include "train/progress.h"

#include <unistd.h>

#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace moeforge::train {

namespace {
std::string duration(double s) {
  char buf[32];
  const long t = static_cast<long>(s + 0.5);
  if (t >= 3600) std::snprintf(buf, sizeof buf, "%ld:%02ld:%02ld", t / 3600, (t / 60) % 60, t % 60);
  else std::snprintf(buf, sizeof buf, "%ld:%02ld", t / 60, t % 60);
  return buf;
}
}  // namespace

Progress::Progress(const std::string& metrics_path, int64_t first_step, bool append)
    : tty_(::isatty(STDERR_FILENO)), start_(std::chrono::steady_clock::now()), first_step_(first_step) {
  metrics_ = std::fopen(metrics_path.c_str(), append ? "a" : "w");
  MF_CHECK(metrics_, metrics_path, ": cannot open for writing");
}

Progress::~Progress() {
  if (metrics_) std::fclose(metrics_);
}

void Progress::step(const StepMetrics& m, bool log) {
  tokens_since_start_ += m.tokens;
  if (!log) return;
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const double tps = elapsed > 0 ? tokens_since_start_ / elapsed : 0;
  const int64_t done = m.step - first_step_;
  const double eta = done > 0 ? elapsed / done * (m.total - m.step) : 0;
  nlohmann::ordered_json j = {{"step", m.step}, {"loss", m.loss}, {"lr", m.lr}, {"grad_norm", m.grad_norm},
                              {"tokens", m.tokens}, {"tokens_per_s", tps}, {"elapsed_s", elapsed}};
  if (m.aux_loss >= 0) j["aux_loss"] = m.aux_loss;
  if (m.mtp_loss >= 0) j["mtp_loss"] = m.mtp_loss;
  std::fprintf(metrics_, "%s\n", j.dump().c_str());
  std::fflush(metrics_);
  if (tensorboard_) {
    tensorboard_->scalar("train/loss", m.step, m.loss);
    tensorboard_->scalar("train/learning_rate", m.step, m.lr);
    tensorboard_->scalar("train/grad_norm", m.step, m.grad_norm);
    tensorboard_->scalar("train/tokens_per_second", m.step, tps);
    if (m.aux_loss >= 0) tensorboard_->scalar("train/aux_loss", m.step, m.aux_loss);
    if (m.mtp_loss >= 0) tensorboard_->scalar("train/mtp_loss", m.step, m.mtp_loss);
    tensorboard_->flush();
  }
  char mtp[96] = "";
  if (m.mtp_loss >= 0) std::snprintf(mtp, sizeof mtp, " | mtp-loss %.4f", m.mtp_loss);
  if (last_eval_ >= 0)
    std::snprintf(mtp + std::strlen(mtp), sizeof mtp - std::strlen(mtp), " | eval-loss %.4f", last_eval_);
  char line[288];
  std::snprintf(line, sizeof line, "step %lld/%lld | loss %.4f%s | lr %.3e | grad-norm %.3f | %.0f tok/s | ETA %s",
                static_cast<long long>(m.step), static_cast<long long>(m.total), m.loss, mtp, m.lr, m.grad_norm, tps,
                duration(eta).c_str());
  if (tty_) {
    std::fprintf(stderr, "\r\033[K%s", line);
    line_open_ = true;
  } else {
    std::fprintf(stderr, "%s\n", line);
  }
  std::fflush(stderr);
}

void Progress::eval(int64_t step, double loss, int64_t tokens) {
  last_eval_ = loss;
  const nlohmann::ordered_json j = {
      {"step", step}, {"eval_loss", loss}, {"eval_perplexity", std::exp(loss)}, {"eval_tokens", tokens}};
  std::fprintf(metrics_, "%s\n", j.dump().c_str());
  std::fflush(metrics_);
  if (tensorboard_) {
    tensorboard_->scalar("eval/loss", step, loss);
    tensorboard_->scalar("eval/perplexity", step, std::exp(loss));
    tensorboard_->flush();
  }
  char line[160];
  std::snprintf(line, sizeof line, "eval at step %lld | eval-loss %.4f | perplexity %.3f | %lld tokens",
                static_cast<long long>(step), loss, std::exp(loss), static_cast<long long>(tokens));
  message(line);
}

void Progress::report_to_tensorboard(const std::string& dir) { tensorboard_ = std::make_unique<report::EventWriter>(dir); }

void Progress::message(const std::string& msg) {
  if (line_open_) std::fprintf(stderr, "\n");
  line_open_ = false;
  std::fprintf(stderr, "%s\n", msg.c_str());
}

void Progress::finish() {
  if (line_open_) std::fprintf(stderr, "\n");
  line_open_ = false;
}

}  // namespace moeforge::train
