// libFuzzer target: arbitrary bytes as one line of a jsonl dataset (input_ids, text,
// prompt/completion and messages rows, the last rendered by a real chat template). The line must
// give a row or throw moeforge::Error; nothing else is acceptable.
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "core/error.h"
#include "data/dataset.h"
#include "hf/chat/chat_template.h"
#include "hf/tokenizer/tokenizer.h"

namespace {
struct Fixture {
  moeforge::hf::Tokenizer tok;
  std::optional<moeforge::hf::ChatTemplate> chat;
  moeforge::data::DatasetOptions opts;
};
Fixture& fixture() {
  static Fixture* f = [] {
    const std::string dir = std::string(MOEFORGE_FIXTURES) + "/chat/qwen3";
    auto* x = new Fixture{moeforge::hf::Tokenizer::load(dir), moeforge::hf::ChatTemplate::load(dir), {}};
    x->opts.tokenizer = &x->tok;
    x->opts.chat_template = &*x->chat;
    x->opts.eos_id = 2;
    return x;
  }();
  return *f;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string line(reinterpret_cast<const char*>(data), size);
  try {
    auto row = moeforge::data::parse_dataset_line(line, "fuzz.jsonl:1", fixture().opts);
    // Labels, where a row has its own (unset: every token trained), are one per token.
    if (row.input_ids.empty() || (row.labels && row.labels->size() != row.input_ids.size())) __builtin_trap();
  } catch (const moeforge::Error&) {
  }
  return 0;
}
