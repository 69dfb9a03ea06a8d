// Finite-difference checks of every backward pass, in fp32: for a random direction v, the
// derivative of L(p + h v) at h = 0 must equal <dL/dp, v>. The numeric derivative is a Richardson-
// extrapolated central difference, (4 D(h) - D(2h)) / 3 with D(h) = (L(h) - L(-h)) / 2h and h = 3e-3:
// its truncation error is O(h^4), and fp32 rounding of the forward pass (unit roundoff 6e-8) costs
// about 6e-8 * |L| / h. The tolerance is 2e-3 relative to |<g, v>| plus 20x that rounding bound: above
// both, and far below what a wrong term (a missing factor, a transposed index) produces.
// The MoE router's discrete top-k choice has no gradient (it is piecewise constant): the checks hold
// the choice of experts fixed at the unperturbed point (replayed routing), so the loss is smooth and
// the routing weights, router and everything upstream are still differentiated.
#include <gtest/gtest.h>

#include <cmath>
#include <optional>
#include <functional>
#include <random>

#include "hf/safetensors.h"
#include "models/pretrained.h"
#include "nn/layers.h"
#include "ops/ops.h"
#include "test_util.h"

using namespace moeforge;

namespace {

// Small enough for the Transformers-fixture models, whose perturbed weights make attention sharp.
constexpr double kH = 1e-3;

double dot_double(const Tensor& a, const Tensor& b) {
  double s = 0;
  for (int64_t i = 0; i < a.numel(); ++i) s += static_cast<double>(a.f32()[i]) * b.f32()[i];
  return s;
}

// Checks d loss / d t along a random direction against `grad`. `frozen_row`: a row of t the
// direction leaves alone (the embedding's padding row, whose gradient is zero by design).
void check_direction(Tensor t, const Tensor& grad, const std::function<double()>& loss, uint32_t seed,
                     const std::string& what, int64_t frozen_row = -1) {
  Tensor v = test::random_tensor(t.shape(), seed);
  if (frozen_row >= 0) {
    const int64_t w = t.numel() / t.size(0);
    for (int64_t j = 0; j < w; ++j) v.f32()[frozen_row * w + j] = 0.f;
  }
  const Tensor saved = t.clone();
  float* p = t.f32();
  auto set = [&](double s) {
    for (int64_t i = 0; i < t.numel(); ++i) p[i] = saved.f32()[i] + static_cast<float>(s * v.f32()[i]);
  };
  auto central = [&](double h) {
    set(h);
    const double up = loss();
    set(-h);
    const double down = loss();
    return (up - down) / (2 * h);
  };
  const double analytic = dot_double(grad, v);
  // Richardson-extrapolated central differences. Pieces with kinks (clamps, GPT-OSS's clamped
  // SwiGLU) can put one within +-2h of the point along v, where no step that straddles it measures
  // the derivative: then the check is repeated with a 4x smaller step (its rounding allowance 4x
  // larger). A wrong gradient fails at both.
  for (const double h : {kH, kH / 4}) {
    const double numeric = (4 * central(h) - central(2 * h)) / 3;
    std::memcpy(t.raw(), saved.raw(), t.nbytes());
    const double rounding = 20 * 6e-8 * std::abs(loss()) / h;
    const double tolerance = 2e-3 * std::abs(analytic) + rounding;
    if (std::abs(numeric - analytic) <= tolerance) return;
    if (h != kH) EXPECT_NEAR(numeric, analytic, tolerance) << what << " (steps " << kH << " and " << h << ")";
  }
}

// A parameter store with random values for every registered parameter (norm weights around 1).
void fill_random(nn::ParamStore& ps, uint32_t seed, float scale) {
  for (auto& p : ps.all()) {
    const bool norm = p.name.find("norm") != std::string::npos;
    p.value = test::random_tensor(p.shape, seed++, norm ? 0.2f : scale);
    if (norm)
      for (int64_t i = 0; i < p.value.numel(); ++i) p.value.f32()[i] += 1.f;
  }
  ps.ensure_grads();
}

}  // namespace

TEST(GradCheck, RMSNormAndLinear) {
  nn::ParamStore ps;
  nn::RMSNorm norm;
  norm.init(ps, "norm.weight", 12, 1e-6f);
  nn::Linear lin;
  lin.init(ps, "lin", 12, 7, /*bias=*/true);
  fill_random(ps, 1, 0.3f);
  Tensor x = test::random_tensor({5, 12}, 10), r = test::random_tensor({5, 7}, 11);
  auto loss = [&] { return dot_double(lin.forward(ps, norm.forward(ps, x)), r); };
  Tensor xn = norm.forward(ps, x);
  Tensor dxn = lin.backward(ps, xn, r);
  Tensor dx = norm.backward(ps, x, dxn);
  check_direction(x, dx, loss, 100, "dx");
  for (auto& p : ps.all()) check_direction(p.value, p.grad, loss, 200, p.name);
}

TEST(GradCheck, AttentionVariantsGqaWindowAndDocuments) {
  const int64_t b = 2, s = 6, hidden = 16;
  using QkNorm = hf::ModelConfig::QkNorm;
  struct Variant {
    const char* tag;
    nn::AttentionOptions opts;
  };
  // Qwen3 (per-head norms), Qwen2/Llama (biases), OLMoE (norms over the projection, biases).
  // clip_qkv is left out here: finite differences across the clamp's kinks are meaningless; its
  // backward is held to torch's by the olmoe_b fixture's gradients (test_train_parity).
  const Variant variants[] = {
      {"qk_norm", {false, false, QkNorm::PerHead, std::nullopt, std::nullopt, 1e-6f}},
      {"bias", {true, true, QkNorm::None, std::nullopt, std::nullopt, 1e-6f}},
      {"full_norm", {true, true, QkNorm::Full, std::nullopt, std::nullopt, 1e-6f}},
      {"sinks", {true, true, QkNorm::None, std::nullopt, std::nullopt, 1e-6f, /*sinks=*/true}},
  };
  for (const Variant& var : variants)
    for (std::optional<int64_t> window : {std::optional<int64_t>(), std::optional<int64_t>(3)}) {
      nn::ParamStore ps;
      nn::Attention attn;
      nn::AttentionOptions opts = var.opts;
      opts.window = window;
      attn.init(ps, "attn", hidden, 4, 2, 8, opts);
      fill_random(ps, 3, 0.4f);
      nn::RotaryEmbedding rope(hf::RopeConfig{}, 8, 64);
      std::vector<int64_t> pos, docs;
      for (int64_t i = 0; i < b * s; ++i) {
        pos.push_back(i % s);
        docs.push_back(i < 4 ? 0 : 1);
      }
      Tensor cos, sin, doc_ids = Tensor::from_i64(docs, {b, s});
      rope.tables(Tensor::from_i64(pos, {b, s}), cos, sin);
      Tensor x = test::random_tensor({b * s, hidden}, 20), r = test::random_tensor({b * s, hidden}, 21);
      auto loss = [&] { return dot_double(attn.forward(ps, x, b, s, cos, sin, &doc_ids), r); };
      nn::Attention::Cache c;
      attn.forward(ps, x, b, s, cos, sin, &doc_ids, &c);
      Tensor dx = attn.backward(ps, c, b, s, cos, sin, &doc_ids, r);
      const std::string tag = std::string(var.tag) + (window ? " window" : "");
      check_direction(x, dx, loss, 300, tag + " dx");
      for (auto& p : ps.all()) check_direction(p.value, p.grad, loss, 400, tag + " " + p.name);
    }
}

TEST(GradCheck, DenseMLPWithAndWithoutBias) {
  for (bool bias : {false, true}) {
    nn::ParamStore ps;
    nn::DenseMLP mlp;
    mlp.init(ps, "mlp", 10, 14, bias);
    fill_random(ps, 5, 0.4f);
    Tensor x = test::random_tensor({7, 10}, 30), r = test::random_tensor({7, 10}, 31);
    auto loss = [&] { return dot_double(mlp.forward(ps, x), r); };
    nn::DenseMLP::Cache c;
    mlp.forward(ps, x, &c);
    Tensor dx = mlp.backward(ps, c, r);
    const std::string tag = bias ? "bias " : "";
    check_direction(x, dx, loss, 500, tag + "dx");
    for (auto& p : ps.all()) check_direction(p.value, p.grad, loss, 600, tag + p.name);
  }
}

TEST(GradCheck, GatedSharedExpert) {
  nn::ParamStore ps;
  nn::GatedSharedExpert shared;
  shared.init(ps, "mlp", 10, 6);
  fill_random(ps, 9, 0.5f);
  Tensor x = test::random_tensor({7, 10}, 32), r = test::random_tensor({7, 10}, 33);
  auto forward = [&](nn::GatedSharedExpert::Cache* c) {
    Tensor out = Tensor::zeros({7, 10}, DType::F32);
    shared.forward_add(ps, x, out, c);
    return out;
  };
  auto loss = [&] { return dot_double(forward(nullptr), r); };
  nn::GatedSharedExpert::Cache c;
  forward(&c);
  Tensor dx = shared.backward(ps, c, r);
  check_direction(x, dx, loss, 510, "dx");
  for (auto& p : ps.all()) check_direction(p.value, p.grad, loss, 610, p.name);
}

TEST(GradCheck, ClampedSwiGLU) {
  // Values well inside the clamps (their kinks would defeat finite differences); the clamps' cut
  // gradients are held to torch's by the GPT-OSS fixtures (test_train_parity).
  Tensor h = test::random_tensor({6, 10}, 34, 1.5f), r = test::random_tensor({6, 5}, 35);
  auto loss = [&] { return dot_double(ops::clamped_swiglu(h, 1.702f, 7.f), r); };
  Tensor dh = ops::clamped_swiglu_backward(h, r, 1.702f, 7.f);
  check_direction(h, dh, loss, 520, "clamped_swiglu");
  // Beyond the limits the clamps stop the gradient: gate above 7, up outside [-7, 7].
  Tensor big = Tensor::from_vector({9.f, -8.f, 2.f, 8.f}, {1, 4});
  Tensor d = ops::clamped_swiglu_backward(big, Tensor::from_vector({1.f, 1.f}, {1, 2}), 1.702f, 7.f);
  EXPECT_EQ(d.f32()[0], 0.f);  // gate 9 > 7
  EXPECT_EQ(d.f32()[1], 0.f);  // up -8 < -7
  EXPECT_NE(d.f32()[2], 0.f);  // gate 2
  EXPECT_EQ(d.f32()[3], 0.f);  // up 8 > 7
}

// The MoE block with each routing: softmax top-k renormalised or not, GPT-OSS's (biased router,
// softmax of the top-k logits, biased clamped-SwiGLU experts in their [E, H, 2I] layout) and
// DeepSeek-V3's (sigmoid scores, 3 groups keep 2, scaled weights; no load-balancing loss); each
// with the tokens in one chunk and in three (the expert exchange split as under expert
// parallelism with overlap).
TEST(GradCheck, SparseMoEEveryRouting) {
  struct Variant {
    const char* tag;
    bool norm;
    std::optional<nn::SparseMoE::GptOssStyle> gpt_oss;
    std::optional<nn::SparseMoE::GroupedSigmoid> grouped;
  };
  const Variant variants[] = {{"norm_topk", true, std::nullopt, std::nullopt},
                              {"plain", false, std::nullopt, std::nullopt},
                              {"gpt_oss", false, nn::SparseMoE::GptOssStyle{1.702f, 7.f}, std::nullopt},
                              {"deepseek", true, std::nullopt, nn::SparseMoE::GroupedSigmoid{3, 2, 2.5f}}};
  for (const Variant& v : variants)
  for (const int chunks : {1, 3}) {
    nn::RunContext ctx;
    ctx.ep_chunks = chunks;
    nn::ParamStore ps;
    nn::SparseMoE moe;
    moe.init(ps, "moe", 12, 6, 2, 8, v.norm, nullptr, v.gpt_oss, v.grouped);
    fill_random(ps, 7, 0.5f);
    Tensor x = test::random_tensor({9, 12}, 40), r = test::random_tensor({9, 12}, 41);
    // A gradient arriving on every row's router probabilities from elsewhere (as the aux loss
    // sends: one value per expert): the loss term is sum over rows of probs_row . extra.
    Tensor extra = test::random_tensor({6}, 42);
    Tensor extra_rows = Tensor::empty({9, 6}, DType::F32);
    for (int64_t i = 0; i < 9 * 6; ++i) extra_rows.f32()[i] = extra.f32()[i % 6];
    const Tensor* ex = v.grouped ? nullptr : &extra;
    nn::SparseMoE::Cache c;
    moe.forward(ps, ctx, x, nullptr, &c);
    const Tensor chosen = c.chosen.clone();
    auto loss = [&] {
      nn::SparseMoE::Cache cc;
      Tensor y = moe.forward(ps, ctx, x, nullptr, &cc, &chosen);
      return dot_double(y, r) + (ex ? dot_double(cc.probs, extra_rows) : 0.0);
    };
    Tensor dx = moe.backward(ps, ctx, c, r, ex);
    const std::string tag = std::string(v.tag) + " chunks " + std::to_string(chunks) + " ";
    check_direction(x, dx, loss, 700, tag + "dx");
    for (auto& p : ps.all())
      if (p.trainable) check_direction(p.value, p.grad, loss, 800, tag + p.name);
  }
}

// Whole models from the fixtures: embedding, every layer, final norm, LM head, cross-entropy and
// the load-balancing loss, with and without activation checkpointing.
class ModelGradCheck : public ::testing::TestWithParam<std::tuple<const char*, bool>> {};

TEST_P(ModelGradCheck, EveryParameter) {
  const auto [name, ckpt] = GetParam();
  auto m = models::from_pretrained(test::fixture(name));
  auto& model = *m.model;
  auto ref = hf::SafetensorsFile::open(test::fixture(name) + "/reference.safetensors");
  Tensor ids = ref.get("input_ids").clone(), labels = ref.get("labels").clone();
  const double coef = model.config().output_router_logits ? 0.7 : 0.0;
  models::TrainStepOptions o;
  o.ce_scale = 1.f;
  o.aux_scale = static_cast<float>(coef);
  o.activation_checkpointing = ckpt;
  models::RoutingControl routing;
  models::ForwardInputs in{ids, &labels};
  in.routing = &routing;
  model.forward_backward(in, o);  // records the routing
  ASSERT_EQ(routing.chosen.empty(), model.config().num_experts == 0);  // recorded where there are experts
  routing.mode = models::RoutingControl::Mode::Replay;
  auto loss = [&] {
    auto out = model.forward(in);
    // forward's loss is mean CE + coef_config * aux; rebuild sum CE + coef * aux.
    const double ce_mean = out.loss - (model.config().output_router_logits
                                           ? model.config().router_aux_loss_coef * out.aux_loss
                                           : 0.0);
    return ce_mean * out.loss_tokens + (coef ? coef * out.aux_loss : 0.0);
  };
  uint32_t seed = 900;
  const int64_t pad = model.config().pad_token_id.value_or(-1);
  for (auto& p : model.params().all())
    if (p.trainable)  // buffers get no gradient by design
      check_direction(p.value, p.grad, loss, seed++, p.name, p.name == "model.embed_tokens.weight" ? pad : -1);
}

INSTANTIATE_TEST_SUITE_P(Qwen3Moe, ModelGradCheck,
                         ::testing::Combine(::testing::Values("qwen3_moe_a", "qwen3_moe_b", "qwen3_moe_aux"),
                                            ::testing::Values(false, true)));
// One fixture per family of issue 7 with the family's optional pieces (shared expert, full q/k
// norms, MLP biases, windows on some layers); olmoe_a rather than olmoe_b, whose clip_qkv has kinks.
INSTANTIATE_TEST_SUITE_P(Families, ModelGradCheck,
                         ::testing::Combine(::testing::Values("mixtral_b", "qwen2_moe_b", "olmoe_a", "llama_b",
                                                              "qwen2_b", "qwen3_b", "gpt_oss_a", "gpt_oss_b",
                                                              "deepseek_v3_a", "deepseek_v3_b", "nemotron_h_a",
                                                              "nemotron_h_b"),
                                            ::testing::Values(false)));

// Mamba2's pieces (Nemotron-H): relu^2, the causal conv1d with SiLU, the selective scan with its dt
// preprocessing, and the gated grouped RMSNorm, each on two rows of which the second packs two
// documents (a state or window reaching across the boundary would change both the loss and the
// gradients).
TEST(GradCheck, Mamba2Ops) {
  const int64_t batch = 2, seq = 7, t = batch * seq;
  Tensor docs = Tensor::from_i64({0, 0, 0, 0, 0, 0, 0, 5, 5, 5, 6, 6, 6, 6}, {t});
  {
    Tensor x = test::random_tensor({5, 6}, 90), r = test::random_tensor({5, 6}, 91);
    auto loss = [&] { return dot_double(ops::relu2(x), r); };
    check_direction(x, ops::relu2_backward(x, r), loss, 92, "relu2");
  }
  {
    const int64_t c = 5, k = 4;
    Tensor x = test::random_tensor({t, c}, 93), w = test::random_tensor({c, 1, k}, 94), b = test::random_tensor({c}, 95);
    Tensor r = test::random_tensor({t, c}, 96);
    auto loss = [&] { return dot_double(ops::causal_conv1d(x, w, &b, batch, &docs, true), r); };
    Tensor dx, dw = Tensor::zeros(w.shape(), DType::F32), db = Tensor::zeros({c}, DType::F32);
    ops::causal_conv1d_backward(x, w, &b, batch, &docs, true, r, dx, dw, &db);
    check_direction(x, dx, loss, 97, "conv1d dx");
    check_direction(w, dw, loss, 98, "conv1d dw");
    check_direction(b, db, loss, 99, "conv1d dbias");
  }
  {
    const int64_t h = 4, p = 3, g = 2, n = 5;
    Tensor x = test::random_tensor({t, h, p}, 100), dt = test::random_tensor({t, h}, 101);
    Tensor dt_bias = test::random_tensor({h}, 102), a_log = test::random_tensor({h}, 103, 0.5f);
    Tensor b = test::random_tensor({t, g, n}, 104), c = test::random_tensor({t, g, n}, 105);
    Tensor d = test::random_tensor({h}, 106), r = test::random_tensor({t, h, p}, 107);
    // dt_min low enough that no dt sits on the floor (where the gradient is cut).
    auto loss = [&] { return dot_double(ops::ssm_scan(x, dt, dt_bias, a_log, b, c, d, 1e-4f, batch, &docs), r); };
    ops::SsmScanGrads gr;
    ops::ssm_scan_backward(x, dt, dt_bias, a_log, b, c, d, 1e-4f, batch, &docs, r, gr);
    check_direction(x, gr.dx, loss, 108, "scan dx");
    check_direction(dt, gr.ddt_raw, loss, 109, "scan ddt");
    check_direction(dt_bias, gr.ddt_bias, loss, 110, "scan ddt_bias");
    check_direction(a_log, gr.da_log, loss, 111, "scan dA_log");
    check_direction(b, gr.db, loss, 112, "scan dB");
    check_direction(c, gr.dc, loss, 113, "scan dC");
    check_direction(d, gr.dd, loss, 114, "scan dD");
    // Documents are separate sequences: the second document of row 2 alone gives the same outputs.
    const Tensor y = ops::ssm_scan(x, dt, dt_bias, a_log, b, c, d, 1e-4f, batch, &docs);
    auto rows = [](const Tensor& v, int64_t r0, int64_t n_rows) { return v.slice0(r0, n_rows).clone(); };
    const Tensor alone = ops::ssm_scan(rows(x, 10, 4), rows(dt, 10, 4), dt_bias, a_log, rows(b, 10, 4), rows(c, 10, 4),
                                       d, 1e-4f, 1, nullptr);
    EXPECT_EQ(test::tensor_rel_diff(rows(y, 10, 4), alone), 0.0);
  }
  {
    const int64_t width = 8, groups = 2;
    Tensor y = test::random_tensor({t, width}, 115), z = test::random_tensor({t, width}, 116);
    Tensor w = test::random_tensor({width}, 117), r = test::random_tensor({t, width}, 118);
    auto loss = [&] { return dot_double(ops::gated_rms_norm(y, z, w, groups, 1e-5f), r); };
    Tensor dy, dz, dw = Tensor::zeros({width}, DType::F32);
    ops::gated_rms_norm_backward(y, z, w, groups, 1e-5f, r, dy, dz, dw);
    check_direction(y, dy, loss, 119, "gated norm dy");
    check_direction(z, dz, loss, 120, "gated norm dz");
    check_direction(w, dw, loss, 121, "gated norm dw");
  }
}
