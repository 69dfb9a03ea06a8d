#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "hf/config.h"
#include "models/flops.h"
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
  j.erase("num_experts");  // Qwen3MoeConfig's default then, as Transformers reads it
  EXPECT_EQ(hf::parse_config(j, "x").num_experts, 128);
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

// Sizes no model has (an absurd expert count used to make inspect allocate until it was killed):
// each beyond its bound, or a product of in-bound sizes beyond 2^50 parameters, is one error.
TEST(ConfigBadInput, AbsurdSizesAreRefusedBeforeAnythingIsBuilt) {
  ojson j = base_v4();
  j["num_experts"] = 100000000;
  EXPECT_NE(error_of(j).find("field 'num_experts' is 100000000, beyond any model moeforge can hold"), std::string::npos);
  j = base_v4();
  j["num_hidden_layers"] = int64_t{1} << 40;
  EXPECT_NE(error_of(j).find("field 'num_hidden_layers'"), std::string::npos);
  j = base_v4();
  j["hidden_size"] = 65536;
  j["num_experts"] = 16384;
  j["moe_intermediate_size"] = 1 << 20;
  j["num_hidden_layers"] = 4096;
  EXPECT_NE(error_of(j).find("beyond what moeforge can hold (2^50"), std::string::npos);
  // 3 x 65536 x 2^20 x 16384 x 4096 ~ 1.4e19 (the experts' weights dominate), written readably.
  EXPECT_NE(error_of(j).find("about 1.4e+19 parameters"), std::string::npos) << error_of(j);
  j = base_v4();
  j["num_experts"] = 16384;  // large but possible
  EXPECT_EQ(error_of(j), "");
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

namespace {
// The smallest config.json of a family: sizes only, everything else from the class's defaults.
ojson minimal(const std::string& type) {
  ojson j = {{"model_type", type},          {"vocab_size", 64},          {"hidden_size", 32},
             {"num_hidden_layers", 4},      {"num_attention_heads", 4}};
  if (type == "mixtral" || type == "mistral" || type == "gpt_oss") {  // their classes default to 8 KV heads
    j["hidden_size"] = 128;
    j["num_attention_heads"] = 16;
  }
  return j;
}
}  // namespace

TEST(ConfigFamilies, DefaultsOfEachConfigurationClass) {
  auto mixtral = hf::parse_config(minimal("mixtral"), "x");
  EXPECT_EQ(mixtral.rope.theta, 1e6);                    // MixtralConfig.default_theta
  EXPECT_EQ(mixtral.num_key_value_heads, 8);             // MixtralConfig's default is 8, not the heads
  EXPECT_EQ(mixtral.num_experts, 8);                     // num_local_experts
  EXPECT_EQ(mixtral.num_experts_per_tok, 2);
  EXPECT_EQ(mixtral.moe_intermediate_size, 14336);       // the experts are intermediate_size wide
  EXPECT_TRUE(mixtral.norm_topk_prob);                   // Mixtral always renormalises
  EXPECT_DOUBLE_EQ(mixtral.rms_norm_eps, 1e-5);
  for (int l = 0; l < 4; ++l) EXPECT_TRUE(mixtral.is_moe_layer(l));

  auto qwen3 = hf::parse_config(minimal("qwen3"), "x");
  EXPECT_EQ(qwen3.head_dim, 128);  // Qwen3Config's default, not hidden / heads
  EXPECT_EQ(qwen3.qk_norm, hf::ModelConfig::QkNorm::PerHead);
  EXPECT_EQ(qwen3.num_experts, 0);

  auto qwen2 = hf::parse_config(minimal("qwen2"), "x");
  EXPECT_TRUE(qwen2.qkv_bias);
  EXPECT_FALSE(qwen2.o_bias);
  EXPECT_EQ(qwen2.head_dim, 8);

  auto mistral = hf::parse_config(minimal("mistral"), "x");
  EXPECT_EQ(mistral.window_of(0), 4096);  // MistralConfig's sliding_window default, on every layer
  ojson no_window = minimal("mistral");
  no_window["sliding_window"] = nullptr;
  EXPECT_FALSE(hf::parse_config(no_window, "x").window_of(0).has_value());

  auto olmoe = hf::parse_config(minimal("olmoe"), "x");
  EXPECT_EQ(olmoe.qk_norm, hf::ModelConfig::QkNorm::Full);
  EXPECT_EQ(olmoe.pad_token_id, 1);  // OlmoeConfig's default
  EXPECT_DOUBLE_EQ(olmoe.router_aux_loss_coef, 0.01);
  EXPECT_FALSE(olmoe.clip_qkv.has_value());

  auto qwen3_moe = hf::parse_config(minimal("qwen3_moe"), "x");
  EXPECT_EQ(qwen3_moe.num_experts, 128);
  EXPECT_EQ(qwen3_moe.moe_intermediate_size, 768);
  EXPECT_EQ(olmoe.num_experts, 64);

  auto qwen2_moe = hf::parse_config(minimal("qwen2_moe"), "x");
  EXPECT_EQ(qwen2_moe.num_experts, 60);
  EXPECT_EQ(qwen2_moe.shared_expert_intermediate_size, 5632);
  EXPECT_TRUE(qwen2_moe.qkv_bias);
  EXPECT_EQ(qwen2_moe.num_experts_per_tok, 4);

  auto gpt_oss = hf::parse_config(minimal("gpt_oss"), "x");
  EXPECT_EQ(gpt_oss.rope.type, "yarn");  // GptOssConfig's RoPE when none is named
  EXPECT_EQ(gpt_oss.rope.factor, 32.0);
  EXPECT_FALSE(gpt_oss.rope.truncate);
  EXPECT_EQ(gpt_oss.rope.original_max_position_embeddings, 4096);
  EXPECT_EQ(gpt_oss.rope.theta, 150000.0);
  EXPECT_EQ(gpt_oss.head_dim, 64);
  EXPECT_EQ(gpt_oss.window_of(0), 128);  // even layers slide
  EXPECT_FALSE(gpt_oss.window_of(1).has_value());
  EXPECT_TRUE(gpt_oss.attention_sinks && gpt_oss.gpt_oss_moe && gpt_oss.qkv_bias && gpt_oss.o_bias);
  EXPECT_EQ(gpt_oss.num_experts, 128);
  EXPECT_EQ(gpt_oss.num_experts_per_tok, 4);
  EXPECT_EQ(gpt_oss.swiglu_limit, 7.0);

  auto llama = hf::parse_config(minimal("llama"), "x");
  EXPECT_FALSE(llama.qkv_bias || llama.o_bias || llama.mlp_bias);
  EXPECT_FALSE(llama.pad_token_id.has_value());
}

TEST(ConfigFamilies, SlidingLayersFollowEachFamilysRule) {
  auto windows = [](const hf::ModelConfig& c) {
    std::vector<bool> w;
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) w.push_back(c.window_of(l).has_value());
    return w;
  };
  ojson q2 = minimal("qwen2");
  q2["use_sliding_window"] = true;
  q2["sliding_window"] = 16;
  q2["max_window_layers"] = 2;
  EXPECT_EQ(windows(hf::parse_config(q2, "x")), std::vector<bool>({false, false, true, true}));  // l >= 2
  ojson q2moe = minimal("qwen2_moe");
  q2moe["use_sliding_window"] = true;
  q2moe["sliding_window"] = 16;
  q2moe["max_window_layers"] = 3;
  EXPECT_EQ(windows(hf::parse_config(q2moe, "x")), std::vector<bool>({true, false, true, false}));  // even, < 3
  q2moe["use_sliding_window"] = false;
  EXPECT_EQ(windows(hf::parse_config(q2moe, "x")), std::vector<bool>(4, false));
  // layer_types, as Transformers 5 writes it, decides over the rule.
  q2["layer_types"] = {"sliding_attention", "full_attention", "full_attention", "sliding_attention"};
  EXPECT_EQ(windows(hf::parse_config(q2, "x")), std::vector<bool>({true, false, false, true}));
}

TEST(ConfigFamiliesBadInput, EachNamesTheField) {
  ojson j = minimal("qwen2");
  j["layer_types"] = {"full_attention", "chunked_attention", "full_attention", "full_attention"};
  EXPECT_NE(error_of(j).find("field 'layer_types' entry 1 is 'chunked_attention'"), std::string::npos);
  j["layer_types"] = {"full_attention"};
  EXPECT_NE(error_of(j).find("field 'layer_types' must list one entry per layer (4)"), std::string::npos);
  j = minimal("mixtral");
  j["router_jitter_noise"] = 0.1;
  EXPECT_NE(error_of(j).find("field 'router_jitter_noise'"), std::string::npos);
  j = minimal("olmoe");
  j["head_dim"] = 16;
  EXPECT_NE(error_of(j).find("field 'head_dim' must be hidden_size / num_attention_heads for olmoe"), std::string::npos);
  j = minimal("olmoe");
  j["clip_qkv"] = -1.0;
  EXPECT_NE(error_of(j).find("field 'clip_qkv' must be positive"), std::string::npos);
  j = minimal("llama");
  j["pad_token_id"] = 64;
  EXPECT_EQ(error_of(j), "m/config.json: field 'pad_token_id' is 64, outside the vocabulary of 64");
  j["pad_token_id"] = -1;  // torch reads it as the last row
  EXPECT_EQ(hf::parse_config(j, "x").pad_token_id, 63);
  j = minimal("qwen2_moe");
  j["shared_expert_intermediate_size"] = 0;
  EXPECT_NE(error_of(j).find("field 'shared_expert_intermediate_size' must be positive"), std::string::npos);
  j = minimal("bert");
  EXPECT_NE(error_of(j).find("(supported: deepseek_v3, gpt_oss, llama, mistral, mixtral, nemotron_h, olmoe, qwen2, qwen2_moe, qwen3, qwen3_moe)"),
            std::string::npos);
}

// shared/BENCHMARKS.md's anchor: Qwen3-30B-A3B at S = 4096 is 147.3 MFLOP per layer-token forward
// and 23.1 GFLOP per token for training.
TEST(Flops, Qwen3_30B_A3BMatchesTheProtocolsAnchor) {
  const std::string path = std::string(MOEFORGE_FIXTURES) + "/../../../shared/configs/qwen3-30b-a3b.json";
  if (!std::filesystem::exists(path)) GTEST_SKIP() << "shared/configs not beside the repo";
  const auto c = hf::load_config(path);
  const auto f = models::flops_per_token(c, 4096);
  const double head = 2.0 * c.hidden_size * c.vocab_size;
  EXPECT_NEAR((f.forward - head) / c.num_hidden_layers / 1e6, 147.3, 0.1);
  EXPECT_NEAR(f.training / 1e9, 23.1, 0.1);
}

// Nemotron-H counted by hand for nemotron_h_a (blocks M E M * E, S = 100): Mamba2 with 4 heads of 8
// (32 channels; conv over 32 + 2 groups x 8 x 2 = 64), attention 4 q / 2 kv heads of 8 without
// RoPE, top-2 of 6 relu^2 experts 12 wide plus a 16-wide shared expert and the router.
TEST(Flops, NemotronHCountsEachBlockKind) {
  const auto c = hf::load_config(test::fixture("nemotron_h_a"));
  const double h = 32, s = 100;
  const double mamba = 2 * h * (32 + 64 + 4) + 2 * 4 * 64 + 4 * (5 * 8 * 8 + 2 * 8) + 2 * 32 * h;
  const double attn = 2 * h * (32 + 2 * 16) + 2 * 32 * h + 2 * s * 32;
  const double moe = 2 * (2 * 2 * h * 12) + 2 * h * 6 + 2 * 2 * h * 16;
  const double want = 3 * (2 * mamba + attn + 2 * moe + 2 * h * 96);
  EXPECT_DOUBLE_EQ(models::flops_per_token(c, 100).training, want);
}

// Latent attention counted by hand for a small MLA config: q LoRA, kv LoRA, kv_b, o, and the core
// with q/k width 24 and v width 12 over half of S = 100.
TEST(Flops, LatentAttentionCountsItsOwnProjections) {
  const auto c = hf::load_config(test::fixture("deepseek_v3_a"));
  const double h = 32, heads = 4, qr = 24, kvr = 16, rope = 8, nope = 16, v = 12, qk = 24, s = 100;
  const double attn = 2 * h * qr + 2 * qr * heads * qk + 2 * h * (kvr + rope) + 2 * kvr * heads * (nope + v) +
                      2 * heads * v * h + s * heads * (qk + v);
  const double dense = 3 * 2 * h * 48, moe = 3 * 3 * 2 * h * 12 + 2 * h * 8 + 3 * 2 * h * 12;  // top-3, router, 1 shared
  const double want = 3 * (3 * attn + dense + 2 * moe + 2 * h * 96);  // layer 0 dense, layers 1-2 MoE
  EXPECT_DOUBLE_EQ(models::flops_per_token(c, 100).training, want);
}

// `moeforge bench --layers N`: a hybrid model's block pattern (either spelling) and the per-layer
// layer_types are cut to their first N entries with num_hidden_layers.
TEST(Config, CutToLayersCutsThePerLayerLists) {
  auto raw = nlohmann::ordered_json::parse(std::ifstream(test::fixture("nemotron_h_b") + "/config.json"));
  hf::cut_to_layers(raw, 3);
  auto c = hf::parse_config(raw, "cut");
  EXPECT_EQ(c.num_hidden_layers, 3);
  using B = hf::ModelConfig::Block;
  EXPECT_EQ(c.blocks, (std::vector<B>{B::Mamba, B::Mlp, B::Moe}));
  raw.erase("layers_block_type");
  raw["hybrid_override_pattern"] = "M*EME";
  hf::cut_to_layers(raw, 2);
  EXPECT_EQ(raw["hybrid_override_pattern"], "M*");
  EXPECT_EQ(hf::parse_config(raw, "cut").blocks, (std::vector<B>{B::Mamba, B::Attention}));
  auto gpt = nlohmann::ordered_json::parse(std::ifstream(test::fixture("gpt_oss_b") + "/config.json"));
  ASSERT_TRUE(gpt.contains("layer_types"));
  hf::cut_to_layers(gpt, 2);
  EXPECT_EQ(gpt["layer_types"].size(), 2u);
  EXPECT_EQ(hf::parse_config(gpt, "cut").num_hidden_layers, 2);
}
