// Optional per-phase times of the GPU training step, for finding where a step's time goes without
// a profiler. MOEFORGE_PHASE_TIMES:
//   1 (sync)   every mark() synchronises the device and charges the wall time since the previous
//              mark to the named phase (the synchronisations cost a little, and they hide the gaps
//              where the GPU waits for the host: each phase starts with the host ahead of nothing);
//   events     every mark() records a CUDA event and the host's clock, nothing synchronises, and
//              finish_step() charges each phase its device time (event to event) and notes how far
//              the device ran behind the host at the phase's end ("lag"): a phase that ends with the
//              lag near zero had the GPU waiting for the host's launches.
// Off (unset or 0), mark() does nothing.
#pragma once
#include <chrono>
#include <map>
#include <string>
#include <vector>

namespace moeforge::gpu {

enum class PhaseMode { Off, Sync, Events };

class PhaseTimes {
 public:
  PhaseTimes();  // the mode from MOEFORGE_PHASE_TIMES
  explicit PhaseTimes(PhaseMode mode);
  ~PhaseTimes();
  PhaseTimes(const PhaseTimes&) = delete;
  PhaseTimes& operator=(const PhaseTimes&) = delete;

  bool enabled() const { return mode_ != PhaseMode::Off; }
  PhaseMode mode() const { return mode_; }
  void start();                  // begins a step: the next mark measures from here
  void mark(const char* phase);  // the end of `phase`
  // Events mode: waits for the step's marks and adds their times to the totals (call once per step,
  // after its work is queued). The other modes: nothing to do.
  void finish_step();
  // Milliseconds per phase summed over every measured step, by name.
  const std::map<std::string, double>& totals() const { return totals_; }
  // Events mode: how far the device was behind the host at a phase's marks, in ms, the mean over
  // its marks (0 when the phase has none).
  double mean_lag_ms(const std::string& phase) const;
  // The most device memory the allocator had handed out at the end of each phase (GiB): where a
  // step's peak builds up.
  const std::map<std::string, double>& allocated_gib() const { return allocated_gib_; }
  // Free-form observations (the latest per key), printed with the times.
  void note(const std::string& key, const std::string& text) { notes_[key] = text; }
  const std::map<std::string, std::string>& notes() const { return notes_; }
  void clear() {
    totals_.clear();
    lag_ms_.clear();
    lag_marks_.clear();
  }

 private:
  struct Mark {
    std::string phase;
    void* event = nullptr;  // cudaEvent_t
    std::chrono::steady_clock::time_point host;
  };
  void* take_event();

  PhaseMode mode_ = PhaseMode::Off;
  std::chrono::steady_clock::time_point last_;
  Mark start_;
  std::vector<Mark> marks_;
  std::vector<void*> spare_events_;
  std::map<std::string, double> totals_, lag_ms_, allocated_gib_;
  std::map<std::string, int> lag_marks_;
  std::map<std::string, std::string> notes_;
};

}  // namespace moeforge::gpu
