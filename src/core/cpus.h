// How many threads a CPU computation should start by default.
#pragma once
#include <cstdint>

namespace moeforge::core {

// The CPUs this process may run on (its affinity mask), less those other processes keep busy right
// now (the runnable count of /proc/loadavg, this process not counted); at least 1. OpenMP's own
// default -- a thread per CPU -- spins against other work on a shared machine, which measured 12x
// slower than one thread on a busy 2-core machine.
int64_t idle_cpus();

}  // namespace moeforge::core
