// libFuzzer target: arbitrary bytes as a chat template (templates ship inside downloaded
// checkpoints). Parsing and rendering a conversation must succeed or throw moeforge::Error, within
// the engine's step, depth and output limits.
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/error.h"
#include "hf/chat/jinja.h"

namespace jinja = moeforge::hf::jinja;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string source(reinterpret_cast<const char*>(data), size);
  try {
    jinja::Template t(source);
    const auto messages = jinja::from_json(nlohmann::ordered_json::parse(
        R"([{"role": "system", "content": "sys"}, {"role": "user", "content": "héllo 👋"},
            {"role": "assistant", "content": "<think>r</think>ok", "tool_calls": [{"function": {"name": "f", "arguments": {"a": [1, 2.5, null]}}}]}])"));
    t.render({{"messages", messages}, {"add_generation_prompt", jinja::Value::boolean(true)},
              {"bos_token", jinja::Value::string("<s>")}, {"tools", jinja::Value::none()}});
  } catch (const moeforge::Error&) {
  }
  return 0;
}
