// Tokenizer throughput: MB/s of text encoded on one thread (the trainer's data loader can use one
// per core). Usage: tokenize_bench TOKENIZER_DIR [MEGABYTES]
// The text is a multilingual mix (English, code, Cyrillic, Greek, CJK, emoji, digits) repeated with
// a varying number so the word cache sees a realistic share of repeats.
#include <chrono>
#include <cstdio>
#include <string>

#include "core/error.h"
#include "hf/tokenizer/tokenizer.h"

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: tokenize_bench TOKENIZER_DIR [MEGABYTES]\n");
    return 2;
  }
  try {
    const double mb = argc > 2 ? std::stod(argv[2]) : 8.0;
    auto tok = moeforge::hf::Tokenizer::load(argv[1]);
    const char* parts[] = {
        "The quick brown fox jumps over the lazy dog while the model trains on 4096 tokens. ",
        "def step(self, x):\n    return self.w @ x + self.b  # residual\n",
        "Съешь же ещё этих мягких французских булок, да выпей чаю. ",
        "Γειά σου Κόσμε! ", "我能吞下玻璃而不伤身体。机器学习很有趣。", "👋🏽 👨‍👩‍👧‍👦 ", "It's 12:45, we've got 3,141,592 reasons. "};
    std::string text;
    size_t n = 0;
    while (text.size() < mb * 1e6) {
      text += parts[n % 7];
      text += std::to_string(n * 7919 % 100000) + " ";
      ++n;
    }
    // One document per ~2 KB, as a dataset of short rows would be.
    size_t tokens = 0;
    const auto t0 = std::chrono::steady_clock::now();
    for (size_t pos = 0; pos < text.size(); pos += 2048) {
      size_t end = std::min(text.size(), pos + 2048);
      while (end < text.size() && (static_cast<unsigned char>(text[end]) & 0xC0) == 0x80) ++end;
      tokens += tok.encode(text.substr(pos, end - pos), false).size();
      pos = end - 2048;
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("{\"tokenizer\": \"%s\", \"bytes\": %zu, \"tokens\": %zu, \"seconds\": %.3f, \"MB_per_s_per_core\": %.2f}\n",
                argv[1], text.size(), tokens, s, text.size() / s / 1e6);
  } catch (const moeforge::Error& e) {
    std::fprintf(stderr, "tokenize_bench: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
