#include <gtest/gtest.h>

#include <fstream>

#include "core/error.h"
#include "hf/config.h"
#include "test_util.h"

using namespace moeforge;
using ojson = nlohmann::ordered_json;

namespace {
ojson base_v4() {
  return ojson::parse(R"({"model_type": "qwen3_moe", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2,
    "moe_intermediate_size": 16, "rope_theta": 1000000.0, "rope_scaling": null, "some_future_field": {"x": 1}})");
}
std::string error_of(const ojson& j) {
  try {
    hf::parse_config(j, "m/config.json");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST(Config, BothSpellingsGiveTheSameConfig) {
  ojson v4 = base_v4();
  ojson v5 = v4;
  v5.erase("rope_theta");
  v5.erase("rope_scaling");
  v5.erase("num_experts");
  v5["num_local_experts"] = 4;
  v5["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 1000000.0}};
  auto a = hf::parse_config(v4, "v4"), b = hf::parse_config(v5, "v5");
  EXPECT_EQ(a.num_experts, 4);
  EXPECT_EQ(b.num_experts, 4);
  EXPECT_EQ(a.rope.theta, b.rope.theta);
  EXPECT_EQ(a.rope.type, b.rope.type);
  ojson v4s = v4;
  v4s["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
  EXPECT_EQ(hf::parse_config(v4s, "x").rope.type, "linear");
  EXPECT_EQ(hf::parse_config(v4s, "x").rope.factor, 2.0);
}

TEST(Config, SlidingWindowOnlyWhenEnabled) {
  ojson j = base_v4();
  j["sliding_window"] = 4096;
  EXPECT_FALSE(hf::parse_config(j, "x").sliding_window.has_value());
  j["use_sliding_window"] = true;
  EXPECT_EQ(hf::parse_config(j, "x").sliding_window, 4096);
}

TEST(Config, SparseLayerRule) {
  ojson j = base_v4();
  j["num_hidden_layers"] = 6;
  j["decoder_sparse_step"] = 2;
  j["mlp_only_layers"] = {3};
  auto c = hf::parse_config(j, "x");
  std::vector<bool> moe;
  for (int l = 0; l < 6; ++l) moe.push_back(c.is_moe_layer(l));
  EXPECT_EQ(moe, std::vector<bool>({false, true, false, false, false, true}));
}

TEST(Config, UnknownFieldsAreWrittenBack) {
  test::TempDir dir;
  auto c = hf::parse_config(base_v4(), "x");
  hf::save_config(c, dir / "config.json");
  auto back = ojson::parse(std::ifstream(dir / "config.json"));
  EXPECT_EQ(back, base_v4());
  EXPECT_EQ(back.begin().key(), "model_type");  // order kept
}

TEST(ConfigBadInput, MissingRequiredField) {
  ojson j = base_v4();
  j.erase("hidden_size");
  EXPECT_EQ(error_of(j), "m/config.json: field 'hidden_size' is required but missing");
  j = base_v4();
  j.erase("num_experts");
  EXPECT_NE(error_of(j).find("'num_experts' or 'num_local_experts' is required"), std::string::npos);
}

TEST(ConfigBadInput, UnsupportedModelType) {
  ojson j = base_v4();
  j["model_type"] = "bert";
  EXPECT_NE(error_of(j).find("field 'model_type' value 'bert' is not supported"), std::string::npos);
  j.erase("model_type");
  EXPECT_NE(error_of(j).find("'model_type' is required"), std::string::npos);
}

TEST(ConfigBadInput, WrongTypesAndValues) {
  ojson j = base_v4();
  j["num_attention_heads"] = "four";
  EXPECT_NE(error_of(j).find("field 'num_attention_heads' must be an integer"), std::string::npos);
  j = base_v4();
  j["num_key_value_heads"] = 3;
  EXPECT_NE(error_of(j).find("'num_key_value_heads' must be positive and divide"), std::string::npos);
  j = base_v4();
  j["num_experts_per_tok"] = 9;
  EXPECT_NE(error_of(j).find("num_experts_per_tok"), std::string::npos);
  j = base_v4();
  j["rope_scaling"] = {{"rope_type", "longrope"}, {"factor", 2.0}};
  EXPECT_NE(error_of(j).find("'longrope' is not supported"), std::string::npos);
  j = base_v4();
  j["mlp_only_layers"] = {7};
  EXPECT_NE(error_of(j).find("lists layer 7"), std::string::npos);
}

TEST(ConfigBadInput, MissingOrInvalidFile) {
  test::TempDir dir;
  EXPECT_THROW(hf::load_config(dir.path.string()), Error);
  test::write_bytes(dir / "config.json", "{\"model_type\": ");
  try {
    hf::load_config(dir.path.string());
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("config.json: invalid JSON"), std::string::npos);
  }
}
