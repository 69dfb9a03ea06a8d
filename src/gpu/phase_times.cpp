#include "gpu/phase_times.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "core/error.h"
#include "ops/cuda/runtime.h"

namespace moeforge::gpu {

namespace {

PhaseMode mode_from_env() {
  const char* e = std::getenv("MOEFORGE_PHASE_TIMES");
  if (!e || !*e || std::strcmp(e, "0") == 0) return PhaseMode::Off;
  return std::strcmp(e, "events") == 0 ? PhaseMode::Events : PhaseMode::Sync;
}

void check(cudaError_t err, const char* what) {
  MF_CHECK(err == cudaSuccess, "phase times: ", what, ": ", cudaGetErrorString(err));
}

double ms_between(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

}  // namespace

PhaseTimes::PhaseTimes() : PhaseTimes(mode_from_env()) {}

PhaseTimes::PhaseTimes(PhaseMode mode) : mode_(mode) {}

PhaseTimes::~PhaseTimes() {
  for (void* e : spare_events_) cudaEventDestroy(static_cast<cudaEvent_t>(e));
  for (const Mark& m : marks_) cudaEventDestroy(static_cast<cudaEvent_t>(m.event));
  if (start_.event) cudaEventDestroy(static_cast<cudaEvent_t>(start_.event));
}

void* PhaseTimes::take_event() {
  if (!spare_events_.empty()) {
    void* e = spare_events_.back();
    spare_events_.pop_back();
    return e;
  }
  cudaEvent_t e = nullptr;
  check(cudaEventCreate(&e), "creating an event");
  return e;
}

void PhaseTimes::start() {
  if (mode_ == PhaseMode::Off) return;
  cuda::synchronize();  // the device idle: its clock and the host's start together
  last_ = std::chrono::steady_clock::now();
  if (mode_ != PhaseMode::Events) return;
  for (Mark& m : marks_) spare_events_.push_back(m.event);  // a step never finished: its marks dropped
  marks_.clear();
  if (!start_.event) start_.event = take_event();
  check(cudaEventRecord(static_cast<cudaEvent_t>(start_.event), nullptr), "recording the step's start");
  start_.host = std::chrono::steady_clock::now();
}

void PhaseTimes::mark(const char* phase) {
  if (mode_ == PhaseMode::Off) return;
  double& gib = allocated_gib_[phase];
  gib = std::max(gib, static_cast<double>(cuda::allocator_stats().allocated_bytes) / (1024.0 * 1024.0 * 1024.0));
  if (mode_ == PhaseMode::Events) {
    Mark m{phase, take_event(), {}};
    check(cudaEventRecord(static_cast<cudaEvent_t>(m.event), nullptr), "recording a mark");
    m.host = std::chrono::steady_clock::now();
    marks_.push_back(std::move(m));
    return;
  }
  cuda::synchronize();
  const auto now = std::chrono::steady_clock::now();
  totals_[phase] += ms_between(last_, now);
  last_ = now;
}

double PhaseTimes::mean_lag_ms(const std::string& phase) const {
  const auto n = lag_marks_.find(phase);
  return n == lag_marks_.end() || n->second == 0 ? 0.0 : lag_ms_.at(phase) / n->second;
}

void PhaseTimes::finish_step() {
  if (mode_ != PhaseMode::Events || marks_.empty()) return;
  check(cudaEventSynchronize(static_cast<cudaEvent_t>(marks_.back().event)), "waiting for the step's marks");
  const Mark* prev = &start_;
  for (const Mark& m : marks_) {
    float gpu = 0.f, since_start = 0.f;
    check(cudaEventElapsedTime(&gpu, static_cast<cudaEvent_t>(prev->event), static_cast<cudaEvent_t>(m.event)),
          "timing a phase");
    check(cudaEventElapsedTime(&since_start, static_cast<cudaEvent_t>(start_.event), static_cast<cudaEvent_t>(m.event)),
          "timing a mark");
    totals_[m.phase] += gpu;
    // The device reached the mark `since_start` after the step began; the host queued it
    // ms_between(start, host) after: the difference is how far the device was behind.
    lag_ms_[m.phase] += std::max(0.0, static_cast<double>(since_start) - ms_between(start_.host, m.host));
    ++lag_marks_[m.phase];
    prev = &m;
  }
  for (Mark& m : marks_) spare_events_.push_back(m.event);
  marks_.clear();
}

}  // namespace moeforge::gpu
