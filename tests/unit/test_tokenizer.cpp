// tokenizer.json against the `tokenizers` library: the ids, tokens and decoded text of every case in
// tests/fixtures/tokenizers/<style>/reference.json (tools/make_tokenizer_fixtures.py), for the
// Qwen3, Llama-3, GPT-OSS (o200k), DeepSeek-V3 and Mixtral (SentencePiece BPE) styles.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "hf/tokenizer/tokenizer.h"
#include "test_util.h"

using namespace moeforge;

class TokenizerParity : public ::testing::TestWithParam<const char*> {};

TEST_P(TokenizerParity, MatchesTheTokenizersLibrary) {
  const std::string dir = test::fixture(std::string("tokenizers/") + GetParam());
  auto tok = hf::Tokenizer::load(dir);
  auto ref = nlohmann::json::parse(std::ifstream(dir + "/reference.json"));
  int checked = 0;
  for (const auto& c : ref["cases"]) {
    const std::string text = c["text"];
    const bool add = c["add_special_tokens"];
    auto e = tok.encode_with_tokens(text, add);
    EXPECT_EQ(e.ids, c["ids"].get<std::vector<int64_t>>()) << "text: " << text << " add_special=" << add;
    EXPECT_EQ(e.tokens, c["tokens"].get<std::vector<std::string>>()) << text;
    EXPECT_EQ(tok.decode(e.ids, false), c["decoded"].get<std::string>()) << text;
    EXPECT_EQ(tok.decode(e.ids, true), c["decoded_skip_special"].get<std::string>()) << text;
    ++checked;
  }
  EXPECT_GT(checked, 40);
}

INSTANTIATE_TEST_SUITE_P(Styles, TokenizerParity,
                         ::testing::Values("qwen3", "llama3", "o200k", "deepseek_v3", "mixtral"));

TEST(TokenizerBadInput, UnsupportedModelTypeAndMalformedFiles) {
  test::TempDir dir;
  test::write_bytes(dir / "tokenizer.json", R"({"model": {"type": "Unigram", "vocab": []}})");
  try {
    hf::Tokenizer::load(dir.path.string());
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'model.type' value 'Unigram' is not supported"), std::string::npos) << e.what();
  }
  test::write_bytes(dir / "tokenizer.json", R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}})");
  EXPECT_THROW(hf::Tokenizer::load(dir.path.string()), Error);
  test::write_bytes(dir / "tokenizer.json", R"({"model": )");
  EXPECT_THROW(hf::Tokenizer::load(dir.path.string()), Error);
  test::write_bytes(dir / "tokenizer.json",
                    R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "pre_tokenizer": {"type": "Nope"}})");
  try {
    hf::Tokenizer::load(dir.path.string());
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("pre_tokenizer type 'Nope' is not supported"), std::string::npos) << e.what();
  }
}

// An id the JSON parser keeps as a float (beyond int64), or a fractional one, is refused naming the
// file and field; converting it was undefined behaviour (found by fuzz_tokenizer_json).
TEST(TokenizerBadInput, TokenIdsThatAreNotIntegersInRangeAreOneClearError) {
  test::TempDir dir;
  const std::string bpe = R"("model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]})";
  for (const char* id : {"9999999999999999999999999999994", "1.5", "-3", "4294967296"}) {
    test::write_bytes(dir / "tokenizer.json",
                      "{" + bpe + R"(, "added_tokens": [{"id": )" + id + R"(, "content": "<x>", "special": true}]})");
    const std::string err = test::error_of([&] { hf::Tokenizer::load(dir.path.string()); });
    EXPECT_NE(err.find("tokenizer.json: added_tokens[].id"), std::string::npos) << id << ": " << err;
  }
  test::write_bytes(dir / "tokenizer.json", "{" + bpe + R"(, "post_processor": {"type": "BertProcessing",
                    "cls": ["[CLS]", 1e31], "sep": ["[SEP]", 2]}})");
  const std::string err = test::error_of([&] { hf::Tokenizer::load(dir.path.string()); });
  EXPECT_NE(err.find("post_processor BertProcessing.cls must be an integer token id"), std::string::npos) << err;
}

TEST(TokenizerBadInput, UnknownSpecialTokens) {
  test::TempDir dir;
  // A post-processor template that names a special token it does not define.
  test::write_bytes(dir / "tokenizer.json", R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
    "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}},
      {"Sequence": {"id": "A", "type_id": 0}}], "pair": [], "special_tokens": {}}})");
  try {
    hf::Tokenizer::load(dir.path.string());
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("special token '<bos>' missing from special_tokens"), std::string::npos) << e.what();
  }
  // Decoding an id that no token has.
  auto tok = hf::Tokenizer::load(test::fixture("tokenizers/qwen3"));
  try {
    tok.decode({0, 999999});
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cannot decode id 999999"), std::string::npos) << e.what();
  }
}
