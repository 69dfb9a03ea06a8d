// load -> save -> load keeps every tensor and name; the fused expert layout loads and saves too;
// missing tensors and wrong shapes are refused naming the file and tensor.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "hf/safetensors.h"
#include "models/pretrained.h"
#include "test_util.h"

using namespace moeforge;
namespace fs = std::filesystem;

namespace {

void expect_same_checkpoint(const std::string& a_dir, const std::string& b_dir) {
  auto a = hf::SafetensorsCheckpoint::open(a_dir), b = hf::SafetensorsCheckpoint::open(b_dir);
  ASSERT_EQ(a.names(), b.names());
  for (const auto& n : a.names()) {
    Tensor x = a.get(n), y = b.get(n);
    ASSERT_EQ(x.dtype(), y.dtype()) << n;
    ASSERT_EQ(x.shape(), y.shape()) << n;
    ASSERT_EQ(0, std::memcmp(x.raw(), y.raw(), x.nbytes())) << n;
  }
}

Tensor logits_of(const std::string& dir, const std::string& fixture = "qwen3_moe_a") {
  auto ref = hf::SafetensorsFile::open(test::fixture(fixture) + "/reference.safetensors");
  auto m = models::from_pretrained(dir);
  return m.model->forward({ref.get("input_ids").clone()}).logits;
}

// Copies a fixture's config and weights (no reference, no after_adamw) into `dst`.
void copy_model(const std::string& src, const std::string& dst) {
  fs::create_directories(dst);
  for (const auto& de : fs::directory_iterator(src))
    if (de.is_regular_file() && de.path().filename().string().rfind("reference", 0) != 0)
      fs::copy_file(de.path(), fs::path(dst) / de.path().filename());
}

}  // namespace

TEST(RoundTrip, LoadSaveLoadIsIdentical) {
  for (const char* name : {"qwen3_moe_a", "qwen3_moe_a_hub", "qwen3_moe_b", "mixtral_a", "mixtral_a_v4", "mixtral_b",
                           "qwen2_moe_a", "qwen2_moe_a_v4", "qwen2_moe_b", "olmoe_a", "olmoe_b", "llama_a", "llama_b",
                           "llama_b_v4", "mistral_a", "mistral_b", "qwen2_a", "qwen2_b", "qwen3_a", "qwen3_b",
                           "gpt_oss_a", "gpt_oss_b", "deepseek_v3_mtp", "nemotron_h_a", "nemotron_h_b"}) {
    SCOPED_TRACE(name);
    test::TempDir tmp;
    auto m = models::from_pretrained(test::fixture(name));
    models::save_pretrained(*m.model, m.source_dir, tmp / "out");
    expect_same_checkpoint(test::fixture(name), tmp / "out");
    // The config keeps every field (both spellings stay as they were).
    auto src = nlohmann::ordered_json::parse(std::ifstream(test::fixture(name) + "/config.json"));
    auto dst = nlohmann::ordered_json::parse(std::ifstream(tmp / "out/config.json"));
    EXPECT_EQ(src, dst) << name;
    auto again = models::from_pretrained(tmp / "out");
    for (size_t i = 0; i < m.model->params().all().size(); ++i)
      ASSERT_EQ(test::max_abs_diff(m.model->params().all()[i].value, again.model->params().all()[i].value), 0.f);
  }
}

TEST(RoundTrip, ShardedSaveAndCompanionFiles) {
  test::TempDir tmp;
  auto m = models::from_pretrained(test::fixture("qwen3_moe_b"));
  models::SaveOptions o;
  o.max_shard_bytes = 4000;
  models::save_pretrained(*m.model, m.source_dir, tmp / "out", o);
  EXPECT_TRUE(fs::exists(tmp / "out/model.safetensors.index.json"));
  EXPECT_TRUE(fs::exists(tmp / "out/generation_config.json"));
  EXPECT_FALSE(hf::SafetensorsCheckpoint::open(tmp / "out").contains("lm_head.weight"));  // tied
  expect_same_checkpoint(test::fixture("qwen3_moe_b"), tmp / "out");
  // Existing output folders are refused unless overwrite is asked for.
  EXPECT_THROW(models::save_pretrained(*m.model, m.source_dir, tmp / "out", o), Error);
  o.overwrite = true;
  models::save_pretrained(*m.model, m.source_dir, tmp / "out", o);
  for (const auto& de : fs::directory_iterator(tmp.path))
    EXPECT_EQ(de.path().filename().string().find(".tmp."), std::string::npos) << "temporary left behind";
}

// A fixture rewritten under Transformers 5's in-memory names (fused experts; Mixtral's mlp.gate
// rather than block_sparse_moe.gate) loads to the same logits and saves in that spelling again.
void expect_in_memory_spelling_round_trips(const std::string& fixture, const std::string& a_name_it_has) {
  SCOPED_TRACE(fixture);
  test::TempDir tmp;
  auto m = models::from_pretrained(test::fixture(fixture));
  hf::NamedTensors in_memory;
  for (const auto& p : m.model->params().all()) in_memory.emplace_back(p.name, p.value);
  fs::create_directories(tmp / "mem");
  fs::copy_file(test::fixture(fixture) + "/config.json", tmp / "mem/config.json");
  hf::save_safetensors(tmp / "mem/model.safetensors", in_memory);
  EXPECT_TRUE(hf::SafetensorsCheckpoint::open(tmp / "mem").contains(a_name_it_has));
  EXPECT_EQ(test::max_abs_diff(logits_of(tmp / "mem", fixture), logits_of(test::fixture(fixture), fixture)), 0.f);
  auto f = models::from_pretrained(tmp / "mem");
  models::save_pretrained(*f.model, f.source_dir, tmp / "mem_out");
  expect_same_checkpoint(tmp / "mem", tmp / "mem_out");
}

TEST(RoundTrip, FusedExpertLayoutLoadsAndSavesFused) {
  expect_in_memory_spelling_round_trips("qwen3_moe_a", "model.layers.0.mlp.experts.gate_up_proj");
}

TEST(RoundTrip, MixtralInMemoryNamesLoadAndSaveAsTheyWere) {
  expect_in_memory_spelling_round_trips("mixtral_a", "model.layers.0.mlp.gate.weight");
}

TEST(RoundTripBadInput, MissingTensorNamesIt) {
  test::TempDir tmp;
  auto m = models::from_pretrained(test::fixture("qwen3_moe_b"));
  hf::NamedTensors ts = m.model->adapter().export_tensors(m.model->params(), std::nullopt);
  ts.erase(std::remove_if(ts.begin(), ts.end(), [](auto& t) { return t.first == "model.layers.1.mlp.experts.4.up_proj.weight"; }),
           ts.end());
  fs::create_directories(tmp / "m");
  fs::copy_file(test::fixture("qwen3_moe_b") + "/config.json", tmp / "m/config.json");
  hf::save_safetensors(tmp / "m/model.safetensors", ts);
  try {
    models::from_pretrained(tmp / "m");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("missing tensor 'model.layers.1.mlp.experts.4.up_proj.weight'"), std::string::npos)
        << e.what();
  }
}

TEST(RoundTripBadInput, WrongShapeForConfigNamesIt) {
  test::TempDir tmp;
  copy_model(test::fixture("qwen3_moe_b"), tmp / "m");
  auto cfg = nlohmann::ordered_json::parse(std::ifstream(tmp / "m/config.json"));
  cfg["moe_intermediate_size"] = 10;  // the stored experts are 12 wide
  std::ofstream(tmp / "m/config.json") << cfg.dump();
  try {
    models::from_pretrained(tmp / "m");
    FAIL();
  } catch (const Error& e) {
    const std::string w = e.what();
    EXPECT_NE(w.find("model.safetensors: tensor 'model.layers.1.mlp.experts.0.gate_proj.weight' has shape [12, 48] "
                     "but the config implies [10, 48]"),
              std::string::npos)
        << w;
  }
}
