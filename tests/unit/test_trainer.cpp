// The trainer end to end on the CPU: exact resume, gradient accumulation, schedules, clipping,
// metrics, checkpoints, and every kind of bad recipe, with one error naming the key.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "core/error.h"
#include "hf/safetensors.h"
#include "models/pretrained.h"
#include "ops/cuda/runtime.h"
#include "test_util.h"
#include "data/model_text.h"
#include "data/token_batches.h"
#include "models/pretrained.h"
#include "train/checkpoint.h"
#include "train/gradients.h"
#include "train/optimizer.h"
#include "train/trainer.h"

using namespace moeforge;
namespace fs = std::filesystem;

namespace {

// Arithmetic progressions modulo 64 (tools/make_demo_data.py --vocab 64 --rows 64 --len 20 --seed 5).
const std::string kData = std::string(MOEFORGE_FIXTURES) + "/../data/arith64.jsonl";

std::string write_recipe(const test::TempDir& dir, const std::string& extra = "") {
  std::ofstream f(dir / "recipe.yaml");
  f << "model: " << test::fixture("qwen3_moe_aux") << "\n"
    << "data: " << kData << "\n"
    << "output_dir: " << (dir / "out") << "\n"
    << "seq_len: 16\nmicro_batch: 2\nglobal_batch: 4\nsteps: 6\nlog_every: 1\nsave_every: 3\n"
    << "optimizer:\n  lr: 2.0e-3\n  weight_decay: 0.1\nschedule:\n  type: cosine\n  warmup_steps: 2\n"
    << "max_grad_norm: 0.5\nseed: 3\n"
    << extra;
  return dir / "recipe.yaml";
}

// The parameters and AdamW moments of two one-process checkpoints (one part each), bit for bit.
void expect_same_params(const std::string& a, const std::string& b) {
  auto x = hf::SafetensorsFile::open(a + "/training_state/part-00000-of-00001.safetensors");
  auto y = hf::SafetensorsFile::open(b + "/training_state/part-00000-of-00001.safetensors");
  ASSERT_EQ(x.entries().size(), y.entries().size());
  for (const auto& e : x.entries()) {
    Tensor p = x.get(e.name), q = y.get(e.name);
    ASSERT_EQ(0, std::memcmp(p.raw(), q.raw(), p.nbytes())) << e.name;
  }
}

}  // namespace

TEST(Trainer, ResumeIsBitExact) {
  test::TempDir full, half;
  auto straight = train::run_training(train::load_recipe(write_recipe(full), {}));
  ASSERT_EQ(straight.losses.size(), 6u);
  // N steps, stop, resume, N more.
  auto first = train::run_training(train::load_recipe(write_recipe(half), {"steps=3"}));
  ASSERT_EQ(first.losses.size(), 3u);
  auto second = train::run_training(train::load_recipe(write_recipe(half), {"resume=true"}));
  ASSERT_EQ(second.losses.size(), 3u);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(first.losses[i], straight.losses[i]) << i;
    EXPECT_EQ(second.losses[i], straight.losses[3 + i]) << 3 + i;
  }
  expect_same_params(full / "out/checkpoint-6", half / "out/checkpoint-6");
  // metrics.jsonl has each step once, in order, after the resume too.
  std::ifstream m(half / "out/metrics.jsonl");
  std::string line;
  int64_t expect = 1;
  while (std::getline(m, line)) EXPECT_EQ(nlohmann::json::parse(line)["step"], expect++);
  EXPECT_EQ(expect, 7);
}

// A checkpoint of format 1 (training_state/params.safetensors + optimizer.safetensors, written
// before checkpoints came in parts) still resumes, bit-exactly: format 2's part rewritten as the
// two format-1 files gives the same continuation.
TEST(Trainer, Format1CheckpointsStillResume) {
  test::TempDir full, half;
  auto straight = train::run_training(train::load_recipe(write_recipe(full), {}));
  train::run_training(train::load_recipe(write_recipe(half), {"steps=3", "save_every=3"}));
  const fs::path state = half / "out/checkpoint-3/training_state";
  auto part = hf::SafetensorsFile::open((state / "part-00000-of-00001.safetensors").string());
  hf::NamedTensors params, moments;
  for (const auto& e : part.entries()) {
    if (e.name.rfind("param.", 0) == 0) params.emplace_back(e.name.substr(6), part.get(e.name).clone());
    else moments.emplace_back(e.name, part.get(e.name).clone());
  }
  hf::save_safetensors((state / "params.safetensors").string(), params);
  hf::save_safetensors((state / "optimizer.safetensors").string(), moments);
  fs::remove(state / "part-00000-of-00001.safetensors");
  auto j = nlohmann::json::parse(test::read_text((state / "trainer_state.json").string()));
  j.erase("parts");
  j.erase("experts");
  j["format"] = 1;
  std::ofstream((state / "trainer_state.json").string()) << j.dump(2);
  auto resumed = train::run_training(train::load_recipe(
      write_recipe(half), {"resume=" + (half / "out/checkpoint-3"), "output_dir=" + (half / "again")}));
  ASSERT_EQ(resumed.losses.size(), 3u);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(resumed.losses[i], straight.losses[3 + i]) << 3 + i;
}

TEST(Trainer, AccumulationMatchesOneBigBatch) {
  test::TempDir a, b;
  auto acc = train::run_training(train::load_recipe(write_recipe(a), {"steps=2", "micro_batch=1"}));
  auto big = train::run_training(train::load_recipe(write_recipe(b), {"steps=2", "micro_batch=4"}));
  // Same rows and the same token-weighted loss; only summation order differs. (The aux loss is a
  // per-micro-batch statistic, so compare on the cross-entropy model.)
  test::TempDir c, d;
  auto acc2 = train::run_training(
      train::load_recipe(write_recipe(c), {"steps=2", "micro_batch=1", "model=" + test::fixture("qwen3_moe_a")}));
  auto big2 = train::run_training(
      train::load_recipe(write_recipe(d), {"steps=2", "micro_batch=4", "model=" + test::fixture("qwen3_moe_a")}));
  for (int i = 0; i < 2; ++i) EXPECT_NEAR(acc2.losses[i], big2.losses[i], 1e-5) << i;
  EXPECT_EQ(acc.losses.size(), big.losses.size());
}

// optimizer_in_backward applies each layer's AdamW update as soon as its gradients are complete:
// with no clipping and no accumulation that is the same update, bit for bit, and the logged
// gradient norm (summed layer by layer) is the whole model's. With activation checkpointing too
// (a recomputed layer reads only its own weights, not yet updated).
TEST(Trainer, OptimizerInBackwardIsTheSameUpdate) {
  for (const char* ckpt : {"false", "true"}) {
    test::TempDir a, b;
    const std::vector<std::string> common = {"steps=3", "micro_batch=2", "global_batch=2", "max_grad_norm=0",
                                             std::string("activation_checkpointing=") + ckpt};
    auto after = train::run_training(train::load_recipe(write_recipe(a), common));
    std::vector<std::string> in_bwd = common;
    in_bwd.push_back("optimizer_in_backward=true");
    auto during = train::run_training(train::load_recipe(write_recipe(b), in_bwd));
    ASSERT_EQ(after.losses.size(), 3u);
    ASSERT_EQ(during.losses.size(), 3u);
    for (int i = 0; i < 3; ++i) EXPECT_EQ(after.losses[i], during.losses[i]) << "checkpointing " << ckpt << " step " << i;
    expect_same_params(a / "out/checkpoint-3", b / "out/checkpoint-3");
    std::ifstream ma(a / "out/metrics.jsonl"), mb(b / "out/metrics.jsonl");
    std::string la, lb;
    int lines = 0;
    while (std::getline(ma, la) && std::getline(mb, lb)) {
      const double na = nlohmann::json::parse(la)["grad_norm"], nb = nlohmann::json::parse(lb)["grad_norm"];
      EXPECT_GT(na, 0);
      EXPECT_NEAR(na, nb, 1e-9 * na) << la << "\n" << lb;
      ++lines;
    }
    EXPECT_EQ(lines, 3);
  }
}

TEST(Trainer, FinalFolderIsAStandardCheckpointAndMetricsAreWritten) {
  test::TempDir dir;
  auto r = train::run_training(train::load_recipe(write_recipe(dir), {}));
  auto final_model = models::from_pretrained(r.final_dir);
  auto src = hf::SafetensorsCheckpoint::open(test::fixture("qwen3_moe_aux"));
  auto out = hf::SafetensorsCheckpoint::open(r.final_dir);
  EXPECT_EQ(src.names(), out.names());
  // save_total_limit=2 keeps the last two checkpoints.
  auto cks = train::list_checkpoints(dir / "out");
  ASSERT_EQ(cks.size(), 2u);
  EXPECT_EQ(fs::path(cks[1]).filename(), "checkpoint-6");
  std::ifstream m(dir / "out/metrics.jsonl");
  std::string line;
  std::getline(m, line);
  auto j = nlohmann::json::parse(line);
  for (const char* k : {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "aux_loss"})
    EXPECT_TRUE(j.contains(k)) << k;
  EXPECT_EQ(j["lr"], 0.0);  // first warmup step, as Transformers' schedules
  EXPECT_LE(j["grad_norm"].get<double>(), 1e6);
}

// DeepSeek-V3's multi-token prediction layers: trained when mtp_loss_scale > 0, frozen otherwise,
// and saved back under the checkpoint's names either way (with the shared embedding and head
// copies written from the main model's).
TEST(Trainer, MultiTokenPredictionLayersTrainOnRequestAndAreSavedBack) {
  const std::string src_dir = test::fixture("deepseek_v3_mtp");
  auto src = hf::SafetensorsCheckpoint::open(src_dir);
  const std::string eh = "model.layers.2.eh_proj.weight";
  for (const double scale : {0.3, 0.0}) {
    test::TempDir dir;
    auto r = train::run_training(train::load_recipe(
        write_recipe(dir), {"model=" + src_dir, "steps=2", "mtp_loss_scale=" + std::to_string(scale)}));
    auto out = hf::SafetensorsCheckpoint::open(r.final_dir);
    EXPECT_EQ(src.names(), out.names());
    EXPECT_EQ(test::max_abs_diff(out.get("model.layers.3.embed_tokens.weight"), out.get("model.embed_tokens.weight")), 0.f);
    EXPECT_EQ(test::max_abs_diff(out.get("model.layers.2.shared_head.head.weight"), out.get("lm_head.weight")), 0.f);
    const float moved = test::max_abs_diff(out.get(eh), src.get(eh));
    std::ifstream m(dir / "out/metrics.jsonl");
    std::string line;
    std::getline(m, line);
    const auto j = nlohmann::json::parse(line);
    if (scale > 0) {
      EXPECT_GT(moved, 0.f);
      ASSERT_TRUE(j.contains("mtp_loss"));
      EXPECT_GT(j["mtp_loss"].get<double>(), 0.0);
    } else {
      EXPECT_EQ(moved, 0.f);
      EXPECT_FALSE(j.contains("mtp_loss"));
    }
  }
  test::TempDir bad;
  const std::string e = test::error_of([&] {
    train::run_training(train::load_recipe(write_recipe(bad), {"mtp_loss_scale=0.1"}));
  });
  EXPECT_NE(e.find("mtp_loss_scale"), std::string::npos) << e;
  EXPECT_NE(e.find("no multi-token prediction layers"), std::string::npos) << e;
}

// Nemotron-H end to end: packed rows (the Mamba2 state restarting per document), a checkpoint in the
// middle, a bit-exact resume, and a final folder in the checkpoint's own names (backbone.*).
TEST(Trainer, NemotronHTrainsPackedAndResumesExactly) {
  const std::vector<std::string> o = {"model=" + test::fixture("nemotron_h_b"), "packing=true", "steps=4"};
  test::TempDir full, half;
  auto straight = train::run_training(train::load_recipe(write_recipe(full), o));
  ASSERT_EQ(straight.losses.size(), 4u);
  std::vector<std::string> first = o;
  first.back() = "steps=2";
  train::run_training(train::load_recipe(write_recipe(half), first));
  std::vector<std::string> rest = o;
  rest.push_back("resume=true");
  auto second = train::run_training(train::load_recipe(write_recipe(half), rest));
  ASSERT_EQ(second.losses.size(), 2u);
  EXPECT_EQ(second.losses[1], straight.losses[3]);
  expect_same_params(full / "out/checkpoint-4", half / "out/checkpoint-4");
  auto src = hf::SafetensorsCheckpoint::open(test::fixture("nemotron_h_b"));
  auto out = hf::SafetensorsCheckpoint::open(straight.final_dir);
  EXPECT_EQ(src.names(), out.names());
  EXPECT_GT(test::max_abs_diff(out.get("backbone.layers.0.mixer.A_log"), src.get("backbone.layers.0.mixer.A_log")), 0.f);
}

TEST(Trainer, PackingRunsAndResumesExactly) {
  test::TempDir full, half;
  auto straight = train::run_training(train::load_recipe(write_recipe(full), {"packing=true", "seq_len=48"}));
  train::run_training(train::load_recipe(write_recipe(half), {"packing=true", "seq_len=48", "steps=3"}));
  auto rest = train::run_training(train::load_recipe(write_recipe(half), {"packing=true", "seq_len=48", "resume=true"}));
  ASSERT_EQ(rest.losses.size(), 3u);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(rest.losses[i], straight.losses[3 + i]);
  for (double l : straight.losses) EXPECT_TRUE(std::isfinite(l));
}

// The rows of loaded moments that are all +0 (the GPU optimizer's zero-moment flags after a
// resume): a -0 or any value in either moment makes the row not zero; BF16 and F32 alike.
TEST(Optimizer, ZeroMomentRowsAreRowsOfPositiveZeros) {
  for (const DType dt : {DType::F32, DType::BF16}) {
    Tensor m = Tensor::zeros({4, 3}, DType::F32), v = Tensor::zeros({4, 3}, DType::F32);
    m.f32()[1 * 3 + 2] = -0.f;  // row 1: a negative zero
    v.f32()[2 * 3 + 0] = 1e-30f;  // row 2: a value in the second moment
    const Tensor rows = train::zero_moment_rows(m.to(dt), v.to(dt), 4);
    ASSERT_EQ(rows.numel(), 4);
    EXPECT_EQ(rows.data<uint8_t>()[0], 1);
    EXPECT_EQ(rows.data<uint8_t>()[1], 0);
    EXPECT_EQ(rows.data<uint8_t>()[2], 0);  // 1e-30 is a BF16 value too (F32's exponent range)
    EXPECT_EQ(rows.data<uint8_t>()[3], 1);
  }
  EXPECT_THROW(train::zero_moment_rows(Tensor::zeros({6}, DType::F32), Tensor::zeros({6}, DType::F32), 4), Error);
}

TEST(Optimizer, SchedulesMatchTransformers) {
  train::ScheduleOptions s{"linear", 10, 0.0};
  EXPECT_DOUBLE_EQ(train::lr_multiplier(s, 0, 110), 0.0);
  EXPECT_DOUBLE_EQ(train::lr_multiplier(s, 5, 110), 0.5);
  EXPECT_DOUBLE_EQ(train::lr_multiplier(s, 60, 110), 0.5);
  s.type = "cosine";
  EXPECT_NEAR(train::lr_multiplier(s, 60, 110), 0.5, 1e-12);
  EXPECT_NEAR(train::lr_multiplier(s, 35, 110), 0.5 * (1 + std::cos(M_PI * 0.25)), 1e-12);
  s.type = "constant";
  EXPECT_DOUBLE_EQ(train::lr_multiplier(s, 50, 110), 1.0);
}

// Warmup-stable-decay against transformers.get_wsd_schedule(num_warmup_steps=10, num_decay_steps=20,
// num_training_steps=100, min_lr_ratio=0.1) at steps 0, 5, 10, 50, 79, 80, 85, 90, 99, 100 (values
// printed by Transformers 5.17 for each decay_type); warmup_ratio as TrainingArguments' ceil.
TEST(Optimizer, WarmupStableDecayMatchesTransformers) {
  train::ScheduleOptions s;
  s.type = "wsd";
  s.warmup_steps = 10;
  s.decay_steps = 20;
  s.min_lr_ratio = 0.1;
  const std::vector<int64_t> steps = {0, 5, 10, 50, 79, 80, 85, 90, 99, 100};
  const std::vector<std::pair<const char*, std::vector<double>>> want = {
      {"cosine", {0.1, 0.55, 1.0, 1.0, 1.0, 1.0, 0.868198051534, 0.55, 0.105540246732, 0.1}},
      {"linear", {0.1, 0.55, 1.0, 1.0, 1.0, 1.0, 0.775, 0.55, 0.145, 0.1}},
      {"1-sqrt", {0.1, 0.55, 1.0, 1.0, 1.0, 1.0, 0.55, 0.363603896932, 0.122788508967, 0.1}}};
  for (const auto& [type, values] : want) {
    s.decay_type = type;
    for (size_t i = 0; i < steps.size(); ++i)
      EXPECT_NEAR(train::lr_multiplier(s, steps[i], 100), values[i], 1e-9) << type << " at step " << steps[i];
  }
  // decay_ratio 0.2 of 100 steps is the same 20-step decay.
  s.decay_steps = 0;
  s.decay_ratio = 0.2;
  s.decay_type = "linear";
  EXPECT_NEAR(train::lr_multiplier(s, 85, 100), 0.775, 1e-12);
  // warmup_ratio 0.05 of 100 steps: 5 warmup steps.
  train::ScheduleOptions c{"cosine"};
  c.warmup_ratio = 0.05;
  EXPECT_EQ(c.warmup_of(100), 5);
  EXPECT_DOUBLE_EQ(train::lr_multiplier(c, 2, 100), 0.4);
  EXPECT_DOUBLE_EQ(train::lr_multiplier(c, 5, 100), 1.0);
}

// A model's token-weighted loss over rows batched as the recipe of write_recipe batches them
// (seq_len 16, seed 3, micro_batch 2): what the trainer's validation reports.
namespace {
double validation_loss(const models::CausalLM& model, std::vector<data::TokenRow> rows_in) {
  data::TokenBatches rows(std::move(rows_in), 16, 3);
  double ce = 0;
  int64_t tokens = 0;
  for (int64_t b = 0; b * 2 < rows.rows(); ++b) {
    auto mb = rows.micro_batch(b * 2, std::min<int64_t>(2, rows.rows() - b * 2));
    const auto o = model.forward({mb.input_ids, &mb.labels});
    ce += o.ce_sum;
    tokens += o.loss_tokens;
  }
  return ce / tokens;
}
}  // namespace

// Validation: eval_data's token-weighted loss in metrics.jsonl at every eval_every steps and at the
// end (equal to the loss of the saved model on those rows), the progress line carrying it, and
// save_best keeping the folder of the lowest one.
TEST(Trainer, ValidationLossIsRecordedAndTheBestIsKept) {
  test::TempDir dir;
  const std::string recipe = write_recipe(dir, "eval_data: " + kData + "\neval_every: 2\nsave_best: true\n");
  auto r = train::run_training(train::load_recipe(recipe, {"steps=5", "save_every=0"}));
  std::vector<std::pair<int64_t, double>> evals;
  std::ifstream in(dir / "out/metrics.jsonl");
  for (std::string line; std::getline(in, line);) {
    const auto j = nlohmann::json::parse(line);
    if (j.contains("eval_loss")) evals.emplace_back(j["step"].get<int64_t>(), j["eval_loss"].get<double>());
  }
  ASSERT_EQ(evals.size(), 3u);  // steps 2, 4 and the end (5)
  EXPECT_EQ(evals[0].first, 2);
  EXPECT_EQ(evals[2].first, 5);
  // The last one is the final model's loss on the rows, as training batches them (seq_len 16).
  auto m = models::from_pretrained(r.final_dir);
  EXPECT_NEAR(evals[2].second, validation_loss(*m.model, data::load_model_dataset(kData, data::ModelText{}, false).rows), 1e-5);
  auto best = std::min_element(evals.begin(), evals.end(), [](auto& a, auto& b) { return a.second < b.second; });
  const auto saved = nlohmann::json::parse(test::read_text((dir / "out/best/best.json")));
  EXPECT_EQ(saved["step"].template get<int64_t>(), best->first);
  EXPECT_TRUE(fs::exists(dir / "out/best/model.safetensors") || fs::exists(dir / "out/best/model.safetensors.index.json"));
}

// eval_split: the held-out rows are validated on (their loss is the final model's on exactly
// those rows) and never trained on (the training set is the rest), the same split on every run.
TEST(Trainer, EvalSplitValidatesOnRowsHeldOutOfData) {
  test::TempDir dir;
  const std::string recipe = write_recipe(dir, "eval_split: 0.25\n");
  auto r = train::run_training(train::load_recipe(recipe, {"steps=2", "save_every=0"}));
  double last = -1;
  std::ifstream in(dir / "out/metrics.jsonl");
  for (std::string line; std::getline(in, line);) {
    const auto j = nlohmann::json::parse(line);
    if (j.contains("eval_loss")) last = j["eval_loss"].get<double>();
  }
  ASSERT_GE(last, 0) << "no eval_loss in metrics.jsonl";
  const auto all = data::load_model_dataset(kData, data::ModelText{}, false, false).rows;
  const auto split = data::hold_out(all, 0.25, 3, "test");  // the recipe's seed
  EXPECT_EQ(split.eval.size() + split.train.size(), all.size());
  auto m = models::from_pretrained(r.final_dir);
  EXPECT_NEAR(last, validation_loss(*m.model, split.eval), 1e-5);
  const std::string both = test::error_of([&] { train::load_recipe(write_recipe(dir, "eval_split: 0.25\neval_data: x.jsonl\n"), {}); });
  EXPECT_NE(both.find("set one of 'eval_data' and 'eval_split'"), std::string::npos) << both;
}

// Recipe paths are relative to the recipe's folder; command-line overrides to the current one.
TEST(Recipe, PathsResolveFromTheRecipeFolder) {
  test::TempDir dir;
  fs::create_directories(dir / "sub");
  std::ofstream(dir / "sub/r.yaml") << "model: ../models/m\ndata: data/*.jsonl\noutput_dir: out\nsteps: 1\n"
                                    << "eval_data: /abs/eval.jsonl\n";
  const auto r = train::load_recipe((dir / "sub/r.yaml"), {"tokenizer=tok"});
  EXPECT_EQ(r.model, (dir / "models/m"));
  EXPECT_EQ(r.data, (dir / "sub/data/*.jsonl"));
  EXPECT_EQ(r.output_dir, (dir / "sub/out"));
  EXPECT_EQ(r.eval_data, "/abs/eval.jsonl");
  EXPECT_EQ(r.tokenizer, "tok");
  EXPECT_EQ(r.seq_len, 0);  // resolved by the trainer from the model
}

// The recipe's data_cache: tokenized rows are cached in that folder (relative to the recipe's
// folder), the run that reads them trains exactly as the one that wrote them; "none" caches nothing.
TEST(Trainer, DataCacheFolderIsUsedAndChangesNothing) {
  test::TempDir dir;
  const std::string recipe = write_recipe(dir, "data_cache: cache\n");
  const auto first = train::run_training(train::load_recipe(recipe, {"steps=2", "save_every=0"}));
  size_t cached = 0;
  for (const auto& e : fs::directory_iterator(dir / "cache")) cached += e.path().extension() == ".mftok";
  EXPECT_EQ(cached, 1u);
  const auto second = train::run_training(train::load_recipe(recipe, {"steps=2", "save_every=0", "overwrite=true"}));
  EXPECT_EQ(first.losses, second.losses);
  // Without the key: the default folder ($MOEFORGE_CACHE_DIR/datasets here); "none": nothing.
  test::TempDir env;
  const char* before = std::getenv("MOEFORGE_CACHE_DIR");
  const std::string saved = before ? before : "";
  ::setenv("MOEFORGE_CACHE_DIR", (env / "c").c_str(), 1);
  test::TempDir none, by_default;
  train::run_training(train::load_recipe(write_recipe(none, "data_cache: none\n"), {"steps=1"}));
  EXPECT_FALSE(fs::exists(env / "c"));
  EXPECT_FALSE(fs::exists(none / "none"));
  train::run_training(train::load_recipe(write_recipe(by_default), {"steps=1"}));
  EXPECT_TRUE(fs::exists(env / "c/datasets"));
  if (before) ::setenv("MOEFORGE_CACHE_DIR", saved.c_str(), 1);
  else ::unsetenv("MOEFORGE_CACHE_DIR");
}

// seq_len unset: 2048 or the model's max_position_embeddings when smaller (64 for the fixture).
TEST(Trainer, SeqLenDefaultsToTheModelsLength) {
  test::TempDir dir;
  std::ofstream(dir / "r.yaml") << "model: " << test::fixture("qwen3_moe_aux") << "\ndata: " << kData
                                << "\noutput_dir: " << (dir / "out") << "\nsteps: 1\nmicro_batch: 2\nglobal_batch: 2\n";
  train::run_training(train::load_recipe((dir / "r.yaml"), {}));
  EXPECT_NE(test::read_text((dir / "out/recipe.yaml")).find("\nseq_len: 64\n"), std::string::npos);
}

// Resuming with a recipe that changes the training is an error naming what changed, unless allowed.
TEST(TrainerBadInput, ResumeWithChangedTrainingIsAnError) {
  test::TempDir dir;
  train::run_training(train::load_recipe(write_recipe(dir), {"steps=3"}));
  const std::string e = test::error_of(
      [&] { train::run_training(train::load_recipe(write_recipe(dir), {"resume=true", "optimizer.lr=0.01"})); });
  EXPECT_NE(e.find("optimizer.lr"), std::string::npos) << e;
  EXPECT_NE(e.find("resume_allow_changes"), std::string::npos) << e;
  const std::string e2 = test::error_of(
      [&] { train::run_training(train::load_recipe(write_recipe(dir), {"resume=true", "seq_len=12"})); });
  EXPECT_NE(e2.find("seq_len: 16 -> 12"), std::string::npos) << e2;
  // Allowed: it runs on from step 3 (steps 6 is not a change: it is the recipe's own value).
  auto r = train::run_training(
      train::load_recipe(write_recipe(dir), {"resume=true", "optimizer.lr=0.01", "resume_allow_changes=true"}));
  EXPECT_EQ(r.steps_done, 3);
  // Against the recipe that run saved (lr 0.01), changing only where and how it runs: no error.
  EXPECT_EQ(test::error_of([&] {
              train::run_training(train::load_recipe(
                  write_recipe(dir), {"resume=true", "optimizer.lr=0.01", "threads=1", "log_every=2"}));
            }),
            "");
}

TEST(Optimizer, ClippingScalesToTheMaxNorm) {
  nn::ParamStore ps;
  ps.add("a", {2});
  ps.all()[0].value = Tensor::from_vector({0, 0}, {2});
  ps.ensure_grads();
  ps.all()[0].grad.f32()[0] = 3;
  ps.all()[0].grad.f32()[1] = 4;
  EXPECT_DOUBLE_EQ(train::clip_grad_norm(ps, 1.0), 5.0);
  EXPECT_NEAR(train::global_grad_norm(ps), 1.0, 1e-6);
  EXPECT_NEAR(train::clip_grad_norm(ps, 10.0), 1.0, 1e-6);  // under the limit: unchanged
  EXPECT_NEAR(ps.all()[0].grad.f32()[1], 0.8, 1e-6);
}

TEST(Optimizer, NormsAndBiasesCanBeExcludedFromWeightDecay) {
  nn::ParamStore ps;
  ps.add("w", {1});
  ps.add("norm.weight", {1});
  ps.all()[1].decay = false;
  for (auto& p : ps.all()) p.value = Tensor::from_vector({1}, {1});
  ps.ensure_grads();  // zero gradients: only weight decay moves the weights
  train::AdamW opt(ps, {0.1, 0.9, 0.999, 1e-8, 0.5, /*decay_norms_and_biases=*/false});
  opt.step(0.1);
  EXPECT_FLOAT_EQ(ps.all()[0].value.f32()[0], 0.95f);
  EXPECT_FLOAT_EQ(ps.all()[1].value.f32()[0], 1.0f);
}

TEST(RecipeBadInput, UnknownKeyWithSuggestion) {
  test::TempDir dir;
  const std::string e = test::error_of([&] { train::load_recipe(write_recipe(dir, "optimzer:\n  lr: 1\n"), {}); });
  EXPECT_NE(e.find("recipe.yaml: unknown key 'optimzer.lr' (did you mean 'optimizer.lr'?)"), std::string::npos) << e;
  const std::string e2 = test::error_of([&] { train::load_recipe(write_recipe(dir), {"lr=1e-4"}); });
  EXPECT_NE(e2.find("command line: unknown key 'lr' (did you mean 'optimizer.lr'?)"), std::string::npos) << e2;
  const std::string e3 = test::error_of([&] { train::load_recipe(write_recipe(dir), {"stepz=4"}); });
  EXPECT_NE(e3.find("did you mean 'steps'"), std::string::npos) << e3;
}

// Numbers out of their range or not finite, both steps and epochs, a key given twice: each one
// error naming the key (issue 22: these were accepted and trained nonsense).
TEST(RecipeBadInput, OutOfRangeNonFiniteAndRepeatedKeys) {
  test::TempDir dir;
  auto error = [&](const std::vector<std::string>& o, const std::string& extra = "") {
    return test::error_of([&] { train::load_recipe(write_recipe(dir, extra), o); });
  };
  std::string e = error({"optimizer.lr=.inf"});
  EXPECT_NE(e.find("key 'optimizer.lr' must be a finite number, got .inf"), std::string::npos) << e;
  e = error({"optimizer.beta1=1.0"});
  EXPECT_NE(e.find("key 'optimizer.beta1' must be < 1, got 1"), std::string::npos) << e;
  e = error({"optimizer.beta2=-0.5"});
  EXPECT_NE(e.find("key 'optimizer.beta2' must be >= 0"), std::string::npos) << e;
  e = error({"schedule.min_lr_ratio=1.5"});
  EXPECT_NE(e.find("key 'schedule.min_lr_ratio' must be <= 1, got 1.5"), std::string::npos) << e;
  e = error({"eval_split=1"});
  EXPECT_NE(e.find("key 'eval_split' must be < 1, got 1"), std::string::npos) << e;
  e = error({"max_grad_norm=.nan"});
  EXPECT_NE(e.find("key 'max_grad_norm' must be a finite number"), std::string::npos) << e;
  e = error({"epochs=2"});
  EXPECT_NE(e.find("set one of 'steps' and 'epochs', not both (steps 6, epochs 2)"), std::string::npos) << e;
  e = error({}, "seq_len: 32\n");
  EXPECT_NE(e.find("key 'seq_len' is given twice"), std::string::npos) << e;
  e = error({}, "schedule:\n  type: linear\n");
  EXPECT_NE(e.find("key 'schedule' is given twice"), std::string::npos) << e;
  // An override on the command line is not a repetition.
  EXPECT_EQ(train::load_recipe(write_recipe(dir), {"seq_len=8"}).seq_len, 8);
}

// A learning rate that blows the weights up: nothing non-finite is ever written. Either the
// gradient norm of the next step is not finite (the update is not applied) or the weights are not
// finite when a checkpoint is due; the run stops with one line naming the step.
TEST(TrainerFaults, DivergenceStopsBeforeAnythingNonFiniteIsSaved) {
  for (const char* lr : {"1e30", "1e39"}) {
    test::TempDir dir;
    const std::string e = test::error_of([&] {
      train::run_training(train::load_recipe(
          write_recipe(dir), {std::string("optimizer.lr=") + lr, "max_grad_norm=0", "schedule.warmup_steps=0",
                              "save_every=1", "steps=4"}));
    });
    EXPECT_NE(e.find("training diverged"), std::string::npos) << lr << ": " << e;
    EXPECT_FALSE(fs::exists(dir / "out/final")) << lr;
    // What was saved before the divergence (1e30: step 1's huge but finite weights) is finite.
    for (const auto& d : fs::directory_iterator(dir / "out")) {
      if (d.path().filename().string().rfind("checkpoint-", 0) != 0) continue;
      auto ck = hf::SafetensorsCheckpoint::open(d.path().string());
      for (const auto& n : ck.names())
        for (float v : ck.get(n).to_f32_vector()) ASSERT_TRUE(std::isfinite(v)) << lr << ": " << d.path() << " " << n;
    }
  }
  // 1e39 overflows the first update itself: stopped at step 1, before any checkpoint.
  test::TempDir dir;
  const std::string e = test::error_of([&] {
    train::run_training(train::load_recipe(write_recipe(dir), {"optimizer.lr=1e39", "max_grad_norm=0",
                                                               "schedule.warmup_steps=0", "save_every=1", "steps=4"}));
  });
  EXPECT_NE(e.find("the weights hold NaN or Inf after step 1; nothing was saved"), std::string::npos) << e;
  EXPECT_FALSE(fs::exists(dir / "out/checkpoint-1"));
}

// Batch sizes beyond the dataset (an absurd value used to allocate or loop without a word): one
// error naming the key, before the output folder is touched.
TEST(TrainerBadInput, ABatchLargerThanTheDatasetIsAnError) {
  for (const std::vector<std::string>& o : {std::vector<std::string>{"micro_batch=100000000", "global_batch=100000000"},
                                            std::vector<std::string>{"micro_batch=1", "global_batch=100000000000000"},
                                            std::vector<std::string>{"micro_batch=65", "global_batch=65"}}) {
    test::TempDir dir;
    const std::string e = test::error_of([&] { train::run_training(train::load_recipe(write_recipe(dir), o)); });
    EXPECT_NE(e.find("key 'global_batch'"), std::string::npos) << e;
    EXPECT_NE(e.find("the dataset has 64 rows"), std::string::npos) << e;
    EXPECT_FALSE(fs::exists(dir / "out")) << o[0];
  }
  test::TempDir ok;
  EXPECT_EQ(train::run_training(train::load_recipe(write_recipe(ok), {"micro_batch=64", "global_batch=64", "steps=1"}))
                .losses.size(),
            1u);
}

TEST(RecipeBadInput, WrongType) {
  test::TempDir dir;
  const std::string e = test::error_of([&] { train::load_recipe(write_recipe(dir), {"steps=ten"}); });
  EXPECT_NE(e.find("command line: key 'steps' must be an integer, got 'ten'"), std::string::npos) << e;
  const std::string e2 = test::error_of([&] { train::load_recipe(write_recipe(dir, "threads: [1, 2]\n"), {}); });
  EXPECT_NE(e2.find("key 'threads' must be an integer"), std::string::npos) << e2;
  const std::string e3 = test::error_of([&] { train::load_recipe(write_recipe(dir), {"global_batch=3"}); });
  EXPECT_NE(e3.find("'global_batch' (3) must be a multiple of 'micro_batch' (2)"), std::string::npos) << e3;
  const std::string e4 = test::error_of([&] { train::load_recipe(write_recipe(dir), {"precision=bf16"}); });
  EXPECT_NE(e4.find("'precision' value 'bf16' is not available on the CPU backend"), std::string::npos) << e4;
  // YAML's complex keys (found by fuzz_recipe: the key's conversion escaped as a YAML exception).
  const std::string e5 = test::error_of([&] { train::load_recipe(write_recipe(dir, "? [a, b]\n: 1\n"), {}); });
  EXPECT_NE(e5.find("a key at line"), std::string::npos) << e5;
  EXPECT_NE(e5.find("is a list, not a name"), std::string::npos) << e5;
  const std::string e6 =
      test::error_of([&] { train::load_recipe(write_recipe(dir, "peft:\n  ? {x: 1}\n  : 2\n"), {}); });
  EXPECT_NE(e6.find("a key under 'peft' at line"), std::string::npos) << e6;
  EXPECT_NE(e6.find("is a mapping, not a name"), std::string::npos) << e6;
}

// device and precision: the allowed values, the device's default policy, and device: cuda where
// no GPU answers (CI) failing before anything is written.
TEST(RecipeBadInput, ZeroStage) {
  test::TempDir dir;
  const std::string e = test::error_of([&] { train::load_recipe(write_recipe(dir), {"zero_stage=2"}); });
  EXPECT_NE(e.find("key 'zero_stage' must be 1 or 3, got 2"), std::string::npos) << e;
  EXPECT_EQ(train::load_recipe(write_recipe(dir), {}).zero_stage, 1);
  // ZeRO-3 splits parameters over GPUs; on the CPU it is one clear error before anything is written.
  const std::string e2 =
      test::error_of([&] { train::run_training(train::load_recipe(write_recipe(dir), {"zero_stage=3"})); });
  EXPECT_NE(e2.find("key 'zero_stage': 3 shards parameters over GPUs"), std::string::npos) << e2;
  EXPECT_FALSE(fs::exists(dir / "out"));
}

// The optimizer inside backward cannot clip or accumulate: one error naming the key, nothing written.
TEST(RecipeBadInput, OptimizerInBackwardNeedsNoClippingAndNoAccumulation) {
  test::TempDir dir;
  const std::string e = test::error_of([&] {
    train::run_training(train::load_recipe(write_recipe(dir), {"optimizer_in_backward=true", "global_batch=2"}));
  });
  EXPECT_NE(e.find("key 'optimizer_in_backward': true applies each layer's update before the whole gradient's norm "
                   "exists, so it cannot clip: set max_grad_norm: 0"),
            std::string::npos)
      << e;
  const std::string e2 = test::error_of([&] {
    train::run_training(train::load_recipe(write_recipe(dir), {"optimizer_in_backward=true", "max_grad_norm=0"}));
  });
  EXPECT_NE(e2.find("set global_batch equal to micro_batch (4 and 2)"), std::string::npos) << e2;
  EXPECT_FALSE(fs::exists(dir / "out"));
  const std::string e3 =
      test::error_of([&] { train::load_recipe(write_recipe(dir), {"optimizer_in_backward=sometimes"}); });
  EXPECT_NE(e3.find("optimizer_in_backward"), std::string::npos) << e3;
}

TEST(RecipeBadInput, DeviceAndPrecision) {
  test::TempDir dir;
  const std::string e = test::error_of([&] { train::load_recipe(write_recipe(dir), {"device=tpu"}); });
  EXPECT_NE(e.find("key 'device' must be cpu or cuda, got 'tpu'"), std::string::npos) << e;
  const std::string e2 = test::error_of([&] { train::load_recipe(write_recipe(dir), {"device=cuda", "precision=fp16"}); });
  EXPECT_NE(e2.find("key 'precision' must be fp32, bf16-mixed or bf16, got 'fp16'"), std::string::npos) << e2;
  EXPECT_EQ(train::load_recipe(write_recipe(dir), {}).precision, "fp32");
  EXPECT_EQ(train::load_recipe(write_recipe(dir), {"device=cuda"}).precision, "bf16-mixed");
  EXPECT_EQ(train::load_recipe(write_recipe(dir), {"device=cuda", "precision=bf16"}).precision, "bf16");
  if (cuda::available()) return;  // the GPU run itself is tests/gpu/test_cuda_training.cpp
  const std::string e3 = test::error_of([&] { train::run_training(train::load_recipe(write_recipe(dir), {"device=cuda"})); });
  EXPECT_NE(e3.find("key 'device': cuda, but no CUDA device answers here"), std::string::npos) << e3;
  EXPECT_FALSE(fs::exists(dir / "out")) << "nothing is written before the inputs are checked";
}

// Multi-rank recipes this machine cannot run are refused with one line before any rank writes
// (the runs themselves are in test_dist_training.cpp).
TEST(RecipeBadInput, MultiRankLimitsAreOneErrorBeforeAnythingIsWritten) {
  test::TempDir dir;
  setenv("RANK", "1", 1);
  setenv("WORLD_SIZE", "3", 1);
  const std::string e1 = test::error_of([&] { train::run_training(train::load_recipe(write_recipe(dir), {})); });
  const std::string e2 =
      test::error_of([&] { train::run_training(train::load_recipe(write_recipe(dir), {"device=cuda", "micro_batch=3", "global_batch=6"})); });
  unsetenv("RANK");
  unsetenv("WORLD_SIZE");
  EXPECT_NE(e1.find("key 'micro_batch': 2 rows cannot be split evenly over 3 ranks"), std::string::npos) << e1;
  if (cuda::device_count() < 3)  // a GPU per rank on this node
    EXPECT_NE(e2.find("key 'device': cuda with 3 ranks on this node, but it has"), std::string::npos) << e2;
  EXPECT_FALSE(fs::exists(dir / "out"));
}

TEST(RecipeBadInput, MissingModelFolder) {
  test::TempDir dir;
  const std::string e = test::error_of([&] {
    train::run_training(train::load_recipe(write_recipe(dir), {"model=" + (dir / "nope")}));
  });
  EXPECT_NE(e.find("key 'model': folder"), std::string::npos) << e;
  EXPECT_FALSE(fs::exists(dir / "out")) << "nothing is written before the inputs are checked";
}

TEST(RecipeBadInput, ExistingOutputFolderIsRefused) {
  test::TempDir dir;
  train::run_training(train::load_recipe(write_recipe(dir), {"steps=1"}));
  const std::string e = test::error_of([&] { train::run_training(train::load_recipe(write_recipe(dir), {"steps=1"})); });
  EXPECT_NE(e.find("already exists (set overwrite=true"), std::string::npos) << e;
  EXPECT_TRUE(fs::exists(dir / "out/checkpoint-1")) << "the refused run must not touch the old output";
  train::run_training(train::load_recipe(write_recipe(dir), {"steps=1", "overwrite=true"}));
  // A folder that is not a moeforge output is never deleted, even with overwrite.
  fs::create_directories(dir / "precious");
  std::ofstream(dir / "precious/notes.txt") << "keep me";
  const std::string e2 = test::error_of([&] {
    train::run_training(train::load_recipe(write_recipe(dir), {"output_dir=" + (dir / "precious"), "overwrite=true"}));
  });
  EXPECT_NE(e2.find("not a moeforge output folder"), std::string::npos) << e2;
  EXPECT_TRUE(fs::exists(dir / "precious/notes.txt"));
}

TEST(RecipeBadInput, SequenceLongerThanTheModelAllows) {
  test::TempDir dir;
  const std::string e = test::error_of([&] { train::run_training(train::load_recipe(write_recipe(dir), {"seq_len=65"})); });
  EXPECT_NE(e.find("seq_len 65 is longer than the model allows (max_position_embeddings 64"), std::string::npos) << e;
}

TEST(TrainerFaults, KillDuringSaveLeavesThePreviousCheckpointLoadable) {
  test::TempDir dir;
  // The base recipe with a checkpoint every step (a key given twice is an error, so edited in place).
  const std::string recipe = write_recipe(dir, "save_total_limit: 5\n");
  {
    std::stringstream text;
    text << std::ifstream(recipe).rdbuf();
    std::string r = text.str();
    r.replace(r.find("save_every: 3"), 13, "save_every: 1");
    r.replace(r.find("steps: 6"), 8, "steps: 4");
    std::ofstream(recipe) << r;
  }
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::setenv("MOEFORGE_TEST_SLOW_WRITE_MS", "20", 1);
    ::execl(MOEFORGE_BIN, MOEFORGE_BIN, "train", recipe.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  // Wait until checkpoint-1 is complete and checkpoint-2 is being written, then kill.
  bool killed = false;
  for (int i = 0; i < 600 && !killed; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    if (!fs::exists(dir / "out/checkpoint-1")) continue;
    for (const auto& de : fs::directory_iterator(dir / "out"))
      if (de.path().filename().string().rfind("checkpoint-2.tmp.", 0) == 0) {
        ::kill(pid, SIGKILL);
        killed = true;
        break;
      }
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  ASSERT_TRUE(killed) << "never saw checkpoint-2 being written";
  EXPECT_FALSE(fs::exists(dir / "out/checkpoint-2"));
  // The previous checkpoint loads as a model and as a training state, and training resumes from it.
  auto m = models::from_pretrained(dir / "out/checkpoint-1");
  auto r = train::run_training(train::load_recipe(recipe, {"resume=true"}));
  EXPECT_EQ(r.losses.size(), 3u);
  for (const auto& de : fs::directory_iterator(dir / "out"))
    EXPECT_EQ(de.path().filename().string().find(".tmp."), std::string::npos) << "left behind: " << de.path();
}
