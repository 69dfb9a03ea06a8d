// libFuzzer target: arbitrary bytes as a safetensors file's JSON header, validated against a data
// area whose size the first 8 bytes choose (a header must give entries that fit it, or throw
// moeforge::Error; nothing else is acceptable). The index file's reader shares the JSON checks.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <string>

#include "core/error.h"
#include "hf/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  uint64_t data_bytes = 0;
  if (size >= 8) {
    std::memcpy(&data_bytes, data, 8);
    data += 8;
    size -= 8;
  }
  const std::string header(reinterpret_cast<const char*>(data), size);
  try {
    std::map<std::string, std::string> meta;
    const auto entries = moeforge::hf::SafetensorsFile::parse_header(header, data_bytes, "fuzz.safetensors", &meta);
    for (const auto& e : entries)
      if (e.begin > e.end || e.end > data_bytes) __builtin_trap();  // accepted entries lie inside the data
  } catch (const moeforge::Error&) {
  }
  return 0;
}
