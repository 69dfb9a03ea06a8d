// The decoder families' fixtures' forward on the GPU (the one layer loop's forward over device-resident
// fp32 weights) against Transformers' logits (the fixtures' reference.safetensors): tight. Skipped
// without a GPU.
#include <gtest/gtest.h>

#include "core/error.h"
#include "device_run.h"
#include "hf/safetensors.h"
#include "gpu/fast_paths.h"
#include "hf/config.h"
#include "models/generate.h"
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

// Generation on the GPU (the same generation_step over device fp32 weights): greedy ids equal
// Transformers' generate (the fixtures' generate_reference.safetensors), and the cached steps'
// logits equal the GPU's whole-sequence forward at every position.
class CudaGenerate : public ::testing::TestWithParam<const char*> {};

TEST_P(CudaGenerate, GreedyMatchesTransformersAndTheCacheMatchesRecomputing) {
  if (!cuda::available()) GTEST_SKIP() << "no CUDA device on this machine";
  const std::string dir = test::fixture(GetParam());
  auto ref = hf::SafetensorsFile::open(dir + "/generate_reference.safetensors");
  auto loaded = models::from_pretrained(dir);
  gpu::DeviceParams dp(loaded.model->params(), gpu::Precision::FP32);
  const Tensor p = ref.get("prompt_ids").clone(), g = ref.get("generated_ids").clone();
  const std::vector<int64_t> prompt(p.i64(), p.i64() + p.numel()), want(g.i64(), g.i64() + g.numel());
  models::GenerateOptions o;
  o.max_new_tokens = static_cast<int64_t>(want.size());
  EXPECT_EQ(models::generate(*loaded.model, dp, prompt, o).ids, want) << GetParam();
  // The cache against recomputing, on the device: prompt + generated ids in pieces.
  std::vector<int64_t> seq = prompt;
  seq.insert(seq.end(), want.begin(), want.end());
  const int64_t s = static_cast<int64_t>(seq.size()), v = loaded.model->config().vocab_size;
  const Tensor full = test::on_device(*loaded.model, gpu::DeviceParams(loaded.model->params(), gpu::Precision::FP32))
                          ->forward_logits({Tensor::from_i64(seq, {1, s})})
                          .view({s, v});
  auto cache = loaded.model->start_generation(s);
  float worst = 0;
  for (int64_t at = 0, piece = 5; at < s; at += piece, piece = 1) {
    const std::vector<int64_t> part(seq.begin() + at, seq.begin() + std::min(s, at + piece));
    const Tensor got = loaded.model->generation_step(dp, part, *cache, /*all_positions=*/true);
    worst = std::max(worst, test::max_abs_diff(got, full.slice0(at, static_cast<int64_t>(part.size()))));
  }
  EXPECT_LT(worst, 1e-4f) << GetParam() << ": cached vs recomputed logits on the GPU";
}

INSTANTIATE_TEST_SUITE_P(Families, CudaGenerate,
                         ::testing::Values("qwen3_moe_a", "qwen3_moe_b", "mixtral_b", "qwen2_moe_a", "olmoe_a", "llama_a",
                                           "mistral_a", "qwen3_a", "gpt_oss_a", "gpt_oss_b", "deepseek_v3_a",
                                           "deepseek_v3_b", "nemotron_h_a", "nemotron_h_b"));

// Several sequences per step on the GPU (models::generate_many, continuous batching with a batch
// of 2 over 3 prompts): each prompt's greedy ids equal generate() on it alone on the device.
TEST_P(CudaGenerate, ManyPromptsPerStepEqualEachAlone) {
  if (!cuda::available()) GTEST_SKIP() << "no CUDA device on this machine";
  auto loaded = models::from_pretrained(test::fixture(GetParam()));
  gpu::DeviceParams dp(loaded.model->params(), gpu::Precision::FP32);
  const int64_t v = loaded.model->config().vocab_size;
  const std::vector<std::vector<int64_t>> prompts = {{3 % v, 1, 4 % v, 1, 5 % v}, {9 % v}, {2, 6 % v, 5 % v, 3 % v}};
  std::vector<models::GenerateOptions> opts(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) opts[i].max_new_tokens = 3 + static_cast<int64_t>(i);
  std::vector<std::vector<int64_t>> got(prompts.size());
  models::generate_many(*loaded.model, dp, prompts, opts, 2, {},
                        [&](size_t i, models::GenerateResult r) { got[i] = r.ids; });
  for (size_t i = 0; i < prompts.size(); ++i)
    EXPECT_EQ(got[i], models::generate(*loaded.model, dp, prompts[i], opts[i]).ids) << GetParam() << ", prompt " << i;
}

// The notes a GPU run prints at its start about slower paths (needs no device: they come from the
// build and the model's config).
TEST(CudaFastPaths, NotesNameTheFallbackAndTheFix) {
  const auto join = [](const std::vector<std::string>& v) {
    std::string s;
    for (const auto& x : v) s += x + "\n";
    return s;
  };
  const hf::ModelConfig q = hf::load_config(test::fixture("qwen3_moe_a")), m = hf::load_config(test::fixture("mistral_b"));
#ifdef MOEFORGE_HAVE_CUDNN
  EXPECT_EQ(join(gpu::fast_path_notes(q, /*bf16=*/true, /*packed=*/false)).find("attention"), std::string::npos);
  EXPECT_NE(join(gpu::fast_path_notes(q, false, false)).find("takes bf16"), std::string::npos);
  EXPECT_NE(join(gpu::fast_path_notes(m, true, false)).find("head dimension 12"), std::string::npos);
  EXPECT_NE(join(gpu::fast_path_notes(q, true, true)).find("packed documents"), std::string::npos);
#else
  EXPECT_NE(join(gpu::fast_path_notes(q, true, false)).find("no cuDNN"), std::string::npos);
#endif
#ifndef MOEFORGE_HAVE_CUTLASS
  EXPECT_NE(join(gpu::fast_path_notes(q, true, false)).find("no CUTLASS"), std::string::npos);
#endif
}
