// Logits and loss against Hugging Face Transformers on the committed fixtures
// (tools/make_fixtures.py; references computed by Transformers on the CPU in fp32).
#include <gtest/gtest.h>

#include <cmath>

#include "hf/safetensors.h"
#include "models/pretrained.h"
#include "test_util.h"

using namespace moeforge;

namespace {

struct Case {
  const char* name;
};

class Parity : public ::testing::TestWithParam<const char*> {};

TEST_P(Parity, LogitsAndLossMatchTransformers) {
  const std::string dir = test::fixture(GetParam());
  auto ref = hf::SafetensorsFile::open(dir + "/reference.safetensors");
  auto m = models::from_pretrained(dir);
  Tensor ids = ref.get("input_ids").clone(), labels = ref.get("labels").clone();
  auto out = m.model->forward({ids, &labels});
  Tensor want = ref.get("logits");
  ASSERT_EQ(out.logits.shape(), want.shape());
  const float diff = test::max_abs_diff(out.logits, want);
  EXPECT_LT(diff, 1e-4f) << "max |logits - reference|";
  const float want_loss = ref.get("loss").item_f32();
  EXPECT_NEAR(out.loss, want_loss, 1e-5) << "loss";
  if (ref.contains("aux_loss")) EXPECT_NEAR(out.aux_loss, ref.get("aux_loss").item_f32(), 1e-5) << "aux loss";
  RecordProperty("max_abs_logit_diff", std::to_string(diff));
  // Sanity: the reference is not trivially uniform (the test would then prove little).
  auto w = want.to_f32_vector();
  float spread = 0;
  for (float x : w) spread = std::max(spread, std::abs(x));
  EXPECT_GT(spread, 1.0f);
}

INSTANTIATE_TEST_SUITE_P(Qwen3Moe, Parity,
                         ::testing::Values("qwen3_moe_a", "qwen3_moe_a_hub", "qwen3_moe_b", "qwen3_moe_aux"));
INSTANTIATE_TEST_SUITE_P(Families, Parity,
                         ::testing::Values("mixtral_a", "mixtral_a_v4", "mixtral_b", "qwen2_moe_a", "qwen2_moe_a_v4",
                                           "qwen2_moe_b", "olmoe_a", "olmoe_b", "llama_a", "llama_b", "llama_b_v4",
                                           "mistral_a", "mistral_b", "qwen2_a", "qwen2_b", "qwen3_a", "qwen3_b",
                                           "gpt_oss_a", "gpt_oss_b", "deepseek_v3_a", "deepseek_v3_b"));

}  // namespace

namespace {
INSTANTIATE_TEST_SUITE_P(NemotronH, Parity, ::testing::Values("nemotron_h_a", "nemotron_h_b"));
}  // namespace
