// Generation: greedy tokens against Transformers' generate(do_sample=False) on every family's
// fixture (tools/make_fixtures.py --generate-cases), the cached step against the whole-prefix
// forward, and the sampling transforms (repetition penalty, temperature, top-k, top-p, seeds).
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <optional>
#include <random>

#include "hf/generation_config.h"
#include "hf/safetensors.h"
#include "models/generate.h"
#include "models/pretrained.h"
#include "test_util.h"

using namespace moeforge;

namespace {

std::vector<int64_t> ids_of(const Tensor& t) { return std::vector<int64_t>(t.i64(), t.i64() + t.numel()); }

class GenerateParity : public ::testing::TestWithParam<const char*> {};

// Greedy tokens equal Transformers', and each step's logits are within float rounding of its scores.
TEST_P(GenerateParity, GreedyMatchesTransformersGenerate) {
  const std::string dir = test::fixture(GetParam());
  auto ref = hf::SafetensorsFile::open(dir + "/generate_reference.safetensors");
  auto m = models::from_pretrained(dir);
  const auto prompt = ids_of(ref.get("prompt_ids").clone()), want = ids_of(ref.get("generated_ids").clone());
  const Tensor want_logits = ref.get("step_logits").clone();
  models::GenerateOptions o;
  o.max_new_tokens = static_cast<int64_t>(want.size());
  std::vector<std::vector<float>> step_logits;
  // The logits each step chose from, recorded through a second run of the same steps below.
  auto res = models::generate(*m.model, m.model->params(), prompt, o);
  EXPECT_EQ(res.ids, want);
  EXPECT_EQ(res.stop_reason, "length");
  // Step logits: the prompt's last, then each generated token's (the cache fed the tokens above).
  auto cache = m.model->start_generation(static_cast<int64_t>(prompt.size() + want.size()));
  Tensor logits = m.model->generation_step(m.model->params(), prompt, *cache);
  const int64_t v = m.model->config().vocab_size;
  float worst = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const Tensor row = want_logits.slice0(static_cast<int64_t>(i), 1).view({v});
    worst = std::max(worst, test::max_abs_diff(logits, row));
    if (i + 1 < want.size()) logits = m.model->generation_step(m.model->params(), {want[i]}, *cache);
  }
  EXPECT_LT(worst, 2e-4f) << "max |step logits - Transformers' scores|";
}

INSTANTIATE_TEST_SUITE_P(Families, GenerateParity,
                         ::testing::Values("qwen3_moe_a", "qwen3_moe_b", "qwen3_moe_aux", "mixtral_a", "mixtral_b",
                                           "qwen2_moe_a", "qwen2_moe_b", "olmoe_a", "olmoe_b", "llama_a", "llama_b",
                                           "mistral_a", "mistral_b", "qwen2_a", "qwen2_b", "qwen3_a", "qwen3_b",
                                           "gpt_oss_a", "gpt_oss_b", "deepseek_v3_a", "deepseek_v3_b",
                                           "deepseek_v3_mtp", "nemotron_h_a", "nemotron_h_b"));

// The cached path (prompt in pieces of uneven length, then single tokens) gives the logits the
// whole-sequence forward gives at every position: sliding windows, sinks, latent attention and
// the Mamba2 state all cross step boundaries here.
class CachedEqualsRecompute : public ::testing::TestWithParam<const char*> {};

TEST_P(CachedEqualsRecompute, EveryPosition) {
  const std::string dir = test::fixture(GetParam());
  auto m = models::from_pretrained(dir);
  const auto& cfg = m.model->config();
  const int64_t s = std::min<int64_t>(21, cfg.max_position_embeddings);
  std::mt19937 gen(7);
  std::vector<int64_t> seq(static_cast<size_t>(s));
  for (auto& id : seq) id = std::uniform_int_distribution<int64_t>(0, cfg.vocab_size - 1)(gen);
  const Tensor ids = Tensor::from_i64(seq, {1, s});
  const Tensor full = m.model->forward({ids}).logits.view({s, cfg.vocab_size});
  auto cache = m.model->start_generation(s);
  float worst = 0;
  int64_t at = 0;
  for (int64_t piece : {5, 3, 1, 1, 4, 1, 1, 1, 1, 1, 1, 1}) {
    piece = std::min(piece, s - at);
    if (piece == 0) break;
    const std::vector<int64_t> part(seq.begin() + at, seq.begin() + at + piece);
    const Tensor got = m.model->generation_step(m.model->params(), part, *cache, /*all_positions=*/true);
    worst = std::max(worst, test::max_abs_diff(got, full.slice0(at, piece)));
    at += piece;
  }
  EXPECT_EQ(at, s);
  EXPECT_LT(worst, 1e-4f) << "max |cached - recomputed logits|";
  EXPECT_NE(test::error_of([&] { m.model->generation_step(m.model->params(), {1}, *cache); }).find("exceed"),
            std::string::npos);
}

INSTANTIATE_TEST_SUITE_P(Families, CachedEqualsRecompute,
                         ::testing::Values("qwen3_moe_b", "mistral_b", "olmoe_a", "gpt_oss_a", "gpt_oss_b",
                                           "deepseek_v3_a", "deepseek_v3_b", "qwen2_moe_a", "nemotron_h_a",
                                           "nemotron_h_b"));

// Several sequences in one step (prompts of different lengths, then one token each, with a
// sequence joining midway as generate_many's continuous batching does) give each sequence the
// logits of its own steps alone: the per-sequence attention, latent attention, sliding windows,
// sinks and Mamba2 states never see another sequence's rows.
class BatchedGeneration : public ::testing::TestWithParam<const char*> {};

TEST_P(BatchedGeneration, EachSequenceAsAlone) {
  auto m = models::from_pretrained(test::fixture(GetParam()));
  const auto& cfg = m.model->config();
  auto& ps = m.model->params();
  std::mt19937 gen(11);
  auto random_ids = [&](size_t n) {
    std::vector<int64_t> v(n);
    for (auto& id : v) id = std::uniform_int_distribution<int64_t>(0, cfg.vocab_size - 1)(gen);
    return v;
  };
  // Sequence 2 starts at step 2, so steps mix a prompt with single tokens.
  const std::vector<std::vector<int64_t>> prompts = {random_ids(7), random_ids(2), random_ids(5)};
  const std::vector<size_t> start = {0, 0, 2};
  const size_t steps = 5, n = prompts.size();
  const int64_t capacity = 7 + static_cast<int64_t>(steps);
  std::vector<std::unique_ptr<models::GenerationCache>> batched, alone;
  for (size_t i = 0; i < n; ++i) {
    batched.push_back(m.model->start_generation(capacity));
    alone.push_back(m.model->start_generation(capacity));
  }
  std::vector<std::vector<int64_t>> next = prompts;  // each sequence's tokens for its next step
  float worst = 0;
  for (size_t step = 0; step < steps; ++step) {
    std::vector<std::vector<int64_t>> ids;
    std::vector<models::GenerationCache*> caches;
    std::vector<size_t> which;
    for (size_t i = 0; i < n; ++i)
      if (step >= start[i]) {
        ids.push_back(next[i]);
        caches.push_back(batched[i].get());
        which.push_back(i);
      }
    const Tensor got = m.model->generation_step_batch(ps, ids, caches);
    ASSERT_EQ(got.shape(), (Shape{static_cast<int64_t>(which.size()), cfg.vocab_size}));
    for (size_t b = 0; b < which.size(); ++b) {
      const size_t i = which[b];
      const Tensor want = m.model->generation_step(ps, next[i], *alone[i]);
      worst = std::max(worst, test::max_abs_diff(got.slice0(static_cast<int64_t>(b), 1).view({cfg.vocab_size}), want));
      next[i] = {(next[i].back() * 31 + static_cast<int64_t>(step)) % cfg.vocab_size};  // any next token
    }
  }
  EXPECT_LT(worst, 1e-4f) << "max |batched - alone logits| (the same math, other GEMM blockings)";
  EXPECT_EQ(batched[0]->length, 7 + static_cast<int64_t>(steps) - 1);
  EXPECT_EQ(batched[2]->length, alone[2]->length);
}

INSTANTIATE_TEST_SUITE_P(Families, BatchedGeneration,
                         ::testing::Values("qwen3_moe_b", "mistral_b", "gpt_oss_a", "deepseek_v3_b", "nemotron_h_a",
                                           "nemotron_h_b"));

// generate_many: each prompt's tokens and stop reason equal generate() on it alone, whatever the
// batch (continuous batching admits the later prompts as earlier ones end), with per-prompt options.
TEST(GenerateMany, EachPromptAsAloneWithAnyBatch) {
  auto m = models::from_pretrained(test::fixture("qwen3_moe_b"));
  auto& ps = m.model->params();
  const std::vector<std::vector<int64_t>> prompts = {{3, 1, 4, 1, 5}, {9}, {2, 6, 5, 3}, {5, 8, 9, 7, 9, 3}, {2, 3}};
  std::vector<models::GenerateOptions> opts(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) opts[i].max_new_tokens = 2 + static_cast<int64_t>(i) * 2;
  opts[1].sampling.sample = true;  // its own generator, seeded as alone
  opts[1].sampling.seed = 5;
  opts[3].max_new_tokens = 0;      // the prompt alone
  std::vector<models::GenerateResult> want;
  for (size_t i = 0; i < prompts.size(); ++i) want.push_back(models::generate(*m.model, ps, prompts[i], opts[i]));
  for (int64_t batch : {1, 2, 8}) {
    std::vector<std::optional<models::GenerateResult>> got(prompts.size());
    std::vector<std::vector<int64_t>> seen(prompts.size());
    models::generate_many(
        *m.model, ps, prompts, opts, batch,
        [&](size_t i, int64_t id) {
          seen[i].push_back(id);
          return true;
        },
        [&](size_t i, models::GenerateResult r) {
          EXPECT_FALSE(got[i]) << "prompt " << i << " finished twice";
          got[i] = std::move(r);
        });
    for (size_t i = 0; i < prompts.size(); ++i) {
      ASSERT_TRUE(got[i]) << "batch " << batch << ", prompt " << i;
      EXPECT_EQ(got[i]->ids, want[i].ids) << "batch " << batch << ", prompt " << i;
      EXPECT_EQ(got[i]->ids, seen[i]);
      EXPECT_EQ(got[i]->stop_reason, want[i].stop_reason);
    }
  }
  // A sequence that its callback stops ends there, the others go on.
  std::vector<size_t> lengths(prompts.size());
  models::generate_many(
      *m.model, ps, prompts, opts, 3, [&](size_t i, int64_t) { return i != 0; },
      [&](size_t i, models::GenerateResult r) {
        lengths[i] = r.ids.size();
        if (i == 0) EXPECT_EQ(r.stop_reason, "stopped");
      });
  EXPECT_EQ(lengths[0], 1u);
  EXPECT_EQ(lengths[4], want[4].ids.size());
  EXPECT_NE(test::error_of([&] { models::generate_many(*m.model, ps, prompts, opts, 0, {}, {}); }).find("at least one"),
            std::string::npos);
}

Tensor logits_of(const std::vector<float>& v) { return Tensor::from_vector(v, {static_cast<int64_t>(v.size())}); }

TEST(Sampling, GreedyTakesTheFirstLargestAndHonoursBans) {
  std::mt19937_64 rng(0);
  models::SamplingOptions o;
  EXPECT_EQ(models::next_token(logits_of({0.f, 3.f, 3.f, 1.f}), {}, o, rng), 1);
  EXPECT_EQ(models::next_token(logits_of({0.f, 3.f, 3.f, 1.f}), {}, o, rng, {1, 2}), 3);
}

TEST(Sampling, RepetitionPenaltyAsTransformers) {
  // Token 1 (seen) drops from 2.0 to 2.0/2 = 1.0 below token 0's 1.5; a negative seen logit is
  // multiplied instead (-1 * 2 = -2 < token 3's -1.5).
  std::mt19937_64 rng(0);
  models::SamplingOptions o;
  o.repetition_penalty = 2.0;
  EXPECT_EQ(models::next_token(logits_of({1.5f, 2.f, -9.f}), {1}, o, rng), 0);
  EXPECT_EQ(models::next_token(logits_of({-9.f, -9.f, -1.f, -1.5f}), {2}, o, rng), 3);
}

// Draw frequencies against the distribution the transforms should leave.
std::map<int64_t, double> frequencies(const std::vector<float>& l, const models::SamplingOptions& o, int n) {
  std::mt19937_64 rng(o.seed);
  std::map<int64_t, double> f;
  for (int i = 0; i < n; ++i) f[models::next_token(logits_of(l), {}, o, rng)] += 1.0 / n;
  return f;
}

TEST(Sampling, TemperatureTopKTopP) {
  const std::vector<float> l = {std::log(0.5f), std::log(0.3f), std::log(0.15f), std::log(0.05f)};
  models::SamplingOptions o;
  o.sample = true;
  o.seed = 11;
  auto f = frequencies(l, o, 40000);
  EXPECT_NEAR(f[0], 0.5, 0.01);
  EXPECT_NEAR(f[3], 0.05, 0.01);
  o.top_k = 2;  // renormalised over {0.5, 0.3}
  f = frequencies(l, o, 40000);
  EXPECT_NEAR(f[0], 0.625, 0.01);
  EXPECT_EQ(f.count(2) + f.count(3), 0u);
  o.top_k = 0;
  o.top_p = 0.8;  // ascending cumulative 0.05, 0.20, 0.50 <= 0.2 drops tokens 3 and 2; 0.5 + 0.3 kept
  f = frequencies(l, o, 40000);
  EXPECT_EQ(f.count(2) + f.count(3), 0u);
  EXPECT_NEAR(f[1], 0.375, 0.01);
  o.top_p = 1.0;
  o.temperature = 0.5;  // p^2 renormalised: 0.25, 0.09, 0.0225, 0.0025 over 0.365
  f = frequencies(l, o, 40000);
  EXPECT_NEAR(f[0], 0.25 / 0.365, 0.01);
  // The same seed draws the same tokens.
  EXPECT_EQ(frequencies(l, o, 500), frequencies(l, o, 500));
}

TEST(Generate, StopsAtEosAfterMinNewTokensAndWhenAsked) {
  auto m = models::from_pretrained(test::fixture("llama_a"));
  auto ref = hf::SafetensorsFile::open(test::fixture("llama_a") + "/generate_reference.safetensors");
  const auto prompt = ids_of(ref.get("prompt_ids").clone()), want = ids_of(ref.get("generated_ids").clone());
  models::GenerateOptions o;
  o.max_new_tokens = 12;
  o.eos_token_ids = {want[2]};
  auto res = models::generate(*m.model, m.model->params(), prompt, o);
  // The greedy sequence reaches want[2] at step 2 at the latest (earlier if it occurs earlier).
  const size_t first = std::find(want.begin(), want.end(), want[2]) - want.begin();
  EXPECT_EQ(res.stop_reason, "eos");
  EXPECT_EQ(res.ids, std::vector<int64_t>(want.begin(), want.begin() + first + 1));
  int seen = 0;
  o.eos_token_ids.clear();
  res = models::generate(*m.model, m.model->params(), prompt, o, [&](int64_t) { return ++seen < 4; });
  EXPECT_EQ(res.stop_reason, "stopped");
  EXPECT_EQ(res.ids.size(), 4u);
  o.min_new_tokens = 12;
  o.eos_token_ids = {want[0]};
  res = models::generate(*m.model, m.model->params(), prompt, o);
  EXPECT_EQ(res.ids.size(), 12u);  // the eos id is banned until the minimum
  EXPECT_EQ(std::count(res.ids.begin(), res.ids.end(), want[0]), 0);
}

TEST(Generate, BadInputsAreOneClearError) {
  auto m = models::from_pretrained(test::fixture("llama_a"));
  models::GenerateOptions o;
  EXPECT_NE(test::error_of([&] { models::generate(*m.model, m.model->params(), {}, o); }).find("no tokens"),
            std::string::npos);
  EXPECT_NE(test::error_of([&] { models::generate(*m.model, m.model->params(), {1, 100000}, o); })
                .find("outside the vocabulary"),
            std::string::npos);
  o.sampling.sample = true;
  o.sampling.temperature = 0;
  EXPECT_NE(test::error_of([&] { models::generate(*m.model, m.model->params(), {1}, o); }).find("temperature"),
            std::string::npos);
}

TEST(GenerationConfig, ReadsIdsAndDefaultsAndNamesBadFields) {
  test::TempDir dir;
  test::write_bytes((dir.path / "config.json").string(), R"({"eos_token_id": 7, "bos_token_id": 1})");
  auto g = hf::load_generation_config(dir.path.string());
  EXPECT_EQ(g.eos_token_ids, std::vector<int64_t>({7}));
  EXPECT_EQ(g.bos_token_id, 1);
  EXPECT_FALSE(g.do_sample);
  test::write_bytes((dir.path / "generation_config.json").string(),
                    R"({"eos_token_id": [3, 4], "do_sample": true, "temperature": 0.6, "top_p": 0.95, "top_k": 20})");
  g = hf::load_generation_config(dir.path.string());
  EXPECT_EQ(g.eos_token_ids, std::vector<int64_t>({3, 4}));
  EXPECT_EQ(g.bos_token_id, 1);  // from config.json
  EXPECT_TRUE(g.do_sample);
  EXPECT_DOUBLE_EQ(*g.temperature, 0.6);
  EXPECT_EQ(*g.top_k, 20);
  test::write_bytes((dir.path / "generation_config.json").string(), R"({"top_k": "many"})");
  const std::string e = test::error_of([&] { hf::load_generation_config(dir.path.string()); });
  EXPECT_NE(e.find("generation_config.json"), std::string::npos) << e;
  EXPECT_NE(e.find("top_k"), std::string::npos) << e;
}

// The caller's arguments over generation_config.json over Transformers' defaults, field by field.
TEST(GenerationConfig, ArgumentsOverTheFileOverTheDefaults) {
  hf::GenerationConfig file;
  models::GenerationRequest asked;
  auto o = models::resolve_generation(asked, file);  // nothing anywhere: Transformers' defaults
  EXPECT_EQ(o.max_new_tokens, 20);
  EXPECT_FALSE(o.sampling.sample);
  EXPECT_EQ(o.sampling.top_k, 50);
  EXPECT_DOUBLE_EQ(o.sampling.temperature, 1.0);
  EXPECT_DOUBLE_EQ(o.sampling.top_p, 1.0);
  EXPECT_DOUBLE_EQ(o.sampling.repetition_penalty, 1.0);
  EXPECT_TRUE(o.eos_token_ids.empty());
  file.do_sample = true;
  file.temperature = 0.6;
  file.top_k = 20;
  file.top_p = 0.95;
  file.repetition_penalty = 1.1;
  file.max_new_tokens = 64;
  file.eos_token_ids = {3, 4};
  asked.default_max_new_tokens = 256;
  o = models::resolve_generation(asked, file);  // the file's values
  EXPECT_EQ(o.max_new_tokens, 64);
  EXPECT_TRUE(o.sampling.sample);
  EXPECT_EQ(o.sampling.top_k, 20);
  EXPECT_DOUBLE_EQ(o.sampling.temperature, 0.6);
  EXPECT_DOUBLE_EQ(o.sampling.top_p, 0.95);
  EXPECT_DOUBLE_EQ(o.sampling.repetition_penalty, 1.1);
  EXPECT_EQ(o.eos_token_ids, std::vector<int64_t>({3, 4}));
  asked.do_sample = false;
  asked.temperature = 0.9;
  asked.top_k = 5;
  asked.max_new_tokens = 7;
  asked.eos_token_ids = std::vector<int64_t>{};
  asked.seed = 11;
  o = models::resolve_generation(asked, file);  // the arguments win, one by one
  EXPECT_EQ(o.max_new_tokens, 7);
  EXPECT_FALSE(o.sampling.sample);
  EXPECT_EQ(o.sampling.top_k, 5);
  EXPECT_DOUBLE_EQ(o.sampling.temperature, 0.9);
  EXPECT_DOUBLE_EQ(o.sampling.top_p, 0.95);
  EXPECT_TRUE(o.eos_token_ids.empty());
  EXPECT_EQ(o.sampling.seed, 11u);
  file.max_new_tokens.reset();
  asked.max_new_tokens.reset();
  EXPECT_EQ(models::resolve_generation(asked, file).max_new_tokens, 256);  // the caller's default
}

}  // namespace
