// libFuzzer target: arbitrary bytes as a tokenizer.json. Loading must either succeed or throw
// moeforge::Error (one clear message); a loaded tokenizer must encode and decode without crashing.
// Any other exception, a crash or a sanitizer report is a bug.
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/error.h"
#include "hf/tokenizer/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    auto tok = moeforge::hf::Tokenizer::parse(text, "fuzz/tokenizer.json");
    for (const char* sample : {"Hello, world! 你好 👩‍👩‍👧 e\xcc\x81  \t\r\n 12345 don't", "", "<|im_start|>x"}) {
      auto ids = tok.encode(sample, true);
      try {
        tok.decode(ids, false);
        tok.decode(ids, true);
      } catch (const moeforge::Error&) {
      }
    }
  } catch (const moeforge::Error&) {
  }
  return 0;
}
