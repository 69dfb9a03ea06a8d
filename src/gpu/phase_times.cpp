#include "gpu/phase_times.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "ops/cuda/runtime.h"

namespace moeforge::gpu {

PhaseTimes::PhaseTimes() {
  const char* e = std::getenv("MOEFORGE_PHASE_TIMES");
  enabled_ = e && std::strcmp(e, "0") != 0 && *e;
}

void PhaseTimes::start() {
  if (!enabled_) return;
  cuda::synchronize();
  last_ = std::chrono::steady_clock::now();
}

void PhaseTimes::mark(const char* phase) {
  if (!enabled_) return;
  cuda::synchronize();
  const auto now = std::chrono::steady_clock::now();
  totals_[phase] += std::chrono::duration<double, std::milli>(now - last_).count();
  double& gib = allocated_gib_[phase];
  gib = std::max(gib, static_cast<double>(cuda::allocator_stats().allocated_bytes) / (1024.0 * 1024.0 * 1024.0));
  last_ = now;
}

}  // namespace moeforge::gpu
