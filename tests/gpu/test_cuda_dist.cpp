// The NCCL Communicator and multi-GPU training on the GPU machine. One GPU: a one-rank group runs
// every collective on device tensors (NCCL's own self-send and copies), and a group whose second
// member never comes fails within its timeout naming the group, instead of hanging in NCCL's
// initialisation. Two GPUs (skipped with fewer): `moeforge launch --nproc-per-node 2 -- train` with
// device cuda in fp32, experts split over both (ep 2) or replicated (ep 1, data parallel), gives the
// one-GPU run's losses and final weights.
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "parallel/communicator.h"
#include "parallel/tcp_store.h"
#include "hf/safetensors.h"
#include "ops/cuda/runtime.h"
#include "test_util.h"
#include "train/recipe.h"
#include "train/trainer.h"

using namespace moeforge;
using namespace std::chrono_literals;

namespace {

using test::losses_of;

#define REQUIRE_NCCL_GPU()                                                          \
  if (!cuda::available()) GTEST_SKIP() << "no CUDA device on this machine";         \
  if (!parallel::nccl_available()) GTEST_SKIP() << "built without NCCL"

std::vector<float> host(const Tensor& d) {
  Tensor h = cuda::to_host_f32(d);
  return std::vector<float>(h.f32(), h.f32() + h.numel());
}

TEST(NcclCommunicator, OneRankGroupRunsEveryCollective) {
  REQUIRE_NCCL_GPU();
  parallel::TcpStoreServer server(0);
  parallel::TcpStoreClient store("127.0.0.1", server.port(), 5s);
  auto c = parallel::connect_nccl(store, "solo", 0, 1, 20s);
  EXPECT_STREQ(c->backend(), "nccl");
  const std::vector<float> v{1.f, -2.f, 3.5f, 4.f, 5.f, 6.f};
  Tensor a = cuda::to_device(Tensor::from_vector(v, {3, 2}), DType::F32);
  c->all_reduce_sum(a);
  EXPECT_EQ(host(a), v);
  Tensor b16 = cuda::to_device(Tensor::from_vector(v, {6}), DType::BF16);
  c->all_reduce_sum_many({&a, &b16});
  EXPECT_EQ(host(a), v);
  EXPECT_EQ(host(b16), v);
  Tensor out = cuda::empty({3, 2}, DType::F32);
  cuda::poison(out);
  c->all_gather(a, out);
  EXPECT_EQ(host(out), v);
  cuda::poison(out);
  c->reduce_scatter_sum(a, out);
  EXPECT_EQ(host(out), v);
  cuda::poison(out);
  c->all_to_all(a, {3}, out, {3});
  EXPECT_EQ(host(out), v);
  Tensor b = cuda::to_device(Tensor::from_vector(v, {6}), DType::BF16);
  c->broadcast(b, 0);
  EXPECT_EQ(host(b), v);  // every value is exact in BF16
  c->all_gather_blocks({b});
  EXPECT_EQ(host(b), v);
  c->reduce_scatter_blocks({a, b});
  EXPECT_EQ(host(a), v);
  EXPECT_EQ(host(b), v);
  c->barrier();
  EXPECT_NE(test::error_of([&] { c->all_to_all(a, {2}, out, {3}); }).find("all_to_all on group 'solo'"), std::string::npos);
}

TEST(NcclCommunicator, AMemberThatNeverComesIsATimeoutNamingTheGroup) {
  REQUIRE_NCCL_GPU();
  parallel::TcpStoreServer server(0);
  parallel::TcpStoreClient store("127.0.0.1", server.port(), 5s);
  const auto t0 = std::chrono::steady_clock::now();
  const std::string err = test::error_of([&] { parallel::connect_nccl(store, "pair", 0, 2, 3s); });
  EXPECT_NE(err.find("collective init on group 'pair' did not complete within 3 s"), std::string::npos) << err;
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 20s);
}

// The moeforge binary: MOEFORGE_BIN_PATH (test binaries run from another checkout), else the build's.
std::string moeforge_bin() {
  const char* v = std::getenv("MOEFORGE_BIN_PATH");
  return v ? v : MOEFORGE_BIN;
}

// qwen3_moe_aux (4 experts, the load-balancing loss on), clipping active, fp32 on the GPU.
std::string write_gpu_recipe(const test::TempDir& dir) {
  std::ofstream f(dir / "recipe.yaml");
  f << "model: " << test::fixture("qwen3_moe_aux") << "\n"
    << "data: " << test::fixture("../data/arith64.jsonl") << "\n"
    << "output_dir: " << (dir / "single") << "\n"
    << "device: cuda\nprecision: fp32\n"
    << "seq_len: 16\nmicro_batch: 4\nglobal_batch: 8\nsteps: 4\nlog_every: 1\nsave_every: 0\n"
    << "optimizer:\n  lr: 2.0e-3\n  weight_decay: 0.1\nschedule:\n  type: cosine\n  warmup_steps: 1\n"
    << "max_grad_norm: 0.5\nseed: 3\n";
  return dir / "recipe.yaml";
}

// `moeforge launch --nproc-per-node 2 -- train RECIPE ARGS`: the exit status and the output.
struct LaunchRun {
  bool ok;
  std::string text;
};
LaunchRun launch_two(const test::TempDir& dir, const std::string& recipe, const std::string& args) {
  const std::string log = dir / "launch.log";
  const std::string cmd = moeforge_bin() + " launch --nproc-per-node 2 --master-port " + std::to_string(test::free_port()) +
                          " -- train " + recipe + " " + args + " >" + log + " 2>&1";
  const int st = std::system(cmd.c_str());
  return {WIFEXITED(st) && WEXITSTATUS(st) == 0, test::read_text(log)};
}

// (ep_size, zero_stage): experts split or not; dense AdamW moments split (ZeRO-1) or the dense
// weights and gradients too (ZeRO-3, gathered layer by layer and reduce-scattered).
class MultiGpuTraining : public ::testing::TestWithParam<std::tuple<int, int>> {};

TEST_P(MultiGpuTraining, TwoGpusMatchOneGpuInFp32) {
  REQUIRE_NCCL_GPU();
  if (cuda::device_count() < 2) GTEST_SKIP() << "needs 2 GPUs; this machine has " << cuda::device_count();
  if (!parallel::gloo_available()) GTEST_SKIP() << "built without gloo";
  const auto [ep, zero] = GetParam();
  test::TempDir dir;
  const std::string recipe = write_gpu_recipe(dir);
  const auto one = train::run_training(train::load_recipe(recipe, {}));
  const std::string out = dir / "two";
  const LaunchRun run = launch_two(dir, recipe, "ep_size=" + std::to_string(ep) + " zero_stage=" + std::to_string(zero) +
                                                    " output_dir=" + out);
  const std::string& text = run.text;
  ASSERT_TRUE(run.ok) << text;
  EXPECT_NE(text.find("ranks: 2"), std::string::npos) << text;
  EXPECT_NE(text.find("on cuda"), std::string::npos) << text;
  EXPECT_NE(text.find(zero == 3 ? "ZeRO-3" : "ZeRO-1"), std::string::npos) << text;
  const auto losses = losses_of(out + "/metrics.jsonl");
  ASSERT_EQ(losses.size(), one.losses.size());
  for (size_t i = 0; i < losses.size(); ++i)
    EXPECT_NEAR(losses[i], one.losses[i], 1e-5 * std::abs(one.losses[i])) << "step " << i + 1;
  auto a = hf::SafetensorsCheckpoint::open(out + "/final"), b = hf::SafetensorsCheckpoint::open(one.final_dir);
  ASSERT_EQ(a.names(), b.names());
  for (const auto& name : a.names()) EXPECT_LT(test::tensor_rel_diff(a.get(name), b.get(name)), 1e-5) << name;
}

// LoRA on attention and the routed experts on 2 GPUs, the experts (and their adapters) split over
// both and the frozen dense weights under ZeRO-1 or ZeRO-3: the one-GPU run's losses and the same
// adapter file (per expert for Qwen3-MoE; PEFT's fused target_parameters tensors for GPT-OSS).
class MultiGpuLora : public ::testing::TestWithParam<std::tuple<const char*, int>> {};

TEST_P(MultiGpuLora, TwoGpusMatchOneGpuInFp32) {
  REQUIRE_NCCL_GPU();
  if (cuda::device_count() < 2) GTEST_SKIP() << "needs 2 GPUs; this machine has " << cuda::device_count();
  if (!parallel::gloo_available()) GTEST_SKIP() << "built without gloo";
  const auto [fixture, zero] = GetParam();
  test::TempDir dir;
  const std::string recipe = write_gpu_recipe(dir);
  const std::vector<std::string> lora = {"model=" + test::fixture(fixture), "peft.method=lora", "peft.rank=2",
                                         "peft.alpha=4", "peft.target_modules=[q_proj, experts]"};
  const auto one = train::run_training(train::load_recipe(recipe, lora));
  const std::string out = dir / "two";
  std::string args = "ep_size=2 zero_stage=" + std::to_string(zero) + " output_dir=" + out;
  for (const auto& o : lora) args += " '" + o + "'";
  const LaunchRun run = launch_two(dir, recipe, args);
  ASSERT_TRUE(run.ok) << run.text;
  const auto losses = losses_of(out + "/metrics.jsonl");
  ASSERT_EQ(losses.size(), one.losses.size());
  for (size_t i = 0; i < losses.size(); ++i)
    EXPECT_NEAR(losses[i], one.losses[i], 1e-5 * std::abs(one.losses[i])) << "step " << i + 1;
  test::expect_same_adapter_files(out + "/final/adapter_model.safetensors", one.final_dir + "/adapter_model.safetensors",
                                  1e-4);
}

INSTANTIATE_TEST_SUITE_P(FixtureAndZero, MultiGpuLora,
                         ::testing::Combine(::testing::Values("qwen3_moe_aux", "gpt_oss_a"), ::testing::Values(1, 3)),
                         [](const auto& info) {
                           return std::string(std::get<0>(info.param)) + "_zero" + std::to_string(std::get<1>(info.param));
                         });

// bf16-mixed on 2 GPUs (experts split; ZeRO-1 exchanging both the F32 masters and the BF16 copies,
// or ZeRO-3 keeping blocks of both)
// tracks the one-GPU bf16-mixed run: the same updates up to BF16 rounding of differently ordered
// sums, so losses within 1%.
TEST(MultiGpuTrainingPolicies, TwoGpusBf16MixedTrackOneGpu) {
  REQUIRE_NCCL_GPU();
  if (cuda::device_count() < 2) GTEST_SKIP() << "needs 2 GPUs; this machine has " << cuda::device_count();
  if (!parallel::gloo_available()) GTEST_SKIP() << "built without gloo";
  test::TempDir dir;
  const std::string recipe = write_gpu_recipe(dir);
  const auto one = train::run_training(train::load_recipe(recipe, {"precision=bf16-mixed"}));
  for (const char* zero : {"1", "3"}) {
    const std::string out = dir / (std::string("two-zero") + zero);
    const LaunchRun run =
        launch_two(dir, recipe, std::string("precision=bf16-mixed ep_size=2 zero_stage=") + zero + " output_dir=" + out);
    ASSERT_TRUE(run.ok) << run.text;
    const auto losses = losses_of(out + "/metrics.jsonl");
    ASSERT_EQ(losses.size(), one.losses.size());
    for (size_t i = 0; i < losses.size(); ++i)
      EXPECT_NEAR(losses[i], one.losses[i], 1e-2 * std::abs(one.losses[i])) << "ZeRO-" << zero << " step " << i + 1;
  }
}

// A checkpoint written by 2 GPUs (experts split, dense AdamW moments split ZeRO-1 style, or the
// dense weights too under ZeRO-3: gathered for the checkpoint) resumes on one GPU and finishes
// where the straight one-GPU run does.
class MultiGpuCheckpoints : public ::testing::TestWithParam<int> {};

TEST_P(MultiGpuCheckpoints, TwoGpuCheckpointResumesOnOneGpu) {
  REQUIRE_NCCL_GPU();
  if (cuda::device_count() < 2) GTEST_SKIP() << "needs 2 GPUs; this machine has " << cuda::device_count();
  if (!parallel::gloo_available()) GTEST_SKIP() << "built without gloo";
  test::TempDir dir;
  const std::string recipe = write_gpu_recipe(dir);
  const auto one = train::run_training(train::load_recipe(recipe, {}));
  const std::string two = dir / "two";
  const LaunchRun run =
      launch_two(dir, recipe, "ep_size=2 save_every=2 zero_stage=" + std::to_string(GetParam()) + " output_dir=" + two);
  ASSERT_TRUE(run.ok) << run.text;
  const auto resumed = train::run_training(
      train::load_recipe(recipe, {"resume=" + two + "/checkpoint-2", "output_dir=" + (dir / "resumed")}));
  ASSERT_EQ(resumed.losses.size(), 2u);
  for (size_t i = 0; i < 2; ++i) EXPECT_NEAR(resumed.losses[i], one.losses[i + 2], 1e-5 * std::abs(one.losses[i + 2]));
  auto a = hf::SafetensorsCheckpoint::open(resumed.final_dir), b = hf::SafetensorsCheckpoint::open(one.final_dir);
  ASSERT_EQ(a.names(), b.names());
  for (const auto& name : a.names()) EXPECT_LT(test::tensor_rel_diff(a.get(name), b.get(name)), 1e-5) << name;
}

INSTANTIATE_TEST_SUITE_P(Ep, MultiGpuTraining,
                         ::testing::Values(std::tuple{2, 1}, std::tuple{1, 1}, std::tuple{2, 3}, std::tuple{1, 3}),
                         [](const auto& info) {
                           return "ep" + std::to_string(std::get<0>(info.param)) + "_zero" +
                                  std::to_string(std::get<1>(info.param));
                         });
INSTANTIATE_TEST_SUITE_P(Zero, MultiGpuCheckpoints, ::testing::Values(1, 3),
                         [](const auto& info) { return "zero" + std::to_string(info.param); });

}  // namespace
