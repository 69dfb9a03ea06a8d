#include "core/fault_injection.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>

namespace moeforge::core {

namespace {
// The fault point to stop at (0: none), read once.
long target() {
  static const long t = [] {
    const char* v = std::getenv("MOEFORGE_FAULT_AT");
    return v ? std::atol(v) : 0L;
  }();
  return t;
}
std::atomic<long> reached{0};
}  // namespace

void fault_point(const char* what) {
  if (target() <= 0) return;
  if (reached.fetch_add(1) + 1 == target()) {
    std::fprintf(stderr, "moeforge: fault injected at point %ld (%s)\n", target(), what);
    std::fflush(stderr);
    std::_Exit(kFaultExitCode);
  }
}

}  // namespace moeforge::core
