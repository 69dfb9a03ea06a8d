#include "core/cpus.h"

#include <sched.h>

#include <algorithm>
#include <fstream>
#include <string>
#include <thread>

namespace moeforge::core {

int64_t idle_cpus() {
  int64_t allowed = 0;
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) allowed = CPU_COUNT(&set);
  if (allowed <= 0) allowed = std::max<unsigned>(1, std::thread::hardware_concurrency());
  // /proc/loadavg: "0.52 0.41 0.30 3/512 4242" -- the fourth field is runnable/total, this reader included.
  int64_t busy = 0;
  std::ifstream f("/proc/loadavg");
  std::string a, b, c, running;
  if (f >> a >> b >> c >> running) {
    try {
      busy = std::max<int64_t>(0, std::stoll(running.substr(0, running.find('/'))) - 1);
    } catch (const std::exception&) {
      busy = 0;
    }
  }
  return std::max<int64_t>(1, allowed - busy);
}

}  // namespace moeforge::core
