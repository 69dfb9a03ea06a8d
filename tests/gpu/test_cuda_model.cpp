// The decoder families' fixtures' forward on the GPU (the one layer loop's forward over device-resident
// fp32 weights) against Transformers' logits (the fixtures' reference.safetensors): tight. Skipped
// without a GPU.
#include <gtest/gtest.h>

#include "core/error.h"
#include "device_run.h"
#include "hf/safetensors.h"
#include "models/pretrained.h"
#include "ops/cuda/runtime.h"
#include "test_util.h"

using namespace moeforge;

class CudaModel : public ::testing::TestWithParam<const char*> {};

TEST_P(CudaModel, Fp32LogitsMatchTransformers) {
  if (!cuda::available()) GTEST_SKIP() << "no CUDA device on this machine";
  const std::string dir = test::fixture(GetParam());
  auto ref = hf::SafetensorsFile::open(dir + "/reference.safetensors");
  auto loaded = models::from_pretrained(dir);
  auto gm = test::on_device(*loaded.model, gpu::DeviceParams(loaded.model->params(), gpu::Precision::FP32));
  Tensor ids = ref.get("input_ids").clone();
  Tensor got = gm->forward_logits({ids});
  Tensor want = ref.get("logits");
  ASSERT_EQ(got.shape(), want.shape());
  const float diff = test::max_abs_diff(got, want);
  EXPECT_LT(diff, 1e-4f) << GetParam() << ": GPU fp32 logits vs Transformers";
  Tensor cpu = loaded.model->forward({ids}).logits;
  EXPECT_LT(test::max_abs_diff(got, cpu), 1e-4f) << "GPU vs CPU";
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaModel, ::testing::Values("qwen3_moe_a", "qwen3_moe_b", "qwen3_moe_aux"));
// mistral_b's head_dim 12 is not one the GPU attention kernels take (see below).
INSTANTIATE_TEST_SUITE_P(Families, CudaModel,
                         ::testing::Values("mixtral_a", "mixtral_b", "qwen2_moe_a", "qwen2_moe_b", "olmoe_a", "olmoe_b",
                                           "llama_a", "llama_b", "mistral_a", "qwen2_a", "qwen2_b", "qwen3_a", "qwen3_b",
                                           "gpt_oss_a", "gpt_oss_b", "deepseek_v3_a", "deepseek_v3_b"));
// Nemotron-H: the Mamba2 ops' first CUDA versions (ops/cuda/mamba.cu), attention without RoPE.
INSTANTIATE_TEST_SUITE_P(NemotronH, CudaModel, ::testing::Values("nemotron_h_a", "nemotron_h_b"));

TEST(CudaModelBadInput, UnsupportedHeadDimIsOneClearError) {
  if (!cuda::available()) GTEST_SKIP() << "no CUDA device on this machine";
  auto loaded = models::from_pretrained(test::fixture("mistral_b"));  // head_dim 12
  auto gm = test::on_device(*loaded.model, gpu::DeviceParams(loaded.model->params(), gpu::Precision::FP32));
  auto ref = hf::SafetensorsFile::open(test::fixture("mistral_b") + "/reference.safetensors");
  try {
    gm->forward_logits({ref.get("input_ids").clone()});
    FAIL() << "head_dim 12 ran on the GPU";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("head_dim 12 is not supported on the GPU"), std::string::npos) << e.what();
  }
}
