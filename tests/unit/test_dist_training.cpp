// Multi-rank training on the CPU, as users start it: `moeforge launch --nproc-per-node N -- train`
// (processes on this machine, gloo between them). 2 ranks with ep 2, 4 with ep 4 and 4 with
// dp x ep = 2 x 2 give the one-rank run's losses and final weights; a bad ep_size is one error line;
// a rank that dies mid-run makes the others fail, naming the collective, instead of hanging.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "parallel/communicator.h"
#include "hf/safetensors.h"
#include "models/pretrained.h"
#include "test_util.h"
#include "train/recipe.h"
#include "train/trainer.h"

using namespace moeforge;

namespace {

const std::string kData = std::string(MOEFORGE_FIXTURES) + "/../data/arith64.jsonl";

// qwen3_moe_aux: 4 experts, the load-balancing loss on; clipping active (max_grad_norm 0.5).
std::string write_recipe(const test::TempDir& dir) {
  std::ofstream f(dir / "recipe.yaml");
  f << "model: " << test::fixture("qwen3_moe_aux") << "\n"
    << "data: " << kData << "\n"
    << "output_dir: " << (dir / "single") << "\n"
    << "seq_len: 16\nmicro_batch: 4\nglobal_batch: 8\nsteps: 4\nlog_every: 1\nsave_every: 0\n"
    << "optimizer:\n  lr: 2.0e-3\n  weight_decay: 0.1\nschedule:\n  type: cosine\n  warmup_steps: 1\n"
    << "max_grad_norm: 0.5\nseed: 3\nthreads: 1\n";
  return dir / "recipe.yaml";
}

using test::free_port;
using test::losses_of;

struct ShellRun {
  int code;
  std::string out, err;
};

ShellRun shell(const std::string& cmd) {
  test::TempDir tmp;
  const std::string full = "(" + cmd + ") >" + (tmp / "out") + " 2>" + (tmp / "err");
  const int st = std::system(full.c_str());
  return {WIFEXITED(st) ? WEXITSTATUS(st) : -1, test::read_text(tmp / "out"), test::read_text(tmp / "err")};
}

void expect_same_model(const std::string& a, const std::string& b) {
  auto x = hf::SafetensorsCheckpoint::open(a), y = hf::SafetensorsCheckpoint::open(b);
  ASSERT_EQ(x.names(), y.names());
  for (const auto& name : x.names()) EXPECT_LT(test::tensor_rel_diff(x.get(name), y.get(name)), 1e-5) << name;
}

class DistTraining : public ::testing::TestWithParam<std::pair<int, int>> {};

TEST_P(DistTraining, MatchesTheOneRankRun) {
  if (!parallel::gloo_available()) GTEST_SKIP() << "built without gloo";
  const auto [world, ep] = GetParam();
  test::TempDir dir;
  const std::string recipe = write_recipe(dir);
  const auto one = train::run_training(train::load_recipe(recipe, {}));
  const std::string out = dir / "multi";
  const ShellRun r = shell(std::string(MOEFORGE_BIN) + " launch --nproc-per-node " + std::to_string(world) +
                      " --master-port " + std::to_string(free_port()) + " -- train " + recipe +
                      " ep_size=" + std::to_string(ep) + " output_dir=" + out);
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE((r.out + r.err).find("ranks: " + std::to_string(world)), std::string::npos) << r.out << r.err;
  const auto losses = losses_of(out + "/metrics.jsonl");
  ASSERT_EQ(losses.size(), one.losses.size());
  for (size_t i = 0; i < losses.size(); ++i) EXPECT_NEAR(losses[i], one.losses[i], 1e-5 * std::abs(one.losses[i])) << "step " << i + 1;
  expect_same_model(out + "/final", one.final_dir);
}

INSTANTIATE_TEST_SUITE_P(WorldAndEp, DistTraining,
                         ::testing::Values(std::make_pair(2, 2), std::make_pair(4, 4), std::make_pair(4, 2)),
                         [](const auto& info) {
                           return "world" + std::to_string(info.param.first) + "_ep" + std::to_string(info.param.second);
                         });

// LoRA on attention and the routed experts over 2 ranks with the experts (and their adapters) split
// in two, as in one process: the same losses, and the same adapter (the experts' gathered per
// expert; for GPT-OSS into PEFT's one fused tensor per weight).
class DistTrainingLora : public ::testing::TestWithParam<const char*> {};

TEST_P(DistTrainingLora, ExpertAdaptersSplitOverTwoRanksMatchTheOneRankRun) {
  if (!parallel::gloo_available()) GTEST_SKIP() << "built without gloo";
  test::TempDir dir;
  const std::string recipe = write_recipe(dir);
  const bool fused = std::string(GetParam()) == "gpt_oss_a";
  std::vector<std::string> lora = {"peft.method=lora", "peft.rank=2", "peft.alpha=4",
                                   "peft.target_modules=[q_proj, experts]"};
  if (std::string(GetParam()) != "qwen3_moe_aux") lora.push_back("model=" + test::fixture(GetParam()));
  const auto one = train::run_training(train::load_recipe(recipe, lora));
  const std::string out = dir / "multi";
  std::string cmd = std::string(MOEFORGE_BIN) + " launch --nproc-per-node 2 --master-port " +
                    std::to_string(free_port()) + " -- train " + recipe + " ep_size=2 output_dir=" + out;
  for (const auto& o : lora) cmd += " '" + o + "'";
  const ShellRun r = shell(cmd);
  ASSERT_EQ(r.code, 0) << r.err;
  const auto losses = losses_of(out + "/metrics.jsonl");
  ASSERT_EQ(losses.size(), one.losses.size());
  for (size_t i = 0; i < losses.size(); ++i) EXPECT_NEAR(losses[i], one.losses[i], 1e-5 * std::abs(one.losses[i])) << "step " << i + 1;
  // 1e-4 of each tensor's largest: the adapters are ~1e-2 after four steps of lr 2e-3, so the
  // ranks' other order of summation shows at ~1e-5 of them (the full model's weights hide it).
  test::expect_same_adapter_files(out + "/final/adapter_model.safetensors", one.final_dir + "/adapter_model.safetensors",
                                  1e-4);
  int experts = 0;
  const auto written = hf::SafetensorsFile::open(out + "/final/adapter_model.safetensors");
  for (const auto& e : written.entries())
    experts += e.name.find(fused ? ".experts.lora_B" : ".experts.3.down_proj.lora_B") != std::string::npos;
  EXPECT_GT(experts, 0);  // the second rank's experts are in the file
}

INSTANTIATE_TEST_SUITE_P(Families, DistTrainingLora, ::testing::Values("qwen3_moe_aux", "gpt_oss_a"));

// DeepSeek-V3's multi-token prediction layers trained on 2 ranks (their MoE experts split too) as
// in one process: the same losses, MTP losses and final weights (MTP layers included).
TEST(DistTrainingMtp, MatchesTheOneRankRun) {
  if (!parallel::gloo_available()) GTEST_SKIP() << "built without gloo";
  test::TempDir dir;
  const std::string recipe = write_recipe(dir);
  const std::vector<std::string> mtp = {"model=" + test::fixture("deepseek_v3_mtp"), "mtp_loss_scale=0.3"};
  const auto one = train::run_training(train::load_recipe(recipe, mtp));
  const std::string out = dir / "multi";
  const ShellRun r = shell(std::string(MOEFORGE_BIN) + " launch --nproc-per-node 2 --master-port " +
                           std::to_string(free_port()) + " -- train " + recipe + " " + mtp[0] + " " + mtp[1] +
                           " ep_size=2 output_dir=" + out);
  ASSERT_EQ(r.code, 0) << r.err;
  const auto losses = losses_of(out + "/metrics.jsonl");
  ASSERT_EQ(losses.size(), one.losses.size());
  for (size_t i = 0; i < losses.size(); ++i) EXPECT_NEAR(losses[i], one.losses[i], 1e-5 * std::abs(one.losses[i])) << "step " << i + 1;
  // The MTP loss of each step, rank 0's metrics against the one-rank run's.
  std::ifstream a(out + "/metrics.jsonl"), b(std::filesystem::path(one.final_dir).parent_path() / "metrics.jsonl");
  std::string la, lb;
  int compared = 0;
  while (std::getline(a, la) && std::getline(b, lb)) {
    const auto ja = nlohmann::json::parse(la), jb = nlohmann::json::parse(lb);
    ASSERT_TRUE(ja.contains("mtp_loss") && jb.contains("mtp_loss"));
    EXPECT_NEAR(ja["mtp_loss"].get<double>(), jb["mtp_loss"].get<double>(), 1e-5 * jb["mtp_loss"].get<double>());
    ++compared;
  }
  EXPECT_EQ(compared, 4);
  expect_same_model(out + "/final", one.final_dir);
}

// A checkpoint written by 2 ranks (ep 2) resumes on 4 ranks (ep 4) and on one process, and both
// finish where the straight one-rank run does: each rank writes its part of the checkpoint, and on
// load each takes its experts' rows from whichever parts hold them.
TEST(DistTrainingCheckpoints, ResumeOnAnotherWorldSize) {
  if (!parallel::gloo_available()) GTEST_SKIP() << "built without gloo";
  test::TempDir dir;
  const std::string recipe = write_recipe(dir);
  const auto one = train::run_training(train::load_recipe(recipe, {}));
  const auto launch = [&](int world, int ep, const std::string& extra) {
    return shell(std::string(MOEFORGE_BIN) + " launch --nproc-per-node " + std::to_string(world) + " --master-port " +
                 std::to_string(free_port()) + " -- train " + recipe + " ep_size=" + std::to_string(ep) + " " + extra);
  };
  const std::string first = dir / "two";
  ShellRun r = launch(2, 2, "save_every=2 output_dir=" + first);
  ASSERT_EQ(r.code, 0) << r.err;
  ASSERT_TRUE(std::filesystem::is_directory(first + "/checkpoint-2")) << r.out << r.err;
  // Each rank of the expert-parallel group wrote its part: rank 1 its experts [2, 4) only.
  auto part1 = hf::SafetensorsFile::open(first + "/checkpoint-2/training_state/part-00001-of-00002.safetensors");
  EXPECT_FALSE(part1.contains("param.model.embed_tokens.weight"));
  EXPECT_EQ(part1.get("param.model.layers.0.mlp.experts.gate_up_proj").size(0), 2);
  EXPECT_EQ(part1.get("exp_avg.model.layers.0.mlp.experts.gate_up_proj").size(0), 2);
  EXPECT_TRUE(hf::SafetensorsFile::open(first + "/checkpoint-2/training_state/part-00000-of-00002.safetensors")
                  .contains("param.model.embed_tokens.weight"));
  const std::string four = dir / "four";
  r = launch(4, 4, "resume=" + first + "/checkpoint-2 output_dir=" + four);
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE((r.out + r.err).find("resuming from " + first + "/checkpoint-2 at step 2"), std::string::npos) << r.err;
  const auto losses = losses_of(four + "/metrics.jsonl");
  ASSERT_EQ(losses.size(), 2u);
  for (size_t i = 0; i < 2; ++i) EXPECT_NEAR(losses[i], one.losses[i + 2], 1e-5 * std::abs(one.losses[i + 2]));
  expect_same_model(four + "/final", one.final_dir);
  // The 4-rank final folder was written by 4 writers: shards numbered across them, one index.
  const auto index = nlohmann::json::parse(test::read_text(four + "/final/model.safetensors.index.json"));
  std::set<std::string> files;
  for (const auto& [name, file] : index["weight_map"].items()) files.insert(file.get<std::string>());
  EXPECT_GE(files.size(), 4u);
  EXPECT_TRUE(files.count("model-00001-of-0000" + std::to_string(files.size()) + ".safetensors")) << *files.begin();
  const auto single = train::run_training(train::load_recipe(recipe, {"resume=" + first + "/checkpoint-2",
                                                                       "output_dir=" + (dir / "single_resumed")}));
  expect_same_model(single.final_dir, one.final_dir);
}

// A checkpoint in the fused expert layout (Transformers 5's in-memory spelling) cannot be split
// over files: 2 ranks gather the experts and rank 0 writes the fused tensors, as the one-rank run.
TEST(DistTrainingCheckpoints, FusedLayoutIsWrittenWhole) {
  if (!parallel::gloo_available()) GTEST_SKIP() << "built without gloo";
  test::TempDir dir;
  const std::string fused = dir / "fused_model";
  std::filesystem::create_directories(fused);
  for (const char* f : {"config.json", "generation_config.json"})
    std::filesystem::copy_file(test::fixture("qwen3_moe_aux") + "/" + f, fused + "/" + f);
  auto m = models::from_pretrained(test::fixture("qwen3_moe_aux"));
  hf::NamedTensors tensors;
  for (const auto& p : m.model->params().all()) tensors.emplace_back(p.name, p.value);
  hf::save_safetensors(fused + "/model.safetensors", tensors);
  const std::string recipe = write_recipe(dir);
  const auto one = train::run_training(train::load_recipe(recipe, {"model=" + fused}));
  const std::string out = dir / "two";
  const ShellRun r = shell(std::string(MOEFORGE_BIN) + " launch --nproc-per-node 2 --master-port " +
                           std::to_string(free_port()) + " -- train " + recipe + " ep_size=2 model=" + fused +
                           " output_dir=" + out);
  ASSERT_EQ(r.code, 0) << r.err;
  auto saved = hf::SafetensorsCheckpoint::open(out + "/final");
  EXPECT_TRUE(saved.contains("model.layers.0.mlp.experts.gate_up_proj"));
  EXPECT_EQ(saved.get("model.layers.0.mlp.experts.gate_up_proj").size(0), 4);
  expect_same_model(out + "/final", one.final_dir);
}

TEST(DistTrainingBadInput, EpSizeThatDoesNotDivideIsOneError) {
  if (!parallel::gloo_available()) GTEST_SKIP() << "built without gloo";
  test::TempDir dir;
  const std::string recipe = write_recipe(dir);
  // 3 does not divide 2 ranks (nor the 4 experts).
  const ShellRun r = shell(std::string(MOEFORGE_BIN) + " launch --nproc-per-node 2 --master-port " +
                      std::to_string(free_port()) + " -- train " + recipe + " ep_size=3 output_dir=" + (dir / "m"));
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("key 'ep_size': 3 does not divide the world size 2"), std::string::npos) << r.err;
  // One process cannot shard experts.
  const std::string err = test::error_of([&] { train::run_training(train::load_recipe(recipe, {"ep_size=2"})); });
  EXPECT_NE(err.find("key 'ep_size': 2 needs as many ranks"), std::string::npos) << err;
}

// Two ranks started as torchrun would (no launcher to stop the survivor): rank 1 is killed a
// moment into a long run; rank 0 must exit with an error naming a collective, not hang.
TEST(DistTrainingFaults, ARankThatDiesMidRunStopsTheOthersWithAnError) {
  if (!parallel::gloo_available()) GTEST_SKIP() << "built without gloo";
  test::TempDir dir;
  const std::string recipe = write_recipe(dir);
  const std::string env = "MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(free_port()) +
                          " WORLD_SIZE=2 LOCAL_WORLD_SIZE=2 MOEFORGE_DIST_TIMEOUT=20";
  const std::string train = std::string(MOEFORGE_BIN) + " train " + recipe + " steps=1000000 ep_size=2 output_dir=" +
                            (dir / "m");
  const auto t0 = std::chrono::steady_clock::now();
  const ShellRun r = shell(env + " RANK=0 LOCAL_RANK=0 " + train + " & " + env + " RANK=1 LOCAL_RANK=1 timeout -s KILL 3 " +
                      train + " >/dev/null 2>&1; wait %1");
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("collective "), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("a peer died"), std::string::npos) << r.err;
  EXPECT_LT(secs, 30.0);
}

// A frozen rank (SIGSTOPped: its connections stay open, it just never answers) is reported by the
// others within MOEFORGE_DIST_TIMEOUT, not twice it (the store server's shutdown waited a second
// timeout for the frozen rank's connection before the error came out).
TEST(DistTrainingFaults, AFrozenRankIsReportedWithinTheTimeout) {
  if (!parallel::gloo_available()) GTEST_SKIP() << "built without gloo";
  test::TempDir dir;
  const std::string recipe = write_recipe(dir);
  const std::string env = "MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(free_port()) +
                          " WORLD_SIZE=2 LOCAL_WORLD_SIZE=2 MOEFORGE_DIST_TIMEOUT=6";
  const std::string train = std::string(MOEFORGE_BIN) + " train " + recipe + " steps=1000000 log_every=100000 ep_size=2";
  // Rank 1 in the background, stopped 3 s in (the time written down); rank 0 in the foreground.
  const std::string stop_file = dir / "stopped_at", end_file = dir / "ended_at";
  const ShellRun r = shell(env + " RANK=1 LOCAL_RANK=1 " + train + " >/dev/null 2>&1 & p1=$!; (sleep 3; kill -STOP $p1; date +%s.%N > " +
                           stop_file + ") & " + env + " RANK=0 LOCAL_RANK=0 " + train + "; rc=$?; date +%s.%N > " + end_file +
                           "; kill -KILL $p1; exit $rc");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("a peer died, or did not take part within 6 s"), std::string::npos) << r.err;
  // Which one: rank 1's heartbeats stopped with it (rank 0 watched them for 1.5 s after the timeout).
  EXPECT_NE(r.err.find("rank 1 stopped answering: no heartbeat for 1.5 s"), std::string::npos) << r.err;
  const double stopped = std::stod(test::read_text(stop_file)), ended = std::stod(test::read_text(end_file));
  EXPECT_LT(ended - stopped, 6.0 + 2.5) << "seconds from the stop to the error";
}

}  // namespace
