#include "core/logging.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace moeforge::log {

Level level() {
  static const Level l = [] {
    const char* e = std::getenv("MOEFORGE_LOG");
    if (!e) return Level::Info;
    if (!std::strcmp(e, "error")) return Level::Error;
    if (!std::strcmp(e, "warn")) return Level::Warn;
    if (!std::strcmp(e, "debug")) return Level::Debug;
    return Level::Info;
  }();
  return l;
}

void write(Level l, const std::string& msg) {
  static const char* names[] = {"error", "warning", "info", "debug"};
  std::fprintf(stderr, "moeforge %s: %s\n", names[static_cast<int>(l)], msg.c_str());
}

}  // namespace moeforge::log
