// Expert parallelism on the CPU: ranks are threads of this process, each with its own gloo
// connections, as separate processes would have. The world splits the batch; each expert-parallel
// group shards the experts; tokens travel to their experts' ranks and back. After summing dense
// gradients over the world and expert gradients over the expert-data-parallel group, every rank's
// gradients must equal Transformers' (the fixtures' reference gradients, which the one-rank run
// matches in test_train_parity), and the summed loss the one-rank loss, for ep = 2 and 4 and
// dp x ep = 2 x 2.
#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "parallel/communicator.h"
#include "parallel/expert_exchange.h"
#include "parallel/tcp_store.h"
#include "hf/safetensors.h"
#include "models/pretrained.h"
#include "models/decoder/decoder.h"
#include "test_util.h"

using namespace moeforge;
using namespace std::chrono_literals;

namespace {

// The fixture's batch repeated `times` over (rows r, r+B, ... are the same row): the mean loss and
// so every gradient are those of the original batch.
Tensor tiled(const Tensor& t, int64_t times) {
  const int64_t b = t.size(0), s = t.size(1);
  Tensor out = Tensor::empty({b * times, s}, DType::I64);
  for (int64_t r = 0; r < b * times; ++r)
    for (int64_t j = 0; j < s; ++j) out.i64()[r * s + j] = t.i64()[(r % b) * s + j];
  return out;
}

Tensor rows_of(const Tensor& t, int64_t first, int64_t count) { return t.slice0(first, count).clone(); }

// The routed experts' fused tensors (Nemotron-H keeps its MoE under .mixer.).
bool is_expert_param(const std::string& name) {
  return name.find(".mlp.experts.") != std::string::npos || name.find(".mixer.experts.") != std::string::npos;
}

struct RankResult {
  std::string error;
  double ce_sum = 0;  // summed over the world
  int64_t tokens = 0;
  float aux = 0;
};

// One run of `world` ranks with expert-parallel groups of `ep` ranks on fixture `name`; checks the
// reduced gradients against the reference inside each rank.
std::vector<RankResult> run_parallel(const std::string& name, int world, int ep) {
  const std::string dir = test::fixture(name);
  auto ref = hf::SafetensorsFile::open(dir + "/reference.safetensors");
  auto grads = hf::SafetensorsFile::open(dir + "/reference_grads.safetensors");
  auto full = models::from_pretrained(dir);
  const Tensor ids0 = ref.get("input_ids").clone(), labels0 = ref.get("labels").clone();
  const int64_t times = world / ids0.size(0) > 0 ? world / ids0.size(0) : 1;
  const Tensor ids = tiled(ids0, times), labels = tiled(labels0, times);
  const int64_t rows_per_rank = ids.size(0) / world;
  const int64_t global_tokens = test::counted_tokens(labels);
  const int dp = world / ep;

  parallel::TcpStoreServer server(0);
  std::vector<RankResult> results(world);
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r)
    threads.emplace_back([&, r] {
      results[r].error = test::error_of([&] {
        parallel::TcpStoreClient store("127.0.0.1", server.port(), 5s);
        // Mesh: rank = dp_index * ep + ep_index.
        const int dp_index = r / ep, ep_index = r % ep;
        auto world_comm = parallel::connect_gloo(store, "world", r, world, "127.0.0.1", 20s);
        auto ep_comm = parallel::connect_gloo(store, "ep" + std::to_string(dp_index), ep_index, ep, "127.0.0.1", 20s);
        auto edp_comm = parallel::connect_gloo(store, "edp" + std::to_string(ep_index), dp_index, dp, "127.0.0.1", 20s);
        models::Decoder model(full.model->config(), {world_comm.get(), ep_comm.get()});
        const parallel::ExpertShard shard = parallel::ExpertShard::of(full.model->config().num_experts, ep_index, ep);
        for (auto& p : model.params().all()) {
          const nn::Param* src = full.model->params().find(p.name);
          if (!src) throw Error("no parameter " + p.name + " in the one-rank model");
          p.value = is_expert_param(p.name) ? src->value.slice0(shard.first, shard.count).clone() : src->value.clone();
          ASSERT_EQ(p.value.shape(), p.shape) << p.name;
        }
        const Tensor my_ids = rows_of(ids, r * rows_per_rank, rows_per_rank);
        const Tensor my_labels = rows_of(labels, r * rows_per_rank, rows_per_rank);
        models::TrainStepOptions o;
        o.ce_scale = 1.f / static_cast<float>(global_tokens);
        o.aux_scale = model.config().output_router_logits ? static_cast<float>(model.config().router_aux_loss_coef) : 0.f;
        const auto res = model.forward_backward({my_ids, &my_labels}, o);
        Tensor sums = Tensor::empty({2}, DType::F64);
        sums.data<double>()[0] = res.ce_sum;
        sums.data<double>()[1] = static_cast<double>(res.tokens);
        world_comm->all_reduce_sum(sums);
        results[r].ce_sum = sums.data<double>()[0];
        results[r].tokens = static_cast<int64_t>(sums.data<double>()[1]);
        results[r].aux = res.aux_loss;
        for (auto& p : model.params().all()) {
          if (!p.trainable) continue;  // a buffer (the routing correction bias): no gradient
          Tensor want = grads.get("grad." + p.name);
          if (is_expert_param(p.name)) {
            edp_comm->all_reduce_sum(p.grad);
            want = want.slice0(shard.first, shard.count);
          } else {
            world_comm->all_reduce_sum(p.grad);
          }
          EXPECT_LT(test::tensor_rel_diff(p.grad, want), 2e-5) << "rank " << r << " " << p.name;
        }
      });
    });
  for (auto& t : threads) t.join();
  return results;
}

void expect_parallel_matches_one_rank(const std::string& name, int world, int ep) {
  if (!parallel::gloo_available()) GTEST_SKIP() << "built without gloo";
  // The one-rank run of the same batch.
  auto one = models::from_pretrained(test::fixture(name));
  auto ref = hf::SafetensorsFile::open(test::fixture(name) + "/reference.safetensors");
  const Tensor ids = ref.get("input_ids").clone(), labels = ref.get("labels").clone();
  models::TrainStepOptions o;
  o.ce_scale = 1.f / static_cast<float>(test::counted_tokens(labels));
  const auto want = one.model->forward_backward({ids, &labels}, o);
  const auto results = run_parallel(name, world, ep);
  for (int r = 0; r < world; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r) + " of " + std::to_string(world) + ", ep " + std::to_string(ep));
    EXPECT_EQ(results[r].error, "");
    ASSERT_GT(results[r].tokens, 0);
    EXPECT_NEAR(results[r].ce_sum / results[r].tokens, want.ce_sum / want.tokens, 1e-5);
    if (one.model->config().output_router_logits) EXPECT_NEAR(results[r].aux, want.aux_loss, 1e-6);
  }
}

TEST(ExpertParallel, TwoRanksEpTwo) { expect_parallel_matches_one_rank("qwen3_moe_a", 2, 2); }
TEST(ExpertParallel, FourRanksEpFour) { expect_parallel_matches_one_rank("qwen3_moe_a", 4, 4); }
TEST(ExpertParallel, FourRanksDpTwoByEpTwo) { expect_parallel_matches_one_rank("qwen3_moe_a", 4, 2); }
// The load-balancing loss over the whole batch (statistics summed over the world).
TEST(ExpertParallel, LoadBalancingLossOverTheWorld) { expect_parallel_matches_one_rank("qwen3_moe_aux", 4, 2); }
TEST(ExpertParallel, TwoRanksDenseLayersAndThreeExpertsEach) { expect_parallel_matches_one_rank("qwen3_moe_b", 2, 2); }

TEST(ExpertParallel, AnEpSizeThatDoesNotDivideTheExpertsIsRefused) {
  const std::string err = test::error_of([] { parallel::ExpertShard::of(6, 0, 4); });
  EXPECT_NE(err.find("6 experts cannot be split evenly over 4 ranks"), std::string::npos) << err;
}

}  // namespace

// Nemotron-H's relu^2 experts (ungated up [E, I, H]) and, in nemotron_h_b, grouped routing and the
// latent projections around the exchanged experts.
// GPT-OSS's expert biases: their gradients, like the weights', are summed after the combine starts.
TEST(ExpertParallel, GptOssExpertBiasesTwoRanksEpTwo) { expect_parallel_matches_one_rank("gpt_oss_a", 2, 2); }
// Shared experts run while the routed rows travel (forward) and while their gradients travel
// (backward): Qwen2-MoE's gated one, DeepSeek-V3's plain ones (with MLA and grouped routing).
TEST(ExpertParallel, Qwen2MoeGatedSharedExpertTwoRanksEpTwo) { expect_parallel_matches_one_rank("qwen2_moe_b", 2, 2); }
TEST(ExpertParallel, DeepSeekV3SharedExpertsFourRanksDpTwoByEpTwo) { expect_parallel_matches_one_rank("deepseek_v3_a", 4, 2); }
TEST(ExpertParallel, NemotronHTwoRanksEpTwo) { expect_parallel_matches_one_rank("nemotron_h_a", 2, 2); }
TEST(ExpertParallel, NemotronHLatentFourRanksDpTwoByEpTwo) { expect_parallel_matches_one_rank("nemotron_h_b", 4, 2); }
