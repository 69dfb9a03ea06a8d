// LoRA against Transformers 5.17 + PEFT 0.21 (tools/make_fixtures.py --lora-cases: each fixture's
// lora/ folder holds PEFT's starting adapter, the logits and three training losses with it, and
// PEFT's adapter after three AdamW steps on the adapters alone): the same logits, losses and adapter
// weights; the frozen base untouched and without gradients; the adapter folder in PEFT's format;
// the recipe's errors; and LoRA runs through the trainer, checkpoints and resume.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "hf/safetensors.h"
#include "models/lora.h"
#include "models/pretrained.h"
#include "test_util.h"
#include "train/optimizer.h"
#include "train/recipe.h"
#include "train/trainer.h"

using namespace moeforge;
namespace fs = std::filesystem;

namespace {

// A fixture's model with PEFT's starting adapter applied.
models::LoadedModel with_peft_adapter(const std::string& name, models::LoraState* state = nullptr) {
  const std::string dir = test::fixture(name);
  auto m = models::from_pretrained(dir);
  models::LoraOptions o = models::read_adapter_config(dir + "/lora/adapter_init");
  o.init_adapter = dir + "/lora/adapter_init";
  const models::LoraState st = models::apply_lora(*m.model, o, 1, "test");
  if (state) *state = st;
  return m;
}

std::string peft_key(const std::string& param) { return "base_model.model." + param; }

}  // namespace

class LoraParity : public ::testing::TestWithParam<const char*> {};

TEST_P(LoraParity, LogitsWithTheAdapterMatchPeft) {
  auto ref = hf::SafetensorsFile::open(test::fixture(GetParam()) + "/lora/reference.safetensors");
  auto m = with_peft_adapter(GetParam());
  const Tensor want = ref.get("logits");
  const Tensor got = m.model->forward({ref.get("input_ids").clone()}).logits;
  float scale = 1.f;
  for (float v : want.to_f32_vector()) scale = std::max(scale, std::abs(v));
  EXPECT_LT(test::max_abs_diff(got.view(want.shape()), want), 1e-4f * scale);
  // The adapter changes the logits: without it they differ (B starts random in the fixture).
  auto base = models::from_pretrained(test::fixture(GetParam()));
  EXPECT_GT(test::max_abs_diff(base.model->forward({ref.get("input_ids").clone()}).logits.view(want.shape()), want),
            1e-3f);
}

TEST_P(LoraParity, ThreeAdamWStepsMatchPeftAndTheBaseStaysFrozen) {
  const std::string dir = test::fixture(GetParam());
  auto ref = hf::SafetensorsFile::open(dir + "/lora/reference.safetensors");
  auto m = with_peft_adapter(GetParam());
  auto& model = *m.model;
  const double lr = 1e-3;
  train::AdamW opt(model.params(), {lr, 0.9, 0.95, 1e-8, 0.1, true});
  Tensor ids = ref.get("input_ids").clone(), labels = ref.get("labels").clone();
  const std::vector<float> want_losses = ref.get("train_losses").to_f32_vector();
  auto& params = model.params().all();
  std::vector<std::vector<bool>> noisy(params.size());
  for (size_t i = 0; i < params.size(); ++i) noisy[i].assign(static_cast<size_t>(shape_numel(params[i].shape)), false);
  for (int step = 0; step < 3; ++step) {
    model.params().zero_grad();
    auto r = model.forward_backward({ids, &labels}, test::step_options(model, labels, false, 0.0));
    EXPECT_NEAR(test::reference_loss(model, r, 0.0), want_losses[step], 1e-5) << "step " << step;
    for (size_t i = 0; i < params.size(); ++i) {
      if (!params[i].lora) {  // frozen (or a buffer, as DeepSeek's correction bias, with a zero one)
        if (params[i].frozen) EXPECT_FALSE(params[i].grad.defined()) << params[i].name << ": a frozen weight got a gradient";
        continue;
      }
      test::note_noise(noisy[i], params[i].grad.to_f32_vector());
    }
    opt.step(lr);
  }
  // The adapters against PEFT's after three steps; the base bit for bit as loaded.
  auto after = hf::SafetensorsFile::open(dir + "/lora/adapter_after/adapter_model.safetensors");
  auto fresh = models::from_pretrained(dir);
  std::vector<nn::Param> got, want;
  std::vector<std::vector<bool>> got_noise;
  size_t frozen = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    if (!params[i].lora) {
      const nn::Param* base = fresh.model->params().find(params[i].name);
      ASSERT_NE(base, nullptr) << params[i].name;
      EXPECT_EQ(test::max_abs_diff(params[i].value, base->value), 0.f) << params[i].name;
      frozen += params[i].frozen;
      continue;
    }
    ASSERT_TRUE(after.contains(peft_key(params[i].name))) << params[i].name;
    got.push_back(params[i]);
    nn::Param w = params[i];
    w.value = after.get(peft_key(params[i].name)).clone();
    want.push_back(w);
    got_noise.push_back(noisy[i]);
  }
  EXPECT_GT(frozen, 10u);
  EXPECT_EQ(got.size(), after.entries().size());
  const auto [noisy_total, total] = test::weights_match(got, want, got_noise, 2 * 3 * lr / (1 - 0.9));
  EXPECT_LT(noisy_total, total / 100 + 1);
}

INSTANTIATE_TEST_SUITE_P(Families, LoraParity,
                         ::testing::Values("llama_a", "qwen3_moe_a", "deepseek_v3_a", "nemotron_h_a"));

TEST(Lora, AdapterFolderIsPeftsFormatAndReloads) {
  auto m = models::from_pretrained(test::fixture("llama_a"));
  models::LoraOptions o;
  o.rank = 2;
  o.alpha = 5;
  o.targets = {"all-linear"};
  const models::LoraState st = models::apply_lora(*m.model, o, 7, "test");
  EXPECT_EQ(st.modules.size(), 2u * 7u);  // two layers, seven projections each
  // PEFT's initialisation: A in +-1/sqrt(in) and not all zero, B zero.
  for (const auto& p : m.model->params().all()) {
    if (!p.lora) continue;
    const auto v = p.value.to_f32_vector();
    float amax = 0;
    for (float x : v) amax = std::max(amax, std::abs(x));
    if (p.name.ends_with("lora_B.weight")) EXPECT_EQ(amax, 0.f) << p.name;
    else EXPECT_TRUE(amax > 0.f && amax <= 1.f / std::sqrt(static_cast<float>(p.shape[1]))) << p.name;
  }
  for (auto& p : m.model->params().all())  // something to tell apart on reload
    if (p.lora) p.value = test::random_tensor(p.shape, 11);
  test::TempDir tmp;
  models::save_adapter(*m.model, st, "/models/base", tmp / "adapter", false);
  auto j = nlohmann::json::parse(test::read_text(tmp / "adapter/adapter_config.json"));
  EXPECT_EQ(j["peft_type"], "LORA");
  EXPECT_EQ(j["r"], 2);
  EXPECT_EQ(j["lora_alpha"], 5.0);
  EXPECT_EQ(j["base_model_name_or_path"], "/models/base");
  EXPECT_EQ(j["target_modules"], nlohmann::json({"down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"}));
  auto file = hf::SafetensorsFile::open(tmp / "adapter/adapter_model.safetensors");
  EXPECT_TRUE(file.contains("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
  EXPECT_TRUE(file.contains("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"));
  EXPECT_EQ(file.entries().size(), 2u * 14u);
  // Read back into a fresh model: the same values, the same options.
  auto again = models::from_pretrained(test::fixture("llama_a"));
  models::LoraOptions o2 = models::read_adapter_config(tmp / "adapter");
  EXPECT_EQ(o2.rank, 2);
  EXPECT_FLOAT_EQ(o2.scale(), 2.5f);
  o2.init_adapter = tmp / "adapter";
  models::apply_lora(*again.model, o2, 99, "test");
  for (const auto& p : m.model->params().all())
    if (p.lora) EXPECT_EQ(test::max_abs_diff(p.value, again.model->params().find(p.name)->value), 0.f) << p.name;
  // Writing over an existing folder needs overwrite.
  EXPECT_NE(test::error_of([&] { models::save_adapter(*m.model, st, "", tmp / "adapter", false); }).find("exists"),
            std::string::npos);
}

TEST(Lora, TargetsItCannotAdaptAreErrorsNamingTheKey) {
  const auto error_for = [](const char* fixture, std::vector<std::string> targets, double dropout = 0) {
    auto m = models::from_pretrained(test::fixture(fixture));
    models::LoraOptions o;
    o.targets = std::move(targets);
    o.dropout = dropout;
    return test::error_of([&] { models::apply_lora(*m.model, o, 1, "recipe.yaml"); });
  };
  // Experts where there are none; a partial set of the experts' projections.
  EXPECT_NE(error_for("llama_a", {"q_proj", "experts"}).find("'experts': llama has no routed experts"), std::string::npos);
  EXPECT_NE(error_for("qwen3_moe_a", {"gate_proj", "up_proj"}).find("takes all of their projections"),
            std::string::npos);
  EXPECT_NE(error_for("llama_a", {"q_proj", "qq_proj"}).find("'qq_proj' matches no projection"), std::string::npos);
  EXPECT_NE(error_for("nemotron_h_a", {"out_proj"}).find("PEFT refuses"), std::string::npos);
  EXPECT_NE(error_for("llama_a", {"q_proj"}, 1.0).find("peft.dropout"), std::string::npos);
  for (const char* f : {"qwen3_moe_a", "llama_a"})
    EXPECT_EQ(error_for(f, {"q_proj"}).rfind("recipe.yaml: ", 0), std::string::npos) << "no error expected";
}

TEST(Lora, ABrokenAdapterFolderIsAnErrorNamingTheFile) {
  test::TempDir tmp;
  fs::create_directories(tmp / "a");
  std::ofstream(tmp / "a/adapter_config.json") << R"({"peft_type": "LORA", "r": 0, "lora_alpha": 8, "target_modules": ["q_proj"]})";
  EXPECT_NE(test::error_of([&] { models::read_adapter_config(tmp / "a"); }).find("adapter_config.json: field 'r'"),
            std::string::npos);
  std::ofstream(tmp / "a/adapter_config.json") << R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})";
  auto m = models::from_pretrained(test::fixture("llama_a"));
  models::LoraOptions o = models::read_adapter_config(tmp / "a");
  o.init_adapter = tmp / "a";
  EXPECT_NE(test::error_of([&] { models::apply_lora(*m.model, o, 1, "t"); }).find("no adapter_model.safetensors"),
            std::string::npos);
  // An adapter of another rank than the model's targets.
  auto other = models::from_pretrained(test::fixture("llama_a"));
  o.rank = 3;
  o.init_adapter = test::fixture("llama_a") + "/lora/adapter_init";
  EXPECT_NE(test::error_of([&] { models::apply_lora(*other.model, o, 1, "t"); }).find("the model needs"),
            std::string::npos);
  // target_parameters that is not a list of names; a fused expert tensor of the wrong shape.
  for (const char* bad : {R"("mlp.experts.down_proj")", R"([1, 2])"}) {
    std::ofstream(tmp / "a/adapter_config.json")
        << R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": [], "target_parameters": )" << bad << "}";
    EXPECT_NE(test::error_of([&] { models::read_adapter_config(tmp / "a"); }).find("field 'target_parameters'"),
              std::string::npos) << bad;
  }
  auto gpt = models::from_pretrained(test::fixture("gpt_oss_a"));
  models::LoraOptions g = models::read_adapter_config(test::fixture("gpt_oss_a") + "/lora_experts/adapter_init");
  g.rank = 3;  // the file's tensors are rank 4
  g.init_adapter = test::fixture("gpt_oss_a") + "/lora_experts/adapter_init";
  const std::string e = test::error_of([&] { models::apply_lora(*gpt.model, g, 1, "t"); });
  EXPECT_NE(e.find("experts.base_layer.lora_A.weight' is [16, 32], the model needs [12, 32]"), std::string::npos) << e;
}

namespace {

const std::string kData = std::string(MOEFORGE_FIXTURES) + "/../data/arith64.jsonl";

// `peft`: the lines of the peft: block after its method.
std::string lora_recipe(const test::TempDir& dir, const std::string& extra = "", const std::string& model = "qwen3_moe_aux",
                        const std::string& peft = "  rank: 4\n  alpha: 8\n  target_modules: [q_proj, v_proj, o_proj]\n") {
  std::ofstream f(dir / "recipe.yaml");
  f << "model: " << test::fixture(model) << "\n"
    << "data: " << kData << "\n"
    << "output_dir: " << (dir / "out") << "\n"
    << "seq_len: 16\nmicro_batch: 2\nglobal_batch: 4\nsteps: 6\nlog_every: 1\nsave_every: 3\n"
    << "optimizer:\n  lr: 1.0e-2\nmax_grad_norm: 1.0\nseed: 3\n"
    << "peft:\n  method: lora\n" << peft << extra;
  return dir / "recipe.yaml";
}

}  // namespace

TEST(LoraTraining, WritesAPeftAdapterAndResumesBitExactly) {
  test::TempDir full, half;
  auto straight = train::run_training(train::load_recipe(lora_recipe(full), {}));
  ASSERT_EQ(straight.losses.size(), 6u);
  const fs::path final_dir = full / "out/final";
  EXPECT_TRUE(fs::exists(final_dir / "adapter_model.safetensors"));
  EXPECT_TRUE(fs::exists(final_dir / "adapter_config.json"));
  EXPECT_FALSE(fs::exists(final_dir / "model.safetensors"));  // the base is not copied
  // A checkpoint holds the adapter and the adapters' optimizer state only.
  const fs::path ck = full / "out/checkpoint-3";
  EXPECT_TRUE(fs::exists(ck / "adapter_model.safetensors"));
  auto part = hf::SafetensorsFile::open(ck / "training_state/part-00000-of-00001.safetensors");
  for (const auto& e : part.entries()) EXPECT_NE(e.name.find("lora_"), std::string::npos) << e.name;
  // Stop at 3, resume: the same losses.
  auto first = train::run_training(train::load_recipe(lora_recipe(half), {"steps=3"}));
  auto second = train::run_training(train::load_recipe(lora_recipe(half), {"resume=true"}));
  ASSERT_EQ(second.losses.size(), 3u);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(first.losses[i], straight.losses[i]) << i;
    EXPECT_EQ(second.losses[i], straight.losses[3 + i]) << 3 + i;
  }
  // The final adapter continues a run (peft.adapter) and is what the model then computes with.
  auto m = models::from_pretrained(test::fixture("qwen3_moe_aux"));
  models::LoraOptions o = models::read_adapter_config(final_dir.string());
  o.init_adapter = final_dir.string();
  models::apply_lora(*m.model, o, 1, "t");
  EXPECT_EQ(o.targets, (std::vector<std::string>{"o_proj", "q_proj", "v_proj"}));
}

// The experts alone, by PEFT's target_parameters in the recipe (GPT-OSS): trained, checkpointed
// and resumed bit for bit, the adapter folder naming them as PEFT does.
TEST(LoraTraining, FusedExpertAdaptersByTargetParametersResumeBitExactly) {
  const auto recipe = [](const test::TempDir& dir) {
    return lora_recipe(dir, "", "gpt_oss_a",
                       "  rank: 2\n  alpha: 4\n  target_modules: []\n"
                       "  target_parameters: [mlp.experts.gate_up_proj, mlp.experts.down_proj]\n");
  };
  test::TempDir full, half;
  const train::Recipe r = train::load_recipe(recipe(full), {"steps=4", "save_every=2"});
  EXPECT_NE(r.to_yaml().find("peft.target_parameters: [mlp.experts.gate_up_proj, mlp.experts.down_proj]"),
            std::string::npos);
  auto straight = train::run_training(r);
  ASSERT_EQ(straight.losses.size(), 4u);
  EXPECT_NE(straight.losses[0], straight.losses[3]);
  auto j = nlohmann::json::parse(test::read_text(full / "out/final/adapter_config.json"));
  EXPECT_EQ(j["target_modules"], nlohmann::json::array());
  EXPECT_EQ(j["target_parameters"], nlohmann::json({"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}));
  auto file = hf::SafetensorsFile::open(full / "out/final/adapter_model.safetensors");
  EXPECT_EQ(file.entries().size(), 4u * 2);  // two layers: gate_up (as base_layer) and down, A and B
  EXPECT_TRUE(file.contains("base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"));
  auto first = train::run_training(train::load_recipe(recipe(half), {"steps=2", "save_every=2"}));
  auto second = train::run_training(train::load_recipe(recipe(half), {"steps=4", "save_every=2", "resume=true"}));
  ASSERT_EQ(second.losses.size(), 2u);
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(first.losses[i], straight.losses[i]) << i;
    EXPECT_EQ(second.losses[i], straight.losses[2 + i]) << 2 + i;
  }
}

TEST(LoraTraining, RecipeKeysAreChecked) {
  test::TempDir d;
  const auto error_with = [&](const std::string& extra) {
    return test::error_of([&] { train::load_recipe(lora_recipe(d, extra), {}); });
  };
  EXPECT_NE(test::error_of([&] { train::load_recipe(lora_recipe(d), {"peft.method=qlora"}); }).find("peft.method"),
            std::string::npos);
  EXPECT_NE(test::error_of([&] { train::load_recipe(lora_recipe(d), {"peft.rank=0"}); }).find("peft.rank"),
            std::string::npos);
  EXPECT_NE(test::error_of([&] { train::load_recipe(lora_recipe(d), {"peft.dropout=1.5"}); }).find("peft.dropout"),
            std::string::npos);
  EXPECT_NE(error_with("mtp_loss_scale: 0.1\n").find("mtp_loss_scale"), std::string::npos);
  const train::Recipe r = train::load_recipe(lora_recipe(d), {});
  EXPECT_EQ(r.peft_method, "lora");
  EXPECT_EQ(r.lora.targets, (std::vector<std::string>{"q_proj", "v_proj", "o_proj"}));
  EXPECT_NE(r.to_yaml().find("peft.target_modules: [q_proj, v_proj, o_proj]"), std::string::npos);
}

// LoRA on the routed experts (qwen3_moe_a's lora_experts/: a per-expert adapter as PEFT and vLLM
// name it, loaded by PEFT into Transformers 5's fused experts; trained there with B's off-diagonal
// blocks held at zero, i.e. per expert and projection, as moeforge trains it).
TEST(LoraExperts, PerExpertAdapterMatchesPeftLogitsAndThreeAdamWSteps) {
  const std::string dir = test::fixture("qwen3_moe_a"), lora_dir = dir + "/lora_experts";
  auto ref = hf::SafetensorsFile::open(lora_dir + "/reference.safetensors");
  auto m = models::from_pretrained(dir);
  const models::LoraState st = models::apply_adapter_folder(*m.model, lora_dir + "/adapter_init");
  auto& model = *m.model;
  int fused = 0;
  for (const auto& p : model.params().all()) fused += p.lora && p.shape.size() == 3;
  EXPECT_EQ(fused, 4 * 2);  // gate_up A, B and down A, B in each of the two MoE layers
  const Tensor want = ref.get("logits");
  float scale = 1.f;
  for (float v : want.to_f32_vector()) scale = std::max(scale, std::abs(v));
  EXPECT_LT(test::max_abs_diff(model.forward({ref.get("input_ids").clone()}).logits.view(want.shape()), want),
            1e-4f * scale);
  const double lr = 1e-3;
  train::AdamW opt(model.params(), {lr, 0.9, 0.95, 1e-8, 0.1, true});
  Tensor ids = ref.get("input_ids").clone(), labels = ref.get("labels").clone();
  const std::vector<float> want_losses = ref.get("train_losses").to_f32_vector();
  for (int step = 0; step < 3; ++step) {
    model.params().zero_grad();
    auto r = model.forward_backward({ids, &labels}, test::step_options(model, labels, false, 0.0));
    EXPECT_NEAR(test::reference_loss(model, r, 0.0), want_losses[step], 1e-5) << "step " << step;
    opt.step(lr);
  }
  // gate|up's B stayed block-diagonal.
  for (const auto& p : model.params().all()) {
    if (!p.lora || p.shape.size() != 3 || !p.name.ends_with("gate_up_proj.lora_B.weight")) continue;
    const int64_t n = p.shape[1] / 2, r = p.shape[2] / 2;
    for (int64_t x = 0; x < p.shape[0]; ++x)
      for (int64_t i = 0; i < p.shape[1]; ++i)
        for (int64_t j = 0; j < p.shape[2]; ++j)
          if (i / n != j / r) ASSERT_EQ(p.value.f32()[(x * p.shape[1] + i) * p.shape[2] + j], 0.f) << p.name;
  }
  // Written per expert, every tensor against PEFT's after three steps: within 1e-5 of its largest,
  // or (at most 1% of them, gradients at fp32 noise level that Adam turns into full steps) within
  // the Adam step bound.
  test::TempDir tmp;
  models::save_adapter(model, st, dir, tmp / "after", false);
  test::expect_adapters_match(tmp / "after/adapter_model.safetensors",
                              lora_dir + "/adapter_after/adapter_model.safetensors", 2 * 3 * lr / (1 - 0.9));
  auto j = nlohmann::json::parse(test::read_text(tmp / "after/adapter_config.json"));
  EXPECT_EQ(j["target_modules"], nlohmann::json({"down_proj", "gate_proj", "q_proj", "up_proj"}));
  // Merged into the experts' weights, the model computes what it did with the adapters beside them.
  const Tensor before = model.forward({ids}).logits;
  models::merge_lora(model, st);
  EXPECT_LT(test::max_abs_diff(model.forward({ids}).logits, before), 1e-4f * scale);
}

// LoRA on the routed experts of the families PEFT has no per-expert mapping for: one adapter per
// fused 3-D expert weight (PEFT's target_parameters; the fixtures' lora_experts/ trained and saved by
// PEFT itself): GPT-OSS's transposed, interleaved gate_up with biases, Qwen2-MoE's gate|up beside a
// shared expert, Nemotron-H's ungated relu^2 experts.
class FusedExpertLora : public ::testing::TestWithParam<const char*> {};

TEST_P(FusedExpertLora, MatchesPeftLogitsThreeAdamWStepsAndWritesPeftsKeys) {
  const std::string dir = test::fixture(GetParam()), lora_dir = dir + "/lora_experts";
  auto ref = hf::SafetensorsFile::open(lora_dir + "/reference.safetensors");
  auto m = models::from_pretrained(dir);
  const models::LoraState st = models::apply_adapter_folder(*m.model, lora_dir + "/adapter_init");
  auto& model = *m.model;
  int fused = 0;
  for (const auto& p : model.params().all()) fused += p.lora && p.shape.size() == 3;
  EXPECT_GE(fused, 4);  // gate_up A, B and down A, B in every MoE layer
  EXPECT_EQ(fused % 4, 0);
  const Tensor want = ref.get("logits");
  float scale = 1.f;
  for (float v : want.to_f32_vector()) scale = std::max(scale, std::abs(v));
  Tensor ids = ref.get("input_ids").clone(), labels = ref.get("labels").clone();
  EXPECT_LT(test::max_abs_diff(model.forward({ids}).logits.view(want.shape()), want), 1e-4f * scale);
  {  // the experts' adapters matter: without them (q_proj's kept) the logits differ
    auto q_only = models::from_pretrained(dir);
    models::LoraOptions o = models::read_adapter_config(lora_dir + "/adapter_init");
    EXPECT_EQ(o.targets, std::vector<std::string>{"q_proj"});
    EXPECT_EQ(o.target_parameters.size(), 2u);
    o.target_parameters.clear();
    models::apply_lora(*q_only.model, o, 1, "test");
    for (auto& p : q_only.model->params().all())
      if (p.lora) p.value = model.params().find(p.name)->value.clone();
    EXPECT_GT(test::max_abs_diff(q_only.model->forward({ids}).logits.view(want.shape()), want), 1e-3f);
  }
  const double lr = 1e-3;
  train::AdamW opt(model.params(), {lr, 0.9, 0.95, 1e-8, 0.1, true});
  const std::vector<float> want_losses = ref.get("train_losses").to_f32_vector();
  for (int step = 0; step < 3; ++step) {
    model.params().zero_grad();
    auto r = model.forward_backward({ids, &labels}, test::step_options(model, labels, false, 0.0));
    EXPECT_NEAR(test::reference_loss(model, r, 0.0), want_losses[step], 1e-5) << "step " << step;
    for (const auto& p : model.params().all())
      if (p.frozen) EXPECT_FALSE(p.grad.defined()) << p.name << ": a frozen weight got a gradient";
    opt.step(lr);
  }
  // Written in PEFT's own keys and layout (the same set of tensors as PEFT saved), each within 1e-5
  // of its largest or (at most 1%) the Adam step bound.
  test::TempDir tmp;
  models::save_adapter(model, st, dir, tmp / "after", false);
  test::expect_adapters_match(tmp / "after/adapter_model.safetensors",
                              lora_dir + "/adapter_after/adapter_model.safetensors", 2 * 3 * lr / (1 - 0.9));
  auto j = nlohmann::json::parse(test::read_text(tmp / "after/adapter_config.json"));
  auto peft = nlohmann::json::parse(test::read_text(lora_dir + "/adapter_after/adapter_config.json"));
  EXPECT_EQ(j["target_modules"], nlohmann::json({"q_proj"}));
  EXPECT_EQ(j["target_parameters"], peft["target_parameters"]);
  // Read back, the same model; merged into the experts' weights, the same function.
  auto again = models::from_pretrained(dir);
  models::apply_adapter_folder(*again.model, tmp / "after");
  const Tensor before = model.forward({ids}).logits;
  EXPECT_EQ(test::max_abs_diff(again.model->forward({ids}).logits, before), 0.f);
  models::merge_lora(model, st);
  EXPECT_LT(test::max_abs_diff(model.forward({ids}).logits, before), 1e-4f * scale);
}

INSTANTIATE_TEST_SUITE_P(Families, FusedExpertLora, ::testing::Values("gpt_oss_a", "qwen2_moe_a", "nemotron_h_a"));

TEST(FusedExpertLora, TargetParametersAreChecked) {
  const auto error_for = [](const char* fixture, std::vector<std::string> params, std::vector<std::string> targets = {"q_proj"}) {
    auto m = models::from_pretrained(test::fixture(fixture));
    models::LoraOptions o;
    o.targets = std::move(targets);
    o.target_parameters = std::move(params);
    return test::error_of([&] { models::apply_lora(*m.model, o, 1, "recipe.yaml"); });
  };
  EXPECT_NE(error_for("gpt_oss_a", {"mlp.experts.gate_up_proj"}).find("takes both of their weights"), std::string::npos);
  EXPECT_NE(error_for("gpt_oss_a", {"mlp.experts.gate_proj", "mlp.experts.down_proj"}).find("'mlp.experts.gate_proj' names none"),
            std::string::npos);
  EXPECT_NE(error_for("qwen3_moe_a", {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}).find("per-expert adapters"),
            std::string::npos);
  EXPECT_NE(error_for("llama_a", {"mlp.experts.down_proj"}).find("has no routed experts"), std::string::npos);
  EXPECT_NE(error_for("gpt_oss_a", {}, {}).find("is empty"), std::string::npos);
  // "experts" and the parameters' short names mean the same; the experts alone are enough.
  for (const auto& [params, targets] : std::vector<std::pair<std::vector<std::string>, std::vector<std::string>>>{
           {{}, {"q_proj", "experts"}}, {{"gate_up_proj", "down_proj"}, {}}}) {
    auto m = models::from_pretrained(test::fixture("gpt_oss_a"));
    models::LoraOptions o;
    o.targets = targets;
    o.target_parameters = params;
    const models::LoraState st = models::apply_lora(*m.model, o, 1, "recipe.yaml");
    EXPECT_EQ(st.written_parameters, (std::vector<std::string>{"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}));
  }
}

// LoRA dropout (PEFT's lora_dropout on the adapter's input): active only inside a training step with
// a seed; the same seed gives the same mask (forward, recomputation and backward agree), and the
// gradients are those of the dropped-out function (finite differences).
TEST(LoraDropout, OnlyInTrainingStepsAndItsGradientsAreTheMaskedFunctions) {
  auto m = models::from_pretrained(test::fixture("llama_a"));
  auto plain = models::from_pretrained(test::fixture("llama_a"));
  models::LoraOptions o;
  o.rank = 2;
  o.alpha = 4;
  o.dropout = 0.5;
  o.targets = {"q_proj", "v_proj", "down_proj"};
  models::apply_lora(*m.model, o, 3, "t");
  models::LoraOptions o0 = o;
  o0.dropout = 0;
  models::apply_lora(*plain.model, o0, 3, "t");
  for (auto* model : {m.model.get(), plain.model.get()})  // the same non-zero adapters in both
    for (auto& p : model->params().all())
      if (p.lora) p.value = test::random_tensor(p.shape, 5, 0.3f);
  auto ref = hf::SafetensorsFile::open(test::fixture("llama_a") + "/reference.safetensors");
  Tensor ids = ref.get("input_ids").clone(), labels = ref.get("labels").clone();
  // Inference: no dropout.
  EXPECT_EQ(test::max_abs_diff(m.model->forward({ids}).logits, plain.model->forward({ids}).logits), 0.f);
  models::TrainStepOptions so = test::step_options(*m.model, labels, false, 0.0);
  const auto loss = [&](std::optional<uint64_t> seed, bool keep_grads = false) {
    so.lora_dropout_seed = seed;
    if (!keep_grads) m.model->params().zero_grad();
    return m.model->forward_backward({ids, &labels}, so).ce_sum;
  };
  so.lora_dropout_seed = std::nullopt;
  const double none = plain.model->forward_backward({ids, &labels}, so).ce_sum;
  EXPECT_DOUBLE_EQ(loss(std::nullopt), none);
  const double a = loss(11), b = loss(11), c = loss(12);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, none);
  EXPECT_NE(a, c);
  // Activation checkpointing recomputes the layers under the same mask: the same step.
  so.activation_checkpointing = true;
  EXPECT_EQ(loss(11), a);
  so.activation_checkpointing = false;
  // d(loss)/d(adapter) by central differences on a few elements of each adapter, seed 11.
  loss(11);
  std::vector<std::pair<size_t, Tensor>> grads;
  for (size_t i = 0; i < m.model->params().all().size(); ++i)
    if (m.model->params().all()[i].lora) grads.emplace_back(i, m.model->params().all()[i].grad.clone());
  int checked = 0;
  for (const auto& [i, g] : grads) {
    auto& p = m.model->params().all()[i];
    for (int64_t e : {int64_t{0}, p.value.numel() / 2, p.value.numel() - 1}) {
      const float keep = p.value.f32()[e], h = 1e-2f;
      p.value.f32()[e] = keep + h;
      const double up = loss(11);
      p.value.f32()[e] = keep - h;
      const double down = loss(11);
      p.value.f32()[e] = keep;
      const double fd = so.ce_scale * (up - down) / (2 * h), an = g.f32()[e];  // the step's loss is ce_scale * ce_sum
      EXPECT_NEAR(an, fd, 2e-3 + 2e-2 * std::abs(fd)) << p.name << "[" << e << "]";
      ++checked;
    }
  }
  EXPECT_EQ(checked, 3 * 2 * 3 * 2);  // 3 elements of A and B of q, v and down in both layers
}

TEST(LoraDropout, WithTheExpertsTargetedIsAnError) {
  auto m = models::from_pretrained(test::fixture("qwen3_moe_a"));
  models::LoraOptions o;
  o.dropout = 0.1;
  o.targets = {"q_proj", "experts"};
  EXPECT_NE(test::error_of([&] { models::apply_lora(*m.model, o, 1, "r.yaml"); }).find("no dropout"), std::string::npos);
}
