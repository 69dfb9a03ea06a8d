// Chat templates against transformers: the Jinja engine on small templates (jinja_cases.json), and
// apply_chat_template text, ids and assistant masks for the Qwen3, DeepSeek-V3, Mixtral, GPT-OSS and
// a {% generation %} ChatML template (tests/fixtures/chat/<style>/reference.json, written by
// tools/make_chat_fixtures.py).
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "hf/chat/chat_template.h"
#include "hf/chat/jinja.h"
#include "hf/tokenizer/tokenizer.h"
#include "test_util.h"

using namespace moeforge;
using ojson = nlohmann::ordered_json;
namespace jinja = moeforge::hf::jinja;

namespace {
// 2026-01-15 12:00:00 UTC, the date the fixture script pins strftime_now to.
constexpr long long kPinnedTime = 1768478400;

ojson load(const std::string& path) { return ojson::parse(std::ifstream(path)); }

hf::ChatOptions options_of(const ojson& c) {
  hf::ChatOptions o;
  for (auto it = c["kwargs"].begin(); it != c["kwargs"].end(); ++it) {
    if (it.key() == "add_generation_prompt") o.add_generation_prompt = it.value().get<bool>();
    else o.extra[it.key()] = it.value();
  }
  if (c.contains("tools")) o.tools = c["tools"];
  return o;
}
}  // namespace

TEST(Jinja, MatchesTransformersEnvironment) {
  jinja::set_fixed_time_for_tests(kPinnedTime);
  const ojson ref = load(test::fixture("chat/jinja_cases.json"));
  int checked = 0;
  for (const auto& c : ref["cases"]) {
    const std::string name = c["name"];
    std::vector<std::pair<std::string, jinja::Value>> vars;
    for (auto it = c["vars"].begin(); it != c["vars"].end(); ++it) vars.emplace_back(it.key(), jinja::from_json(it.value()));
    if (c.contains("error")) {
      EXPECT_THROW(jinja::Template(c["template"].get<std::string>()).render(vars), Error) << name;
    } else {
      try {
        EXPECT_EQ(jinja::Template(c["template"].get<std::string>()).render(vars).text, c["expected"].get<std::string>())
            << name;
      } catch (const Error& e) {
        ADD_FAILURE() << name << ": " << e.what();
      }
    }
    ++checked;
  }
  jinja::set_fixed_time_for_tests(-1);
  EXPECT_GE(checked, 40);
}

class ChatParity : public ::testing::TestWithParam<const char*> {};

TEST_P(ChatParity, MatchesApplyChatTemplate) {
  jinja::set_fixed_time_for_tests(kPinnedTime);
  const std::string dir = test::fixture(std::string("chat/") + GetParam());
  auto tok = hf::Tokenizer::load(dir);
  auto tmpl = hf::ChatTemplate::load(dir);
  ASSERT_TRUE(tmpl.has_value());
  const ojson ref = load(dir + "/reference.json");
  for (const auto& c : ref["cases"]) {
    const std::string name = c["name"];
    const hf::ChatOptions opts = options_of(c);
    if (c.contains("error")) {
      try {
        tmpl->render(c["messages"], opts);
        ADD_FAILURE() << name << ": expected an error like: " << c["error"];
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find(tmpl->origin()), std::string::npos) << e.what();
      }
      continue;
    }
    hf::ChatEncoding enc;
    try {
      enc = tmpl->encode(tok, c["messages"], opts, /*with_mask=*/c.contains("assistant_masks"));
    } catch (const Error& e) {
      ADD_FAILURE() << name << ": " << e.what();
      continue;
    }
    EXPECT_EQ(enc.text, c["text"].get<std::string>()) << name;
    EXPECT_EQ(enc.ids, c["ids"].get<std::vector<int64_t>>()) << name;
    if (c.contains("assistant_masks"))
      EXPECT_EQ(std::vector<int>(enc.assistant_mask.begin(), enc.assistant_mask.end()),
                c["assistant_masks"].get<std::vector<int>>())
          << name;
  }
  jinja::set_fixed_time_for_tests(-1);
}

INSTANTIATE_TEST_SUITE_P(Templates, ChatParity,
                         ::testing::Values("qwen3", "deepseek_v3", "mixtral", "gpt_oss", "chatml_generation"));

// Without {% generation %} blocks the mask comes from rendering each turn's prefix. On the ChatML
// template it must agree exactly with the blocks; on the others every assistant reply (and the end
// token that closes it) is trained and no system or user text is.
TEST(ChatMask, PrefixRuleAgreesWithGenerationBlocks) {
  const std::string dir = test::fixture("chat/chatml_generation");
  auto tok = hf::Tokenizer::load(dir);
  auto tagged = hf::ChatTemplate::load(dir);
  std::string src = test::read_text(test::fixture("chat/templates/chatml_generation.jinja"));
  for (const char* tag : {"{%- generation %}", "{%- endgeneration %}"}) {
    const size_t p = src.find(tag);
    ASSERT_NE(p, std::string::npos);
    src.erase(p, std::string(tag).size());
  }
  auto plain = hf::ChatTemplate::from_source(src, "untagged", dir);
  ASSERT_FALSE(plain.has_generation_tags());
  const ojson ref = load(dir + "/reference.json");
  for (const auto& c : ref["cases"]) {
    const auto a = tagged->encode(tok, c["messages"], options_of(c));
    const auto b = plain.encode(tok, c["messages"], options_of(c));
    EXPECT_EQ(a.ids, b.ids);
    EXPECT_EQ(a.assistant_mask, b.assistant_mask) << c["name"];
  }
}

class ChatMaskByPrefix : public ::testing::TestWithParam<const char*> {};

TEST_P(ChatMaskByPrefix, TrainsAssistantTurnsOnly) {
  jinja::set_fixed_time_for_tests(kPinnedTime);
  const std::string dir = test::fixture(std::string("chat/") + GetParam());
  auto tok = hf::Tokenizer::load(dir);
  auto tmpl = hf::ChatTemplate::load(dir);
  const ojson ref = load(dir + "/reference.json");
  for (const auto& c : ref["cases"]) {
    if (c.contains("error") || c["kwargs"].value("add_generation_prompt", false)) continue;
    if (std::string(GetParam()) == "gpt_oss" && c["name"] == "tools") {
      // The template drops the tool call's analysis once a final answer follows: history is
      // rewritten, so the prefix rule must refuse (and say how to fix it) rather than guess.
      EXPECT_THROW(tmpl->encode(tok, c["messages"], options_of(c)), Error);
      continue;
    }
    const auto enc = tmpl->encode(tok, c["messages"], options_of(c));
    // Decode each run of masked tokens on its own.
    std::vector<std::string> runs;
    std::vector<int64_t> run;
    for (size_t k = 0; k <= enc.ids.size(); ++k) {
      if (k < enc.ids.size() && enc.assistant_mask[k]) {
        run.push_back(enc.ids[k]);
      } else if (!run.empty()) {
        runs.push_back(tok.decode(run, false));
        run.clear();
      }
    }
    size_t assistant_turns = 0;
    std::string trained;
    for (const auto& r : runs) trained += r + "\x01";
    for (const auto& m : c["messages"]) {
      if (!m.contains("content") || !m["content"].is_string()) continue;
      const std::string content = m["content"];
      std::string visible = content;  // the reply as rendered: reasoning before </think> is dropped
      if (const size_t t = visible.find("</think>"); t != std::string::npos) visible = visible.substr(t + 8);
      // Decoders may drop a leading space, so compare without the ends' whitespace.
      while (!visible.empty() && std::isspace(static_cast<unsigned char>(visible.front()))) visible.erase(0, 1);
      while (!visible.empty() && std::isspace(static_cast<unsigned char>(visible.back()))) visible.pop_back();
      if (m["role"] == "assistant") {
        if (visible.empty()) continue;
        ++assistant_turns;
        EXPECT_NE(trained.find(visible), std::string::npos) << c["name"] << ": assistant reply not trained: " << visible;
      } else if (m["role"] == "user" && content.size() > 3) {
        EXPECT_EQ(trained.find(content), std::string::npos) << c["name"] << ": user text trained: " << content;
      }
    }
    EXPECT_GT(assistant_turns, 0u);
    // Every assistant turn closes with the template's end token, and that token is trained.
    EXPECT_GE(runs.size(), 1u);
  }
  jinja::set_fixed_time_for_tests(-1);
}

INSTANTIATE_TEST_SUITE_P(Templates, ChatMaskByPrefix, ::testing::Values("qwen3", "deepseek_v3", "mixtral", "gpt_oss"));

TEST(ChatBadInput, ErrorsNameTheFileAndLine) {
  test::TempDir dir;
  test::write_bytes(dir / "tokenizer_config.json", R"({"chat_template": "{% for m in messages %}{{ m.content }"})");
  try {
    hf::ChatTemplate::load(dir.path.string());
    FAIL();
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("tokenizer_config.json: chat_template"), std::string::npos) << msg;
    EXPECT_NE(msg.find("line 1"), std::string::npos) << msg;
  }
  test::write_bytes(dir / "tokenizer_config.json", R"({"chat_template": 5})");
  EXPECT_THROW(hf::ChatTemplate::load(dir.path.string()), Error);
  test::write_bytes(dir / "tokenizer_config.json", R"({"chat_template": [{"name": "tool_use", "template": "x"}]})");
  EXPECT_THROW(hf::ChatTemplate::load(dir.path.string()), Error);
  test::write_bytes(dir / "tokenizer_config.json", R"({"bos_token": "<s>"})");
  EXPECT_FALSE(hf::ChatTemplate::load(dir.path.string()).has_value());
  test::write_bytes(dir / "tokenizer_config.json",
                    R"({"chat_template": [{"name": "default", "template": "{{ bos_token }}{% include 'x' %}"}]})");
  try {
    hf::ChatTemplate::load(dir.path.string());
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("unsupported tag 'include'"), std::string::npos) << e.what();
  }
  // A runtime error names the template and line.
  auto t = hf::ChatTemplate::from_source("line one\n{{ messages[0].content.nope.deeper }}", "inline", dir.path.string());
  try {
    t.render(ojson::parse(R"([{"role": "user", "content": "x"}])"), {});
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("inline: chat template line 2"), std::string::npos) << e.what();
  }
}

// Templates arrive inside downloaded checkpoints: runaway ones stop with an error.
TEST(ChatBadInput, RunawayTemplatesAreBounded) {
  auto expect_error = [](const std::string& src, const std::string& what) {
    try {
      jinja::Template(src).render({});
      ADD_FAILURE() << "no error for " << src;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  expect_error("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "maximum recursion depth exceeded");
  expect_error("{{ " + std::string(500, '(') + "1" + std::string(500, ')') + " }}", "nests deeper than 200 levels");
  expect_error("{{ 'x' * 1000000000000 }}", "repetition result too large");
  expect_error("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "evaluation steps");
  expect_error("{{ range(1000000000)|length }}", "range too big");
}
