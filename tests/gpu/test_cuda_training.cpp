// The GPU training step (src/gpu) against Transformers + torch.optim.AdamW on the fixtures, as
// tests/unit/test_train_parity.cpp holds the CPU path: first-step gradients (and the load-balancing
// loss's own), three AdamW steps' losses and weights, with and without activation checkpointing,
// in fp32 (tight). The bf16 and bf16-mixed policies are held loosely to Transformers' fp32 losses,
// and balanced routing to the CPU model replaying the same round-robin assignment. Skipped
// without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>

#include "gpu/adamw.h"
#include "device_run.h"
#include "hf/safetensors.h"
#include "models/lora.h"
#include "models/pretrained.h"
#include "ops/cuda/runtime.h"
#include "ops/ops.h"
#include "test_util.h"
#include "train/gradients.h"
#include "train/trainer.h"

using namespace moeforge;

namespace {

#define REQUIRE_GPU() \
  if (!cuda::available()) GTEST_SKIP() << "no CUDA device on this machine"

// Call before the model is uploaded: the MTP layers' parameters train only when mtp_scale > 0.

// What the fp32 parity tests start from: a fixture's model, its reference batch and step options,
// and the model's fp32 device copy.
struct Fp32Run {
  std::string dir;
  hf::SafetensorsFile ref;
  models::LoadedModel m;
  Tensor ids, labels;
  double mtp_scale = 0;
  models::TrainStepOptions opts;
  std::unique_ptr<test::DeviceRun> gm;
};

Fp32Run fp32_run(const char* name, bool ckpt) {
  Fp32Run r;
  r.dir = test::fixture(name);
  r.ref = hf::SafetensorsFile::open(r.dir + "/reference.safetensors");
  r.m = models::from_pretrained(r.dir);
  r.ids = r.ref.get("input_ids").clone();
  r.labels = r.ref.get("labels").clone();
  r.mtp_scale = test::mtp_loss_scale(r.ref);
  r.opts = test::step_options(*r.m.model, r.labels, ckpt, r.mtp_scale);
  r.gm = test::on_device(*r.m.model, gpu::DeviceParams(r.m.model->params(), gpu::Precision::FP32));
  return r;
}

}  // namespace

class CudaTraining : public ::testing::TestWithParam<std::tuple<const char*, bool>> {};

TEST_P(CudaTraining, Fp32FirstStepGradientsMatchTorch) {
  REQUIRE_GPU();
  const auto [name, ckpt] = GetParam();
  auto [dir, ref, m, ids, labels, mtp_scale, opts, gm] = fp32_run(name, ckpt);
  auto grads = hf::SafetensorsFile::open(dir + "/reference_grads.safetensors");
  gm->forward_backward({ids, &labels}, opts);
  const auto& params = m.model->params().all();
  // The CPU model's gradients too: where the GPU's distance to torch exceeds the CPU's by far, the
  // tensor is printed (a diagnostic for the three-step test, which amplifies small differences).
  models::TrainStepOptions cpu_opts;
  cpu_opts.ce_scale = opts.ce_scale;
  cpu_opts.aux_scale = opts.aux_scale;
  cpu_opts.mtp_scales = opts.mtp_scales;
  m.model->forward_backward({ids, &labels}, cpu_opts);
  double worst = 0;
  std::string worst_name;
  for (size_t i = 0; i < params.size(); ++i) {
    if (!params[i].trainable) continue;  // a buffer (DeepSeek-V3's correction bias): no gradient on either side
    ASSERT_TRUE(grads.contains("grad." + params[i].name)) << params[i].name;
    const Tensor want = grads.get("grad." + params[i].name);
    const double gpu_diff = test::tensor_rel_diff(cuda::to_host_f32(gm->params().grad(i)), want);
    const double cpu_diff = test::tensor_rel_diff(params[i].grad, want);
    EXPECT_LT(gpu_diff, 5e-5) << params[i].name;
    if (gpu_diff > std::max(worst, 4 * cpu_diff)) {
      worst = gpu_diff;
      worst_name = params[i].name + " (CPU " + std::to_string(cpu_diff) + ")";
    }
  }
  if (worst > 1e-5) std::printf("  [%s] largest GPU-only gradient difference: %.3g at %s\n", name, worst, worst_name.c_str());
  if (!m.model->config().output_router_logits) return;
  gm->params().zero_grad();
  models::TrainStepOptions aux_only = test::step_options(*m.model, labels, ckpt);
  aux_only.ce_scale = 0.f;
  aux_only.aux_scale = 1.f;
  gm->forward_backward({ids, &labels}, aux_only);
  int checked = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    if (!grads.contains("aux_grad." + params[i].name)) continue;
    EXPECT_LT(test::tensor_rel_diff(cuda::to_host_f32(gm->params().grad(i)), grads.get("aux_grad." + params[i].name)), 5e-5)
        << params[i].name;
    ++checked;
  }
  EXPECT_GT(checked, 10);
}

// A step's first contribution to a weight gradient overwrites it (DeviceParams::grad_for_write
// hands it out unzeroed), later ones add: the first backward matches torch above, so a second
// backward of the same batch without zero_grad must give exactly twice the gradients -- every
// gradient site, including the chunked LM head and the experts' grouped GEMMs, takes the adding path
// the second time. Then released gradients start over from the overwrite.
TEST_P(CudaTraining, SecondBackwardAddsToTheFirst) {
  REQUIRE_GPU();
  const auto [name, ckpt] = GetParam();
  auto [dir, ref, m, ids, labels, mtp_scale, opts, gm] = fp32_run(name, ckpt);
  gm->forward_backward({ids, &labels}, opts);
  const auto& params = m.model->params().all();
  std::vector<Tensor> once(params.size());
  std::vector<size_t> with_grad;
  for (size_t i = 0; i < params.size(); ++i)
    if (gm->params().has_grad(i)) {
      once[i] = cuda::to_host_f32(gm->params().grad(i));
      with_grad.push_back(i);
    }
  ASSERT_FALSE(with_grad.empty());
  gm->forward_backward({ids, &labels}, opts);
  for (size_t i : with_grad) {
    Tensor twice = once[i].clone();
    ops::add_inplace(twice, once[i]);
    EXPECT_LT(test::tensor_rel_diff(cuda::to_host_f32(gm->params().grad(i)), twice), 1e-6) << params[i].name;
  }
  gm->params().release_grads(with_grad);
  gm->forward_backward({ids, &labels}, opts);
  for (size_t i : with_grad)
    EXPECT_LT(test::tensor_rel_diff(cuda::to_host_f32(gm->params().grad(i)), once[i]), 1e-6) << params[i].name;
}

// Losses within 1e-5 and weights within 1e-5 of each tensor's largest, with the CPU test's
// allowance for elements whose gradient sits at fp32 noise level (see test_train_parity.cpp).
TEST_P(CudaTraining, Fp32ThreeAdamWStepsMatchTorch) {
  REQUIRE_GPU();
  const auto [name, ckpt] = GetParam();
  auto [dir, ref, m, ids, labels, mtp_scale, opts, gm] = fp32_run(name, ckpt);
  const double lr = 1e-3;
  gpu::DeviceAdamW opt(gm->params(), {lr, 0.9, 0.95, 1e-8, 0.1, true});
  Tensor want_losses = ref.get("train_losses");
  auto& params = m.model->params().all();
  std::vector<std::vector<bool>> noisy(params.size());
  for (size_t i = 0; i < params.size(); ++i) noisy[i].assign(static_cast<size_t>(shape_numel(params[i].shape)), false);
  std::vector<std::vector<std::vector<float>>> step_grads(params.size());  // for the diagnosis below
  auto grads = hf::SafetensorsFile::open(dir + "/reference_grads.safetensors");
  for (int step = 0; step < 3; ++step) {
    gm->params().zero_grad();
    const auto r = gm->forward_backward({ids, &labels}, opts);
    EXPECT_NEAR(test::reference_loss(*m.model, r, mtp_scale), want_losses.item_f32(step), 1e-5) << "step " << step;
    for (size_t i = 0; i < params.size(); ++i) {
      step_grads[i].push_back(cuda::to_host_f32(gm->params().grad(i)).to_f32_vector());
      test::note_noise(noisy[i], step_grads[i].back());
      // Transformers' first-step gradient is known: elements it and this build disagree on by more
      // than 1% are noise too (test_util.h).
      if (step == 0 && params[i].trainable && grads.contains("grad." + params[i].name))
        test::note_inexact(noisy[i], step_grads[i].back(), grads.get("grad." + params[i].name).to_f32_vector(), 1e-2);
    }
    opt.step(lr);
  }
  gm->params().copy_to_host(m.model->params());
  auto after = models::from_pretrained(dir + "/after_adamw");
  const auto [noisy_total, total] = test::weights_match(params, after.model->params().all(), noisy, 2 * 3 * lr / (1 - 0.9));
  EXPECT_LT(noisy_total, total / 100);
  // Where a weight is off, its gradient in each step beside Transformers' first-step one.
  for (size_t i = 0; i < params.size(); ++i) {
    const auto g = params[i].value.to_f32_vector(), w = after.model->params().all()[i].value.to_f32_vector();
    float wmax = 0;
    for (float x : w) wmax = std::max(wmax, std::abs(x));
    for (size_t j = 0; j < g.size(); ++j)
      if (!noisy[i][j] && std::abs(g[j] - w[j]) > 1e-5f * wmax && grads.contains("grad." + params[i].name)) {
        const auto ref = grads.get("grad." + params[i].name).to_f32_vector();
        std::printf("  %s[%zu]: gradient per step %.9g %.9g %.9g, Transformers' first %.9g\n", params[i].name.c_str(), j,
                    step_grads[i][0][j], step_grads[i][1][j], step_grads[i][2][j], ref[j]);
        break;
      }
  }
}

INSTANTIATE_TEST_SUITE_P(Qwen3Moe, CudaTraining,
                         ::testing::Combine(::testing::Values("qwen3_moe_a", "qwen3_moe_b", "qwen3_moe_aux"),
                                            ::testing::Values(false, true)));
INSTANTIATE_TEST_SUITE_P(Families, CudaTraining,
                         ::testing::Combine(::testing::Values("mixtral_a", "mixtral_b", "qwen2_moe_a", "qwen2_moe_b",
                                                              "olmoe_a", "olmoe_b", "llama_a", "llama_b", "mistral_a",
                                                              "qwen2_a", "qwen2_b", "qwen3_a", "qwen3_b", "gpt_oss_a",
                                                              "gpt_oss_b", "deepseek_v3_a", "deepseek_v3_b", "deepseek_v3_mtp"),
                                            ::testing::Values(false, true)));
INSTANTIATE_TEST_SUITE_P(NemotronH, CudaTraining,
                         ::testing::Combine(::testing::Values("nemotron_h_a", "nemotron_h_b"), ::testing::Values(false, true)));

// LoRA on the GPU against Transformers + PEFT (the fixtures' lora/ folders, as tests/unit/test_lora.cpp
// on the CPU): three AdamW steps in fp32, the adapters' weights after them; and under bf16-mixed the
// frozen base keeps no F32 master.
class CudaLora : public ::testing::TestWithParam<const char*> {};

// The lora/ cases, and qwen3_moe_a's lora_experts/ (the routed experts' adapters through the grouped GEMMs).
TEST_P(CudaLora, Fp32ThreeAdamWStepsMatchPeft) {
  REQUIRE_GPU();
  const std::string param = GetParam(), name = param.substr(0, param.find('/'));
  const std::string dir = test::fixture(name), lora = dir + (param.ends_with("/experts") ? "/lora_experts" : "/lora");
  auto ref = hf::SafetensorsFile::open(lora + "/reference.safetensors");
  auto m = models::from_pretrained(dir);
  const models::LoraState st = models::apply_adapter_folder(*m.model, lora + "/adapter_init");
  Tensor ids = ref.get("input_ids").clone(), labels = ref.get("labels").clone();
  const models::TrainStepOptions opts = test::step_options(*m.model, labels, false, 0.0);
  auto gm = test::on_device(*m.model, gpu::DeviceParams(m.model->params(), gpu::Precision::FP32));
  const double lr = 1e-3;
  gpu::DeviceAdamW opt(gm->params(), {lr, 0.9, 0.95, 1e-8, 0.1, true});
  const std::vector<float> want_losses = ref.get("train_losses").to_f32_vector();
  for (int step = 0; step < 3; ++step) {
    gm->params().zero_grad();
    const auto r = gm->forward_backward({ids, &labels}, opts);
    EXPECT_NEAR(test::reference_loss(*m.model, r, 0.0), want_losses[step], 1e-5) << "step " << step;
    opt.step(lr);
  }
  gm->params().copy_to_host(m.model->params());
  // The adapter as written (per expert for the experts) against PEFT's, tensor by tensor: within
  // 1e-5 of each tensor's largest, or (at most 1%: fp32-noise gradients Adam turns into full steps)
  // within the Adam step bound.
  test::TempDir tmp;
  models::save_adapter(*m.model, st, dir, tmp / "after", false);
  test::expect_adapters_match(tmp / "after/adapter_model.safetensors", lora + "/adapter_after/adapter_model.safetensors",
                              2 * 3 * lr / (1 - 0.9));
}

class CudaLoraMemory : public ::testing::TestWithParam<const char*> {};

TEST_P(CudaLoraMemory, FrozenBaseKeepsNoF32MasterUnderBf16Mixed) {
  REQUIRE_GPU();
  const std::string dir = test::fixture(GetParam());
  auto full = models::from_pretrained(dir);
  const int64_t full_bytes = gpu::DeviceParams(full.model->params(), gpu::Precision::BF16Mixed).bytes();
  auto m = models::from_pretrained(dir);
  models::LoraOptions o = models::read_adapter_config(dir + "/lora/adapter_init");
  models::apply_lora(*m.model, o, 1, "test");
  int64_t lora_numel = 0, base_numel = 0;
  for (const auto& p : m.model->params().all()) (p.lora ? lora_numel : base_numel) += shape_numel(p.shape);
  const int64_t lora_bytes = gpu::DeviceParams(m.model->params(), gpu::Precision::BF16Mixed).bytes();
  // Full: BF16 copy + F32 master of everything (6 bytes each); LoRA: BF16 base (2 bytes), the adapters 6.
  EXPECT_EQ(full_bytes, 6 * base_numel);
  EXPECT_LE(lora_bytes, 2 * base_numel + 6 * lora_numel + 4 * 1024);  // + the few buffers that keep masters
}

INSTANTIATE_TEST_SUITE_P(Families, CudaLoraMemory, ::testing::Values("llama_a", "qwen3_moe_a", "deepseek_v3_a", "nemotron_h_a"));
INSTANTIATE_TEST_SUITE_P(Families, CudaLora,
                         ::testing::Values("llama_a", "qwen3_moe_a", "deepseek_v3_a", "nemotron_h_a", "qwen3_moe_a/experts",
                                           "gpt_oss_a/experts", "qwen2_moe_a/experts", "nemotron_h_a/experts"),
                         [](const auto& info) {
                           std::string n = info.param;
                           std::replace(n.begin(), n.end(), '/', '_');
                           return n;
                         });

class CudaTrainingPolicies : public ::testing::TestWithParam<const char*> {};

// How many tokens' sets of chosen experts differ between two runs' routing (every MoE layer).
static int64_t routing_differences(const std::vector<Tensor>& a, const std::vector<Tensor>& b, int64_t* choices) {
  EXPECT_EQ(a.size(), b.size());
  int64_t differ = 0;
  *choices = 0;
  for (size_t l = 0; l < std::min(a.size(), b.size()); ++l) {
    const int64_t t = a[l].size(0), k = a[l].size(1);
    for (int64_t r = 0; r < t; ++r) {
      std::vector<int64_t> x(a[l].i64() + r * k, a[l].i64() + (r + 1) * k), y(b[l].i64() + r * k, b[l].i64() + (r + 1) * k);
      std::sort(x.begin(), x.end());
      std::sort(y.begin(), y.end());
      differ += x != y;
      ++*choices;
    }
  }
  return differ;
}

// bf16 and bf16-mixed are rounding away from fp32, and a rounded router can flip a near-tied
// top-k choice: one token sent to other experts moves a 48-token loss by up to a few percent, in
// Transformers' own bf16 runs as here. So the arithmetic is held to Transformers' fp32 losses with
// the fp32 run's expert choices replayed at every step (the router's weights still computed at the
// policy's precision): within 2% under bf16-mixed (F32 masters; or twice Transformers' own
// bf16-autocast distance where the fixture records it) and 5% under bf16, whose weights and moments
// are rounded to BF16 at every step as torch AdamW does on a BF16 model. With free routing, the first
// loss (the forward alone) within 2%, and the third step's loss below the first (training moves the
// same way). Printed per step: both distances and how many tokens free routing sends elsewhere than
// the fp32 run.
TEST_P(CudaTrainingPolicies, Bf16PoliciesTrackTorchLosses) {
  REQUIRE_GPU();
  const std::string dir = test::fixture(GetParam());
  auto ref = hf::SafetensorsFile::open(dir + "/reference.safetensors");
  Tensor ids = ref.get("input_ids").clone(), labels = ref.get("labels").clone();
  Tensor want = ref.get("train_losses");
  const bool anchored = ref.contains("train_losses_bf16_autocast");
  const Tensor autocast = anchored ? ref.get("train_losses_bf16_autocast") : Tensor();
  const train::AdamWOptions ao{1e-3, 0.9, 0.95, 1e-8, 0.1, true};
  // The fp32 run's routing at each step.
  std::vector<std::vector<Tensor>> fp32_routing;
  {
    auto m = models::from_pretrained(dir);
    auto gm = test::on_device(*m.model, gpu::DeviceParams(m.model->params(), gpu::Precision::FP32));
    gpu::DeviceAdamW opt(gm->params(), ao);
    for (int step = 0; step < 3; ++step) {
      gm->params().zero_grad();
      gm->forward_backward({ids, &labels}, test::step_options(*m.model, labels, false));
      fp32_routing.push_back(gm->last_routing());
      opt.step(1e-3);
    }
  }
  const bool moe = !fp32_routing.front().empty();
  for (gpu::Precision p : {gpu::Precision::BF16, gpu::Precision::BF16Mixed}) {
    for (const bool replay : {false, true}) {
      if (replay && !moe) continue;  // a dense model has nothing to replay
      auto m = models::from_pretrained(dir);
      auto gm = test::on_device(*m.model, gpu::DeviceParams(m.model->params(), p));
      gpu::DeviceAdamW opt(gm->params(), ao);
      std::vector<double> losses;
      for (int step = 0; step < 3; ++step) {
        gm->params().zero_grad();
        models::RoutingControl held{models::RoutingControl::Mode::Replay, {}};
        for (const Tensor& c : fp32_routing[step]) held.chosen.push_back(c.clone());
        models::ForwardInputs in{ids, &labels};
        if (replay) in.routing = &held;
        const auto r = gm->forward_backward(in, test::step_options(*m.model, labels, false));
        losses.push_back(test::reference_loss(*m.model, r, 0.0));
        int64_t choices = 0, differ = 0;
        if (!replay) differ = routing_differences(gm->last_routing(), fp32_routing[step], &choices);
        double rel = step == 0 || p == gpu::Precision::BF16Mixed ? 0.02 : 0.05;
        const double off = std::abs(losses.back() - want.item_f32(step)) / want.item_f32(step);
        double torch_rel = -1;
        if (anchored) {
          torch_rel = std::abs(autocast.item_f32(step) - want.item_f32(step)) / want.item_f32(step);
          if (p == gpu::Precision::BF16Mixed) rel = std::max(rel, 2 * torch_rel);
        }
        std::printf("  [%s] %s %s step %d: %.4f off fp32 (Transformers' autocast %.4f)", GetParam(),
                    gpu::precision_name(p), replay ? "fp32 routing" : "free routing", step, off, torch_rel);
        if (!replay)
          std::printf("; %lld of %lld tokens routed otherwise than the fp32 run", static_cast<long long>(differ),
                      static_cast<long long>(choices));
        std::printf("\n");
        if (replay || !moe || step == 0)
          EXPECT_NEAR(losses.back(), want.item_f32(step), rel * want.item_f32(step))
              << gpu::precision_name(p) << (replay ? " (fp32 routing)" : "") << " step " << step;
        opt.step(1e-3);
      }
      EXPECT_LT(losses[2], losses[0]) << gpu::precision_name(p);
    }
  }
}

// Balanced routing on the GPU (token t's slot j -> expert (t*k + j) mod E, the router's
// probabilities as weights) against the CPU model replaying that assignment: same loss and
// gradients in fp32.
TEST_P(CudaTrainingPolicies, BalancedRoutingMatchesCpuReplay) {
  REQUIRE_GPU();
  const std::string dir = test::fixture(GetParam());
  auto ref = hf::SafetensorsFile::open(dir + "/reference.safetensors");
  Tensor ids = ref.get("input_ids").clone(), labels = ref.get("labels").clone();
  auto m = models::from_pretrained(dir);
  const auto& cfg = m.model->config();
  auto gm = test::on_device(*m.model, gpu::DeviceParams(m.model->params(), gpu::Precision::FP32));
  models::TrainStepOptions go = test::step_options(*m.model, labels, false);
  models::RoutingControl balanced{models::RoutingControl::Mode::Balanced, {}};
  models::ForwardInputs bin{ids, &labels};
  bin.routing = &balanced;
  const auto gr = gm->forward_backward(bin, go);

  const int64_t t = ids.numel(), k = cfg.num_experts_per_tok;
  std::vector<int64_t> rr(static_cast<size_t>(t * k));
  for (int64_t i = 0; i < t * k; ++i) rr[i] = i % cfg.num_experts;
  models::RoutingControl replay;
  replay.mode = models::RoutingControl::Mode::Replay;
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l)
    if (cfg.is_moe_layer(l)) replay.chosen.push_back(Tensor::from_i64(rr, {t, k}));
  models::TrainStepOptions co;
  co.ce_scale = go.ce_scale;
  co.aux_scale = go.aux_scale;
  models::ForwardInputs in{ids, &labels};
  in.routing = &replay;
  m.model->params().ensure_grads();
  m.model->params().zero_grad();
  const auto cr = m.model->forward_backward(in, co);
  EXPECT_NEAR(gr.ce_sum / gr.tokens, cr.ce_sum / cr.tokens, 1e-5);
  const auto& params = m.model->params().all();
  for (size_t i = 0; i < params.size(); ++i)
    EXPECT_LT(test::tensor_rel_diff(cuda::to_host_f32(gm->params().grad(i)), params[i].grad), 5e-5) << params[i].name;
}

// AdamW applied layer by layer inside backward (each layer's gradients freed once applied) is the
// same update as a step after backward: three steps, same losses and weights (fp32, identical
// per-element arithmetic), and the gradients really are released.
TEST_P(CudaTrainingPolicies, OptimizerInBackwardMatchesStepAfterBackward) {
  REQUIRE_GPU();
  const std::string dir = test::fixture(GetParam());
  auto ref = hf::SafetensorsFile::open(dir + "/reference.safetensors");
  Tensor ids = ref.get("input_ids").clone(), labels = ref.get("labels").clone();
  auto m = models::from_pretrained(dir);
  const train::AdamWOptions ao{1e-3, 0.9, 0.95, 1e-8, 0.1, true};
  auto a = test::on_device(*m.model, gpu::DeviceParams(m.model->params(), gpu::Precision::FP32));
  auto b = test::on_device(*m.model, gpu::DeviceParams(m.model->params(), gpu::Precision::FP32));
  gpu::DeviceAdamW opt_a(a->params(), ao), opt_b(b->params(), ao);
  const auto& params = m.model->params().all();
  std::vector<std::vector<bool>> noisy(params.size());
  for (size_t i = 0; i < params.size(); ++i) noisy[i].assign(static_cast<size_t>(shape_numel(params[i].shape)), false);
  for (int step = 0; step < 3; ++step) {
    a->params().zero_grad();
    const auto ra = a->forward_backward({ids, &labels}, test::step_options(*m.model, labels, false));
    for (size_t i = 0; i < params.size(); ++i)
      test::note_noise(noisy[i], cuda::to_host_f32(a->params().grad(i)).to_f32_vector());
    opt_a.step(1e-3);
    models::TrainStepOptions ob = test::step_options(*m.model, labels, false);
    opt_b.begin_step(1e-3);
    size_t applied = 0;
    ob.on_grads_ready = [&](const std::vector<size_t>& idx) {
      opt_b.update(idx);
      b->params().release_grads(idx);
      applied += idx.size();
    };
    const auto rb = b->forward_backward({ids, &labels}, ob);
    EXPECT_EQ(applied, m.model->params().all().size()) << "every parameter applied exactly once";
    for (size_t i = 0; i < b->params().size(); ++i) EXPECT_FALSE(b->params().has_grad(i)) << "gradient " << i << " kept";
    EXPECT_NEAR(test::reference_loss(*m.model, ra, 0.0), test::reference_loss(*m.model, rb, 0.0), 1e-6) << "step " << step;
  }
  // The two runs differ only in when AdamW runs, but their gradients are not bit-identical (some
  // backward reductions, e.g. cuDNN's attention and the float atomics of the embedding gradient, do
  // not fix their order), so the weights are held as in the parity tests: 1e-5 of each tensor's
  // largest, and elements whose gradient sits at fp32 noise level (where Adam's g / sqrt(v)
  // amplifies a last-bit difference to a full step) to the Adam step bound. Measured: 7 of 20
  // repetitions differed by up to 3.3e-5 in one such element of a router weight.
  auto ma = models::from_pretrained(dir), mb = models::from_pretrained(dir);
  a->params().copy_to_host(ma.model->params());
  b->params().copy_to_host(mb.model->params());
  const auto [noisy_total, total] = test::weights_match(mb.model->params().all(), ma.model->params().all(), noisy, 2 * 3 * 1e-3 / (1 - 0.9));
  EXPECT_LT(noisy_total, total / 100);
}

// The gradient norm as `train` takes it (train::sum_gradients, which adds the experts' partial
// squares left by their weight-gradient kernel instead of reading those gradients) against every
// gradient read (ops::global_grad_norm over all of them), BF16, where the ragged kernel runs (a
// build with CUTLASS on sm_90: then at least one gradient must have come with partial squares). Both
// sum F32 partials in F64, in other groupings: 1e-5 relative. Then a second backward that adds to
// the gradients must drop the squares (they described the first backward's gradient alone).
TEST_P(CudaTrainingPolicies, GradientNormFromPartialSquaresEqualsReadingEveryGradient) {
  REQUIRE_GPU();
  const std::string dir = test::fixture(GetParam());
  auto ref = hf::SafetensorsFile::open(dir + "/reference.safetensors");
  Tensor ids = ref.get("input_ids").clone(), labels = ref.get("labels").clone();
  auto m = models::from_pretrained(dir);
  auto gm = test::on_device(*m.model, gpu::DeviceParams(m.model->params(), gpu::Precision::BF16));
  gpu::DeviceParams& ps = gm->params();
  ps.keep_squares(true);
  std::vector<size_t> every;
  for (size_t i = 0; i < ps.size(); ++i)
    if (ps.trainable(i)) every.push_back(i);
  const auto norms = [&](int* with_squares) {
    *with_squares = 0;
    for (size_t i : every) *with_squares += ps.grad_squares(i) != nullptr;
    train::GradSquares sq;
    train::sum_gradients(nullptr, ps, every, &sq);
    const double from_squares = train::whole_norm(nullptr, sq);
    std::vector<Tensor> grads, rows;
    for (size_t i : every) {
      Tensor written;
      grads.push_back(ps.grad_as_written(i, written));
      rows.push_back(written);
    }
    return std::pair{from_squares, ops::global_grad_norm(grads, rows)};
  };
  gm->forward_backward({ids, &labels}, test::step_options(*m.model, labels, false));
  int with_squares = 0;
  const auto [once_squares, once_read] = norms(&with_squares);
  EXPECT_NEAR(once_squares, once_read, 1e-5 * once_read) << "first backward";
#ifdef MOEFORGE_HAVE_CUTLASS
  // The test machines are H100s and H200s (sm_90), where BF16 experts take the ragged kernel when
  // the gate_up gradient's rows and columns are whole 16-byte vectors (qwen2_moe_b's 10-wide
  // experts are not).
  const auto& cfg = m.model->config();
  if (cfg.num_experts > 0 && cfg.hidden_size % 8 == 0 && cfg.moe_intermediate_size % 4 == 0)
    EXPECT_GT(with_squares, 0) << "no expert gradient came with partial squares";
#endif
  std::printf("  [%s] %d of %zu gradients with partial squares; norm %.6g (read: %.6g)\n", GetParam(), with_squares,
              every.size(), once_squares, once_read);
  gm->forward_backward({ids, &labels}, test::step_options(*m.model, labels, false));
  const auto [twice_squares, twice_read] = norms(&with_squares);
  EXPECT_EQ(with_squares, 0) << "a gradient added to kept the first backward's partial squares";
  EXPECT_NEAR(twice_squares, twice_read, 1e-5 * twice_read) << "second backward";
  EXPECT_NEAR(twice_read, 2 * once_read, 1e-2 * once_read) << "the second backward adds the same gradients";
}

INSTANTIATE_TEST_SUITE_P(Qwen3Moe, CudaTrainingPolicies, ::testing::Values("qwen3_moe_a", "qwen3_moe_b", "qwen3_moe_aux"));
// The MoE families with their optional pieces (shared expert, clip_qkv, window layers, biases).
INSTANTIATE_TEST_SUITE_P(Families, CudaTrainingPolicies,
                         ::testing::Values("mixtral_b", "qwen2_moe_b", "olmoe_b", "gpt_oss_b", "deepseek_v3_a"));

// `moeforge train` with device: cuda (fp32) against the same recipe on the CPU: accumulation,
// clipping, a cosine schedule and the load-balancing loss on qwen3_moe_aux, six steps with a
// checkpoint at 3; then a GPU run stopped at 3 and resumed continues as the straight GPU run.
namespace {

std::string gpu_recipe(const test::TempDir& dir) {
  std::ofstream f(dir / "recipe.yaml");
  f << "model: " << test::fixture("qwen3_moe_aux") << "\n"
    << "data: " << std::string(MOEFORGE_FIXTURES) << "/../data/arith64.jsonl\n"
    << "output_dir: " << (dir / "out") << "\n"
    << "seq_len: 16\nmicro_batch: 2\nglobal_batch: 4\nsteps: 6\nsave_every: 3\n"
    << "optimizer:\n  lr: 2.0e-3\n  weight_decay: 0.1\nschedule:\n  type: cosine\n  warmup_steps: 2\n"
    << "max_grad_norm: 0.5\nseed: 3\n";
  return dir / "recipe.yaml";
}

}  // namespace

// `moeforge train` in bf16, the path users run: the experts' ragged weight-gradient kernel, whose
// partial squares stand for their gradients in the clipped norm (one micro-batch a step, so nothing
// adds to them), and AdamW's zero-moment rows. Against the same recipe on the CPU in fp32, step by
// step: losses within 3% and logged gradient norms within 5% (bf16's rounding, and free routing
// that may send a token elsewhere; measured on an H100: 0.5% and 1.1% at most over the six steps).
TEST(CudaTrainer, Bf16RunTracksTheCpuRun) {
  REQUIRE_GPU();
  test::TempDir cpu_dir, gpu_dir;
  std::vector<double> cpu_norms, gpu_norms;
  train::TrainCallbacks on_cpu, on_gpu;
  on_cpu.on_step = [&](const train::StepMetrics& m) { cpu_norms.push_back(m.grad_norm); };
  on_gpu.on_step = [&](const train::StepMetrics& m) { gpu_norms.push_back(m.grad_norm); };
  const auto cpu = train::run_training(train::load_recipe(gpu_recipe(cpu_dir), {"global_batch=2"}), on_cpu);
  const auto gpu = train::run_training(
      train::load_recipe(gpu_recipe(gpu_dir), {"device=cuda", "precision=bf16", "global_batch=2"}), on_gpu);
  ASSERT_EQ(cpu.losses.size(), 6u);
  ASSERT_EQ(gpu.losses.size(), 6u);
  ASSERT_EQ(gpu_norms.size(), 6u);
  ASSERT_EQ(cpu_norms.size(), 6u);
  for (size_t i = 0; i < 6; ++i) {
    EXPECT_NEAR(gpu.losses[i], cpu.losses[i], 0.03 * cpu.losses[i]) << "step " << i;
    EXPECT_NEAR(gpu_norms[i], cpu_norms[i], 0.05 * cpu_norms[i]) << "step " << i;
    std::printf("  step %zu: loss %.4f (cpu %.4f), grad-norm %.4f (cpu %.4f)\n", i, gpu.losses[i], cpu.losses[i],
                gpu_norms[i], cpu_norms[i]);
  }
}

TEST(CudaTrainer, Fp32RunMatchesTheCpuRunAndResumes) {
  REQUIRE_GPU();
  test::TempDir cpu_dir, gpu_dir, half_dir;
  const auto cpu = train::run_training(train::load_recipe(gpu_recipe(cpu_dir), {}));
  const auto gpu = train::run_training(train::load_recipe(gpu_recipe(gpu_dir), {"device=cuda", "precision=fp32"}));
  ASSERT_EQ(cpu.losses.size(), 6u);
  ASSERT_EQ(gpu.losses.size(), 6u);
  for (size_t i = 0; i < 6; ++i) EXPECT_NEAR(gpu.losses[i], cpu.losses[i], 1e-4 * std::abs(cpu.losses[i])) << "step " << i;
  // Final weights: AdamW turns fp32-noise-level gradient differences into full +-lr steps on a few
  // elements (test_train_parity.cpp), so at least 99% of each tensor within 1e-4 of its largest.
  auto a = models::from_pretrained(cpu.final_dir), b = models::from_pretrained(gpu.final_dir);
  for (size_t i = 0; i < a.model->params().all().size(); ++i) {
    const auto x = a.model->params().all()[i].value.to_f32_vector(), y = b.model->params().all()[i].value.to_f32_vector();
    float wmax = 0;
    for (float v : x) wmax = std::max(wmax, std::abs(v));
    size_t close = 0;
    for (size_t j = 0; j < x.size(); ++j) close += std::abs(x[j] - y[j]) <= 1e-4f * wmax;
    EXPECT_GE(close, x.size() * 99 / 100) << a.model->params().all()[i].name;
  }
  const auto first = train::run_training(train::load_recipe(gpu_recipe(half_dir), {"device=cuda", "precision=fp32", "steps=3"}));
  const auto second = train::run_training(train::load_recipe(gpu_recipe(half_dir), {"device=cuda", "precision=fp32", "resume=true"}));
  ASSERT_EQ(second.losses.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_NEAR(first.losses[i], gpu.losses[i], 1e-5 * std::abs(gpu.losses[i])) << i;
    EXPECT_NEAR(second.losses[i], gpu.losses[3 + i], 1e-5 * std::abs(gpu.losses[3 + i])) << 3 + i;
  }
}
