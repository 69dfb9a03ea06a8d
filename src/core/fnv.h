#pragma once
// 64-bit FNV-1a: the project's one stable, dependency-free hash for keys that must not change
// between builds or machines (cache file names, recipe identities, per-module dropout salts).
// Not for anything adversarial.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

namespace moeforge {

inline constexpr uint64_t kFnv1aOffset = 1469598103934665603ull;

// `h` continues an earlier hash, so several pieces hash as their concatenation.
inline uint64_t fnv1a(const void* data, size_t n, uint64_t h = kFnv1aOffset) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

inline uint64_t fnv1a(std::string_view s, uint64_t h = kFnv1aOffset) { return fnv1a(s.data(), s.size(), h); }

// Sixteen lower-case hex digits, zero-padded.
inline std::string hex16(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

}  // namespace moeforge
