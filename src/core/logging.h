// Logging to stderr with a level chosen by MOEFORGE_LOG (error|warn|info|debug; default info).
#pragma once
#include <sstream>
#include <string>

namespace moeforge::log {

enum class Level { Error = 0, Warn = 1, Info = 2, Debug = 3 };
Level level();
void write(Level l, const std::string& msg);

template <typename... Args>
void info(Args&&... a) {
  if (level() < Level::Info) return;
  std::ostringstream os;
  (os << ... << a);
  write(Level::Info, os.str());
}
template <typename... Args>
void warn(Args&&... a) {
  if (level() < Level::Warn) return;
  std::ostringstream os;
  (os << ... << a);
  write(Level::Warn, os.str());
}
template <typename... Args>
void debug(Args&&... a) {
  if (level() < Level::Debug) return;
  std::ostringstream os;
  (os << ... << a);
  write(Level::Debug, os.str());
}

}  // namespace moeforge::log
