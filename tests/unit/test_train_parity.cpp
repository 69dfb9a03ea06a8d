// Training against Transformers + torch.optim.AdamW (lr 1e-3, betas 0.9/0.95, eps 1e-8, weight
// decay 0.1, no clipping, fp32) on the fixtures (tools/make_fixtures.py):
//  - the first step's gradients, and the load-balancing loss's own gradient, per tensor;
//  - the three losses within 1e-5 and every weight after three steps within 1e-5 relative.
// On "relative": an element whose gradient is nonzero but below 1e-5 of its tensor's largest is
// set by fp32 rounding (two correct fp32 programs disagree on it), and Adam's g / sqrt(v) turns that
// into a full +-lr step. Such elements are held to the Adam step bound (|diff| <= 2 * steps * lr *
// 1/(1-beta1)) and counted; all others to 1e-5 of the tensor's largest weight.
#include <gtest/gtest.h>

#include <cmath>

#include "hf/safetensors.h"
#include "models/pretrained.h"
#include "test_util.h"
#include "train/optimizer.h"

using namespace moeforge;

class TrainParity : public ::testing::TestWithParam<std::tuple<const char*, bool>> {};

TEST_P(TrainParity, FirstStepGradientsMatchTorch) {
  const auto [name, ckpt] = GetParam();
  const std::string dir = test::fixture(name);
  auto ref = hf::SafetensorsFile::open(dir + "/reference.safetensors");
  auto grads = hf::SafetensorsFile::open(dir + "/reference_grads.safetensors");
  auto m = models::from_pretrained(dir);
  Tensor ids = ref.get("input_ids").clone(), labels = ref.get("labels").clone();
  m.model->forward_backward({ids, &labels}, test::step_options(*m.model, labels, ckpt, test::mtp_loss_scale(ref)));
  for (const auto& p : m.model->params().all()) {
    if (!p.trainable) {  // a buffer (DeepSeek-V3's correction bias): torch has no gradient for it either
      EXPECT_FALSE(grads.contains("grad." + p.name)) << p.name;
      continue;
    }
    ASSERT_TRUE(grads.contains("grad." + p.name)) << p.name;
    EXPECT_LT(test::tensor_rel_diff(p.grad, grads.get("grad." + p.name)), 2e-5) << p.name;
  }
  if (!m.model->config().output_router_logits) return;
  // The load-balancing loss alone (coefficient 1, no cross-entropy).
  m.model->params().zero_grad();
  models::TrainStepOptions aux_only;
  aux_only.ce_scale = 0.f;
  aux_only.aux_scale = 1.f;
  aux_only.activation_checkpointing = ckpt;
  m.model->forward_backward({ids, &labels}, aux_only);
  int checked = 0;
  for (const auto& p : m.model->params().all()) {
    if (!grads.contains("aux_grad." + p.name)) continue;  // unused by the aux loss in torch's graph
    EXPECT_LT(test::tensor_rel_diff(p.grad, grads.get("aux_grad." + p.name)), 2e-5) << p.name;
    ++checked;
  }
  EXPECT_GT(checked, 10);
}

TEST_P(TrainParity, ThreeAdamWStepsMatchTorch) {
  const auto [name, ckpt] = GetParam();
  const std::string dir = test::fixture(name);
  auto ref = hf::SafetensorsFile::open(dir + "/reference.safetensors");
  auto m = models::from_pretrained(dir);
  auto& model = *m.model;
  const double lr = 1e-3;
  train::AdamW opt(model.params(), {lr, 0.9, 0.95, 1e-8, 0.1, true});
  Tensor ids = ref.get("input_ids").clone(), labels = ref.get("labels").clone();
  Tensor want_losses = ref.get("train_losses");
  auto& params = model.params().all();
  // Per element: does any step have a nonzero gradient below 1e-5 of its tensor's largest?
  std::vector<std::vector<bool>> noisy(params.size());
  for (size_t i = 0; i < params.size(); ++i) noisy[i].assign(static_cast<size_t>(shape_numel(params[i].shape)), false);
  for (int step = 0; step < 3; ++step) {
    model.params().zero_grad();
    auto r = model.forward_backward({ids, &labels}, test::step_options(model, labels, ckpt, test::mtp_loss_scale(ref)));
    EXPECT_NEAR(test::reference_loss(model, r, test::mtp_loss_scale(ref)), want_losses.item_f32(step), 1e-5) << "step " << step;
    for (size_t i = 0; i < params.size(); ++i) test::note_noise(noisy[i], params[i].grad.to_f32_vector());
    opt.step(lr);
  }
  auto after = models::from_pretrained(dir + "/after_adamw");
  const auto [noisy_total, total] = test::weights_match(params, after.model->params().all(), noisy, 2 * 3 * lr / (1 - 0.9));
  RecordProperty("noise_level_elements", std::to_string(noisy_total) + " of " + std::to_string(total));
  EXPECT_LT(noisy_total, total / 100) << "too many elements at fp32 noise level for the test to mean much";
}

// DeepSeek-V3's multi-token prediction: the fixture holds two depths and trains with their loss.
TEST(MtpTraining, FirstStepLossesPerDepthMatchTorch) {
  const std::string dir = test::fixture("deepseek_v3_mtp");
  auto ref = hf::SafetensorsFile::open(dir + "/reference.safetensors");
  auto m = models::from_pretrained(dir);
  ASSERT_EQ(m.model->mtp_depths(), 2);
  Tensor ids = ref.get("input_ids").clone(), labels = ref.get("labels").clone();
  const auto r = m.model->forward_backward({ids, &labels}, test::step_options(*m.model, labels, false, test::mtp_loss_scale(ref)));
  EXPECT_NEAR(r.ce_sum / r.tokens, ref.get("main_loss").item_f32(), 1e-5);
  ASSERT_EQ(r.mtp_ce_sums.size(), 2u);
  for (size_t k = 0; k < 2; ++k)
    EXPECT_NEAR(r.mtp_ce_sums[k] / r.mtp_tokens[k], ref.get("mtp_losses").to_f32_vector()[k], 1e-5) << "depth " << k + 1;
}

TEST(MtpTraining, FrozenWithoutTheLossAndSavedBackUnchanged) {
  const std::string dir = test::fixture("deepseek_v3_mtp");
  auto ref = hf::SafetensorsFile::open(dir + "/reference.safetensors");
  auto m = models::from_pretrained(dir);
  m.model->set_mtp_trainable(false);
  int frozen = 0;
  for (const auto& p : m.model->params().all())
    if (p.name.rfind("model.layers.2.", 0) == 0 || p.name.rfind("model.layers.3.", 0) == 0) {
      EXPECT_FALSE(p.trainable) << p.name;
      ++frozen;
    }
  EXPECT_GT(frozen, 10);
  // No MTP loss asked: the step is the main model's alone, and AdamW leaves the depths as loaded.
  train::AdamW opt(m.model->params(), {1e-3, 0.9, 0.95, 1e-8, 0.1, true});
  Tensor ids = ref.get("input_ids").clone(), labels = ref.get("labels").clone();
  const auto r = m.model->forward_backward({ids, &labels}, test::step_options(*m.model, labels, false, 0.0));
  EXPECT_TRUE(r.mtp_ce_sums.empty());
  EXPECT_NEAR(r.ce_sum / r.tokens, ref.get("main_loss").item_f32(), 1e-5);
  opt.step(1e-3);
  auto fresh = models::from_pretrained(dir);
  const auto& got = m.model->params().all();
  const auto& want = fresh.model->params().all();
  for (size_t i = 0; i < got.size(); ++i)
    if (!got[i].trainable) EXPECT_EQ(test::max_abs_diff(got[i].value, want[i].value), 0.f) << got[i].name;
}

TEST(MtpTraining, AskedOfAModelWithoutMtpLayersIsAnError) {
  // Transformers writes no MTP tensors: the config's num_nextn_predict_layers builds nothing.
  auto m = models::from_pretrained(test::fixture("deepseek_v3_a"));
  EXPECT_EQ(m.model->config().num_nextn_predict_layers, 1);
  EXPECT_EQ(m.model->mtp_depths(), 0);
  models::TrainStepOptions o;
  o.mtp_scales = {0.1f};
  Tensor ids = Tensor::from_i64({1, 2, 3, 4}, {1, 4}), labels = ids.clone();
  EXPECT_NE(test::error_of([&] { m.model->forward_backward({ids, &labels}, o); }).find("multi-token prediction"),
            std::string::npos);
}

INSTANTIATE_TEST_SUITE_P(Qwen3Moe, TrainParity,
                         ::testing::Combine(::testing::Values("qwen3_moe_a", "qwen3_moe_b", "qwen3_moe_aux"),
                                            ::testing::Values(false, true)));
INSTANTIATE_TEST_SUITE_P(Families, TrainParity,
                         ::testing::Combine(::testing::Values("mixtral_a", "mixtral_b", "qwen2_moe_a", "qwen2_moe_b",
                                                              "olmoe_a", "olmoe_b", "llama_a", "llama_b", "mistral_a",
                                                              "mistral_b", "qwen2_a", "qwen2_b", "qwen3_a", "qwen3_b",
                                                              "gpt_oss_a", "gpt_oss_b", "deepseek_v3_a", "deepseek_v3_b"),
                                            ::testing::Values(false)));
INSTANTIATE_TEST_SUITE_P(NemotronH, TrainParity,
                         ::testing::Combine(::testing::Values("nemotron_h_a", "nemotron_h_b"), ::testing::Values(false, true)));
INSTANTIATE_TEST_SUITE_P(DeepseekMtp, TrainParity,
                         ::testing::Combine(::testing::Values("deepseek_v3_mtp"), ::testing::Values(false, true)));

// Packed rows (`packing: true`) and Nemotron-H's Mamba2 mixer: each document of a packed row is
// its own sequence (the conv window and the scan state restart at its first token, attention stays
// inside it), so a row packing two documents gives the losses and gradients of the two run apart.
TEST(NemotronHPacking, APackedRowIsItsDocumentsRunApart) {
  auto m = models::from_pretrained(test::fixture("nemotron_h_a"));
  auto& model = *m.model;
  const std::vector<int64_t> doc1 = {5, 17, 3, 40, 22}, doc2 = {9, 61, 8, 8, 30, 2, 77};
  auto run = [&](const std::vector<int64_t>& ids, const std::vector<int64_t>& labels, const std::vector<int64_t>* docs) {
    const int64_t s = static_cast<int64_t>(ids.size());
    Tensor in = Tensor::from_i64(ids, {1, s}), lab = Tensor::from_i64(labels, {1, s}), doc, pos;
    models::ForwardInputs fi{in, &lab};
    std::vector<int64_t> p(static_cast<size_t>(s));
    if (docs) {
      doc = Tensor::from_i64(*docs, {1, s});
      for (int64_t i = 0; i < s; ++i) p[i] = i == 0 || (*docs)[i] != (*docs)[i - 1] ? 0 : p[i - 1] + 1;
      pos = Tensor::from_i64(p, {1, s});
      fi.doc_ids = &doc;
      fi.position_ids = &pos;
    }
    models::TrainStepOptions o;  // summed cross-entropy: the two runs add up to the packed one
    return model.forward_backward(fi, o);
  };
  model.params().ensure_grads();
  model.params().zero_grad();
  const auto a = run(doc1, doc1, nullptr);
  const auto b = run(doc2, doc2, nullptr);
  std::vector<Tensor> apart;
  for (const auto& p : model.params().all()) apart.push_back(p.grad.clone());
  model.params().zero_grad();
  std::vector<int64_t> ids = doc1, labels = doc1, docs(doc1.size(), 0);
  ids.insert(ids.end(), doc2.begin(), doc2.end());
  labels.insert(labels.end(), doc2.begin(), doc2.end());
  labels[doc1.size()] = -100;  // doc 1's last token predicts nothing across the boundary
  docs.resize(ids.size(), 1);
  const auto packed = run(ids, labels, &docs);
  EXPECT_EQ(packed.tokens, a.tokens + b.tokens);
  EXPECT_NEAR(packed.ce_sum, a.ce_sum + b.ce_sum, 1e-5 * std::abs(a.ce_sum + b.ce_sum));
  const auto& params = model.params().all();
  for (size_t i = 0; i < params.size(); ++i)
    if (params[i].trainable) EXPECT_LT(test::tensor_rel_diff(params[i].grad, apart[i]), 1e-5) << params[i].name;
  // And the boundary matters: without doc_ids the packed row is one sequence, with other gradients.
  model.params().zero_grad();
  const auto joined = run(ids, labels, nullptr);
  EXPECT_GT(std::abs(joined.ce_sum - packed.ce_sum), 1e-3);
}
