// Optional per-phase wall times of the GPU training step, for finding where a step's time goes
// without a profiler: with MOEFORGE_PHASE_TIMES=1 every mark() synchronises the device and charges
// the time since the previous mark to the named phase (the synchronisations cost a little, so
// phase times add up to slightly more than an unmeasured step). Off, mark() does nothing.
#pragma once
#include <chrono>
#include <map>
#include <string>

namespace moeforge::gpu {

class PhaseTimes {
 public:
  PhaseTimes();
  bool enabled() const { return enabled_; }
  void start();                  // begins a step: the next mark measures from here
  void mark(const char* phase);  // charges the time since the last mark to `phase`
  // Milliseconds per phase summed over every measured step, by name.
  const std::map<std::string, double>& totals() const { return totals_; }
  // The most device memory the allocator had handed out at the end of each phase (GiB): where a
  // step's peak builds up.
  const std::map<std::string, double>& allocated_gib() const { return allocated_gib_; }
  // Free-form observations (the latest per key), printed with the times.
  void note(const std::string& key, const std::string& text) { notes_[key] = text; }
  const std::map<std::string, std::string>& notes() const { return notes_; }
  void clear() { totals_.clear(); }

 private:
  bool enabled_ = false;
  std::chrono::steady_clock::time_point last_;
  std::map<std::string, double> totals_, allocated_gib_;
  std::map<std::string, std::string> notes_;
};

}  // namespace moeforge::gpu
