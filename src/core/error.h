// Errors with context: every problem is thrown where it is found, naming the file, tensor or field.
// The CLI catches moeforge::Error, prints its one-line message and exits non-zero.
#pragma once
#include <stdexcept>
#include <string>

namespace moeforge {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// Builds a message from streamable parts: MF_THROW("file.json: field 'x' must be > 0, got ", v).
template <typename... Args>
[[noreturn]] void throw_error(Args&&... parts);

}  // namespace moeforge

#include <sstream>
namespace moeforge {
template <typename... Args>
[[noreturn]] void throw_error(Args&&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw Error(os.str());
}
}  // namespace moeforge

#define MF_THROW(...) ::moeforge::throw_error(__VA_ARGS__)
#define MF_CHECK(cond, ...)                 \
  do {                                      \
    if (!(cond)) MF_THROW(__VA_ARGS__);     \
  } while (0)
