// libFuzzer target: arbitrary bytes as a model's config.json (both spellings, every family): a
// config parses into sizes a model can have, or throws moeforge::Error naming the file and field.
#include <cstddef>
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "hf/config.h"
#include "hf/fs_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    moeforge::hf::check_json_depth(text, "fuzz/config.json");
    nlohmann::ordered_json j;
    try {
      j = nlohmann::ordered_json::parse(text);
    } catch (const nlohmann::json::exception&) {
      return 0;  // the reader reports malformed JSON as one error before this point
    }
    const auto cfg = moeforge::hf::parse_config(j, "fuzz/config.json");
    if (cfg.hidden_size <= 0 || cfg.num_hidden_layers <= 0 || cfg.vocab_size <= 0) __builtin_trap();
  } catch (const moeforge::Error&) {
  }
  return 0;
}
