// The one layer loop's hooks, checked on the CPU with a parameter store that behaves as ZeRO-3
// storage does (gpu::DeviceParams::shard): a value may be read only between gather() and
// release(), a gradient may be written only until its parameter was reported ready, and every
// trainable parameter must be reported ready exactly once per step (the optimizer-in-backward
// path updates and frees it then). The step's results must be those of the plain store. These
// are the rules the GPU's ZeRO-3 and optimizer-in-backward paths rely on, for every family.
#include <gtest/gtest.h>

#include <set>

#include "hf/safetensors.h"
#include "models/pretrained.h"
#include "test_util.h"

using namespace moeforge;

namespace {

class StrictStore : public nn::ParamAccess {
 public:
  explicit StrictStore(nn::ParamStore& host) : host_(host), whole_(host.all().size(), false), ready_(host.all().size(), 0) {}

  const Tensor& value(size_t i) const override {
    if (!whole_[i]) ++misses_, missed_.insert(host_.all()[i].name);
    return host_.value(i);
  }
  Tensor& grad(size_t i) override {
    if (ready_[i]) late_writes_.insert(host_.all()[i].name);
    return host_.grad(i);
  }
  Device device() const override { return Device::cpu(); }
  DType compute_dtype() const override { return DType::F32; }
  bool trainable(size_t i) const override { return host_.trainable(i); }
  size_t size() const override { return host_.size(); }
  void gather(const std::vector<size_t>& idx) override {
    for (size_t i : idx) whole_[i] = true;
  }
  void prefetch(const std::vector<size_t>&) override { ++prefetches_; }
  void release(const std::vector<size_t>& idx) override {
    for (size_t i : idx) whole_[i] = false;
  }
  void scatter_grads(const std::vector<size_t>& idx) override {
    for (size_t i : idx) ++ready_[i];
  }

  mutable int64_t misses_ = 0;
  mutable std::set<std::string> missed_;
  std::set<std::string> late_writes_;
  int64_t prefetches_ = 0;
  nn::ParamStore& host_;
  std::vector<bool> whole_;
  std::vector<int> ready_;
};


}  // namespace

class LayerLoop : public ::testing::TestWithParam<std::tuple<const char*, bool>> {};

TEST_P(LayerLoop, ZeroThreeAndOptimizerInBackwardHooksKeepTheirRules) {
  const auto [name, ckpt] = GetParam();
  const std::string dir = test::fixture(name);
  auto ref = hf::SafetensorsFile::open(dir + "/reference.safetensors");
  const double mtp = test::mtp_loss_scale(ref);
  Tensor ids = ref.get("input_ids").clone(), labels = ref.get("labels").clone();
  // The plain store's step.
  auto plain = models::from_pretrained(dir);
  const models::TrainStepResult want = plain.model->forward_backward({ids, &labels}, test::step_options(*plain.model, labels, ckpt, mtp));
  // The strict store's, over a second copy, reporting every group of finished gradients.
  auto m = models::from_pretrained(dir);
  models::TrainStepOptions o = test::step_options(*m.model, labels, ckpt, mtp);
  std::vector<int> reported(m.model->params().all().size(), 0);
  o.on_grads_ready = [&](const std::vector<size_t>& idx) {
    for (size_t i : idx) ++reported[i];
  };
  StrictStore strict(m.model->params());
  const models::TrainStepResult got = m.model->forward_backward(strict, {ids, &labels}, o, m.model->parallel());

  EXPECT_EQ(strict.misses_, 0) << "read without a gather, e.g. " << *strict.missed_.begin();
  EXPECT_TRUE(strict.late_writes_.empty()) << "gradient written after it was reported ready: "
                                           << *strict.late_writes_.begin();
  EXPECT_GT(strict.prefetches_, 0);
  const auto& params = m.model->params().all();
  for (size_t i = 0; i < params.size(); ++i) {
    if (!params[i].trainable) continue;
    EXPECT_EQ(strict.ready_[i], 1) << params[i].name << ": summed into its blocks " << strict.ready_[i] << " times";
    EXPECT_EQ(reported[i], 1) << params[i].name << ": reported ready " << reported[i] << " times";
    EXPECT_FALSE(strict.whole_[i]) << params[i].name << " is still whole after the step";
  }
  EXPECT_EQ(got.ce_sum, want.ce_sum);
  EXPECT_EQ(got.tokens, want.tokens);
  for (size_t i = 0; i < params.size(); ++i)
    if (params[i].trainable)
      EXPECT_EQ(test::tensor_rel_diff(params[i].grad, plain.model->params().all()[i].grad), 0.0) << params[i].name;
  // The forward alone keeps the gather rule too, and computes the same logits.
  StrictStore fwd(m.model->params());
  const Tensor logits = m.model->forward(fwd, {ids}, m.model->parallel()).logits;
  EXPECT_EQ(fwd.misses_, 0) << "read without a gather, e.g. " << *fwd.missed_.begin();
  EXPECT_EQ(test::tensor_rel_diff(logits, plain.model->forward({ids}).logits), 0.0);
}

INSTANTIATE_TEST_SUITE_P(Families, LayerLoop,
                         ::testing::Combine(::testing::Values("qwen3_moe_aux", "mixtral_a", "qwen2_moe_a", "olmoe_a",
                                                              "llama_a", "gpt_oss_a", "deepseek_v3_a", "deepseek_v3_mtp",
                                                              "nemotron_h_a", "nemotron_h_b"),
                                            ::testing::Values(false, true)));
