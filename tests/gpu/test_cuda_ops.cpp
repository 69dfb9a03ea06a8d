// Every CUDA op against its CPU reference (ops/cpu) on fresh random inputs, in F32 (tight) and BF16
// (loose: inputs are rounded to BF16 for the reference too, so the difference is the kernels' own
// rounding). Outputs are poisoned with NaN bytes before each call. Skipped without a GPU.
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <cmath>
#include <algorithm>
#include <random>
#include <thread>
#include <chrono>

#include "core/error.h"
#include "gpu/phase_times.h"
#include "ops/cuda/ops_cuda.h"
#include "ops/cuda/runtime.h"
#include "ops/cpu/cpu_ops.h"
#include "ops/ops.h"

using namespace moeforge;

namespace {

#define REQUIRE_GPU() \
  if (!cuda::available()) GTEST_SKIP() << "no CUDA device on this machine"

Tensor randn(Shape s, uint32_t seed, float scale = 1.f) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.f, scale);
  std::vector<float> v(static_cast<size_t>(shape_numel(s)));
  for (auto& x : v) x = d(g);
  return Tensor::from_vector(v, std::move(s));
}

// The host tensor as the device will see it in `dt` (rounded), back in F32.
Tensor rounded(const Tensor& t, DType dt) { return dt == DType::F32 ? t.clone() : t.to(dt).to(DType::F32); }

struct Tol {
  float atol, rtol;
};
Tol tol_for(DType dt) { return dt == DType::F32 ? Tol{2e-5f, 2e-5f} : Tol{2e-2f, 2e-2f}; }

void expect_close(const Tensor& got_dev_or_host, const Tensor& want, Tol tol, const std::string& what) {
  Tensor got = got_dev_or_host.device().is_cpu() ? got_dev_or_host : cuda::to_host_f32(got_dev_or_host);
  ASSERT_EQ(got.numel(), want.numel()) << what;
  const auto g = got.to_f32_vector(), w = want.to_f32_vector();
  int64_t bad = 0;
  double worst = 0;
  for (size_t i = 0; i < g.size(); ++i) {
    const double err = std::fabs(static_cast<double>(g[i]) - w[i]);
    const double lim = tol.atol + tol.rtol * std::fabs(w[i]);
    if (!(err <= lim)) {  // NaN (a poisoned element left unwritten) fails too
      if (bad == 0) ADD_FAILURE() << what << ": element " << i << " got " << g[i] << " want " << w[i];
      ++bad;
    }
    if (std::isfinite(err)) worst = std::max(worst, err);
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << g.size() << " elements off (max abs err " << worst << ")";
}

class CudaOps : public ::testing::TestWithParam<DType> {};

TEST_P(CudaOps, GemmAllTransposes) {
  REQUIRE_GPU();
  const DType dt = GetParam();
  const int64_t m = 67, n = 129, k = 96;
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb) {
      Tensor a = randn(ta ? Shape{k, m} : Shape{m, k}, 1 + ta), b = randn(tb ? Shape{n, k} : Shape{k, n}, 3 + tb);
      Tensor ar = rounded(a, dt), br = rounded(b, dt);
      Tensor c0 = randn({m, n}, 9);
      Tensor want = c0.clone();
      ops::cpu::gemm_f32(ta, tb, m, n, k, 1.f, ar.f32(), ta ? m : k, br.f32(), tb ? k : n, 1.f, want.f32(), n);
      Tensor c = cuda::to_device(c0, DType::F32);
      cuda::gemm(cuda::to_device(a, dt), ta, cuda::to_device(b, dt), tb, c, /*accumulate=*/true);
      expect_close(c, want, {1e-4f, 1e-4f}, "gemm ta=" + std::to_string(ta) + " tb=" + std::to_string(tb));
      // Overwrite (beta = 0) into a poisoned output.
      Tensor c2 = cuda::empty({m, n}, DType::F32);
      cuda::poison(c2);
      cuda::gemm(cuda::to_device(a, dt), ta, cuda::to_device(b, dt), tb, c2);
      Tensor want2 = Tensor::zeros({m, n}, DType::F32);
      ops::cpu::gemm_f32(ta, tb, m, n, k, 1.f, ar.f32(), ta ? m : k, br.f32(), tb ? k : n, 0.f, want2.f32(), n);
      expect_close(c2, want2, {1e-4f, 1e-4f}, "gemm overwrite");
    }
}

TEST_P(CudaOps, LinearMatchesCpu) {
  REQUIRE_GPU();
  const DType dt = GetParam();
  Tensor x = randn({3, 37, 64}, 5), w = randn({80, 64}, 6, 0.1f);
  Tensor y = cuda::linear(cuda::to_device(x, dt), cuda::to_device(w, dt));
  EXPECT_EQ(y.shape(), (Shape{3, 37, 80}));
  expect_close(y, ops::linear(rounded(x, dt), rounded(w, dt)), dt == DType::F32 ? Tol{1e-4f, 1e-4f} : tol_for(dt), "linear");
}

TEST_P(CudaOps, RmsNormForwardBackwardAndFusedAdd) {
  REQUIRE_GPU();
  const DType dt = GetParam();
  const float eps = 1e-6f;
  // Widths that take each launch shape of the row-group kernels (norm.cu; BF16 packs of 8, F32 of 4):
  // 128 with more rows than a block holds (per-head q/k norms), 2048 (a warp a row forward, two
  // warps backward: the shared-memory row sum), 7168 (a block a row backward: atomics straight
  // into dw), 72 (lanes with fewer packs than their registers hold), 384 (the original case), and
  // 70, which no pack divides (the element kernels).
  struct Shape2 { int64_t rows, d; };
  for (const Shape2 sh : {Shape2{45, 384}, Shape2{300, 128}, Shape2{37, 2048}, Shape2{9, 7168}, Shape2{20, 72}, Shape2{11, 70}}) {
    const int64_t rows = sh.rows, d = sh.d;
    const std::string at = " (rows " + std::to_string(rows) + ", d " + std::to_string(d) + ")";
    const uint32_t seed = static_cast<uint32_t>(d);
    Tensor x = randn({rows, d}, 11 + seed), w = randn({d}, 12 + seed, 0.5f), dy = randn({rows, d}, 13 + seed),
           res = randn({rows, d}, 14 + seed), dw0 = randn({d}, 15 + seed, 0.1f);
    Tensor xr = rounded(x, dt), wr = rounded(w, dt), dyr = rounded(dy, dt);
    Tensor rstd;
    Tensor y = cuda::rms_norm(cuda::to_device(x, dt), cuda::to_device(w, dt), eps, &rstd);
    expect_close(y, ops::rms_norm(xr, wr, eps), tol_for(dt), "rms_norm" + at);
    // dw accumulates into what it holds, on both devices.
    Tensor dw_want = dw0.clone();
    Tensor dx_want = ops::rms_norm_backward(xr, wr, eps, dyr, dw_want);
    Tensor dw = cuda::to_device(dw0, DType::F32);
    Tensor dx = cuda::rms_norm_backward(cuda::to_device(x, dt), cuda::to_device(w, dt), rstd, cuda::to_device(dy, dt), dw);
    expect_close(dx, dx_want, dt == DType::F32 ? Tol{1e-4f, 1e-4f} : Tol{5e-2f, 5e-2f}, "rms_norm_backward dx" + at);
    expect_close(dw, dw_want, dt == DType::F32 ? Tol{1e-3f, 1e-4f} : Tol{0.5f, 5e-2f}, "rms_norm_backward dw" + at);
    // Fused: sum = residual + x (a new tensor, the residual left as it was), y = norm(sum).
    Tensor resd = cuda::to_device(res, dt), sumd;
    const std::vector<float> res_before = cuda::to_host_f32(resd).to_f32_vector();
    Tensor yf = cuda::add_rms_norm(cuda::to_device(x, dt), resd, cuda::to_device(w, dt), eps, sumd);
    Tensor sum = rounded(res, dt);
    ops::add_inplace(sum, xr);
    EXPECT_EQ(cuda::to_host_f32(resd).to_f32_vector(), res_before) << "add_rms_norm left the residual" << at;
    EXPECT_NE(sumd.raw(), resd.raw()) << "add_rms_norm's sum is a new tensor" << at;
    expect_close(sumd, rounded(sum, dt), tol_for(dt), "add_rms_norm sum" + at);
    expect_close(yf, ops::rms_norm(rounded(sum, dt), wr, eps), tol_for(dt), "add_rms_norm output" + at);
    // The backward with the residual branch's gradient added in the same pass: the same bits as
    // the gradient stored and then add_inplace (dx rounded to the dtype first), dw the same sums.
    Tensor plus = cuda::to_device(res, dt);
    Tensor dw_two = cuda::to_device(dw0, DType::F32), dw_one = cuda::to_device(dw0, DType::F32);
    Tensor dx_two = cuda::rms_norm_backward(cuda::to_device(x, dt), cuda::to_device(w, dt), rstd, cuda::to_device(dy, dt), dw_two);
    cuda::add_inplace(dx_two, plus);
    Tensor dx_one =
        cuda::rms_norm_backward(cuda::to_device(x, dt), cuda::to_device(w, dt), rstd, cuda::to_device(dy, dt), dw_one, &plus);
    EXPECT_EQ(cuda::to_host_f32(dx_one).to_f32_vector(), cuda::to_host_f32(dx_two).to_f32_vector())
        << "rms_norm_backward with the residual gradient" << at;
    expect_close(dw_one, cuda::to_host_f32(dw_two), {1e-5f, 1e-5f}, "rms_norm_backward dw with the residual gradient" + at);
  }
}

TEST_P(CudaOps, SwigluForwardBackward) {
  REQUIRE_GPU();
  const DType dt = GetParam();
  // 96 moves in 16-byte packs (elementwise.cu), 9 element by element.
  for (const int64_t inter : {int64_t{96}, int64_t{9}}) {
    Tensor gu = randn({33, 2 * inter}, 21, 2.f), dout = randn({33, inter}, 22);
    Tensor gur = rounded(gu, dt);
    const std::string at = " (inter " + std::to_string(inter) + ")";
    expect_close(cuda::swiglu(cuda::to_device(gu, dt)), ops::swiglu(gur), tol_for(dt), "swiglu" + at);
    expect_close(cuda::swiglu_backward(cuda::to_device(gu, dt), cuda::to_device(dout, dt)),
                 ops::swiglu_backward(gur, rounded(dout, dt)), dt == DType::F32 ? Tol{1e-5f, 1e-4f} : tol_for(dt),
                 "swiglu_backward" + at);
    // The activation out of the backward kernel is the forward's, bit for bit; the gradient unchanged.
    Tensor act;
    const Tensor with_act = cuda::swiglu_backward(cuda::to_device(gu, dt), cuda::to_device(dout, dt), &act);
    const Tensor fwd = cuda::to_host_f32(cuda::swiglu(cuda::to_device(gu, dt))), got = cuda::to_host_f32(act);
    ASSERT_EQ(got.shape(), fwd.shape());
    EXPECT_EQ(std::memcmp(got.raw(), fwd.raw(), got.nbytes()), 0) << "swiglu_backward's act" << at;
    const Tensor plain = cuda::to_host_f32(cuda::swiglu_backward(cuda::to_device(gu, dt), cuda::to_device(dout, dt)));
    EXPECT_EQ(std::memcmp(cuda::to_host_f32(with_act).raw(), plain.raw(), plain.nbytes()), 0) << "dgu with act" << at;
  }
}

TEST_P(CudaOps, BiasRowsAndBiasGradient) {
  REQUIRE_GPU();
  const DType dt = GetParam();
  // 600 rows: more than one row slice of the gradient's reduction.
  Tensor y = randn({600, 37}, 50), b = randn({37}, 51), dy = randn({600, 37}, 52), db0 = randn({37}, 53);
  Tensor want = rounded(y, dt);
  ops::add_bias_rows(want, rounded(b, dt));
  Tensor yd = cuda::to_device(y, dt);
  cuda::add_bias_rows(yd, cuda::to_device(b, dt));
  expect_close(yd, want, tol_for(dt), "add_bias_rows");
  Tensor db_want = db0.clone();
  ops::bias_grad(rounded(dy, dt), db_want);
  Tensor dbd = cuda::to_device(db0, DType::F32);
  cuda::bias_grad(cuda::to_device(dy, dt), dbd);
  expect_close(dbd, db_want, {1e-4f, 1e-4f}, "bias_grad");
}

TEST_P(CudaOps, GroupedBiasAndItsGradient) {
  REQUIRE_GPU();
  const DType dt = GetParam();
  // 5 experts, one empty, 700 rows (several row slices of the reduction, experts crossing them).
  const std::vector<int64_t> off = {0, 130, 130, 400, 401, 700};
  const int64_t n = 20, experts = 5;
  Tensor y = randn({700, n}, 60), b = randn({experts, n}, 61), dy = randn({700, n}, 62), db0 = randn({experts, n}, 63);
  Tensor want = rounded(y, dt), db_want = db0.clone();
  const Tensor br = rounded(b, dt), dyr = rounded(dy, dt);
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t rows = off[e + 1] - off[e];
    if (rows == 0) continue;
    Tensor ye = want.slice0(off[e], rows), dbe = db_want.slice0(e, 1);
    ops::add_bias_rows(ye, br.slice0(e, 1));
    ops::bias_grad(dyr.slice0(off[e], rows), dbe);
  }
  Tensor yd = cuda::to_device(y, dt);
  cuda::grouped_add_bias(yd, cuda::to_device(b, dt), off);
  expect_close(yd, want, tol_for(dt), "grouped_add_bias");
  Tensor dbd = cuda::to_device(db0, DType::F32);
  cuda::grouped_bias_grad(cuda::to_device(dy, dt), off, dbd);
  expect_close(dbd, db_want, {1e-4f, 1e-4f}, "grouped_bias_grad");
}

TEST_P(CudaOps, LatentAttentionColumnMoves) {
  REQUIRE_GPU();
  const DType dt = GetParam();
  const int64_t t = 9, heads = 3;
  Tensor src = randn({t, 40}, 66), dst0 = randn({t * heads, 24}, 67), wide = randn({t * heads, 30}, 68);
  // Broadcast columns [32, 40) of each token row to its 3 head rows at [10, 18), then add [0, 5).
  Tensor want = rounded(dst0, dt);
  const Tensor sr = rounded(src, dt);
  ops::copy_columns(sr, 40, 32, heads, want, 24, 10, 8);
  ops::copy_columns(sr, 40, 0, heads, want, 24, 0, 5, /*add=*/true);
  Tensor got = cuda::to_device(dst0, dt);
  cuda::copy_columns(cuda::to_device(src, dt), 40, 32, heads, got, 24, 10, 8);
  cuda::copy_columns(cuda::to_device(src, dt), 40, 0, heads, got, 24, 0, 5, true);
  expect_close(got, want, tol_for(dt), "copy_columns");
  expect_close(cuda::sum_row_groups(cuda::to_device(wide, dt), 30, 6, 8, heads),
               ops::sum_row_groups(rounded(wide, dt), 30, 6, 8, heads), tol_for(dt), "sum_row_groups");
  Tensor pairs = randn({t * heads, 8}, 69);
  Tensor de = cuda::deinterleave_pairs(cuda::to_device(pairs, dt), 8);
  expect_close(de, ops::deinterleave_pairs(rounded(pairs, dt), 8), {0, 0}, "deinterleave_pairs");
  expect_close(cuda::interleave_pairs(de, 8), rounded(pairs, dt), {0, 0}, "interleave_pairs (round trip)");
}

TEST_P(CudaOps, GroupedSigmoidRoutingMatchesCpu) {
  REQUIRE_GPU();
  const DType dt = GetParam();
  const int64_t t = 40, e = 32, k = 4;
  Tensor logits = randn({t, e}, 70, 2.f), bias = randn({e}, 71, 0.3f), dw = randn({t, k}, 72);
  for (bool normalize : {true, false})
    for (auto [n_group, topk_group] : {std::pair<int64_t, int64_t>{8, 3}, std::pair<int64_t, int64_t>{1, 1}}) {
      const std::string what = "n_group " + std::to_string(n_group) + (normalize ? " normalised" : "");
      Tensor s_w, w_w, i_w, s_g, w_g, i_g;
      const Tensor lr = rounded(logits, dt);
      ops::grouped_sigmoid_route(lr, bias, n_group, topk_group, k, normalize, 2.5f, s_w, w_w, i_w);
      cuda::grouped_sigmoid_route(cuda::to_device(logits, dt), cuda::to_device(bias, DType::F32), n_group, topk_group, k,
                                  normalize, 2.5f, s_g, w_g, i_g);
      const Tensor ih = cuda::to_host_f32(i_g);  // I64 stays I64
      EXPECT_EQ(std::vector<int64_t>(ih.i64(), ih.i64() + ih.numel()), std::vector<int64_t>(i_w.i64(), i_w.i64() + i_w.numel()))
          << what;  // the same experts, in the same order
      expect_close(s_g, s_w, {1e-6f, 1e-5f}, "scores " + what);
      expect_close(w_g, w_w, {1e-6f, 1e-5f}, "weights " + what);
      Tensor dl_w = ops::grouped_sigmoid_route_backward(s_w, i_w, dw, normalize, 2.5f);
      Tensor dl_g = cuda::grouped_sigmoid_route_backward(s_g, i_g, cuda::to_device(dw, DType::F32), normalize, 2.5f, dt);
      expect_close(dl_g, dl_w, dt == DType::F32 ? Tol{1e-6f, 1e-5f} : Tol{1e-2f, 1e-2f}, "d_logits " + what);
    }
  // Forced (balanced) choice: the router's weights at the given experts.
  std::vector<int64_t> rr(t * k);
  for (int64_t i = 0; i < t * k; ++i) rr[i] = i % e;
  Tensor forced = Tensor::from_i64(rr, {t, k});
  Tensor s_w, w_w, i_w, s_g, w_g, i_g;
  ops::grouped_sigmoid_route(rounded(logits, dt), bias, 8, 3, k, true, 2.5f, s_w, w_w, i_w, &forced);
  const Tensor fd = cuda::to_device(forced, DType::I64);
  cuda::grouped_sigmoid_route(cuda::to_device(logits, dt), cuda::to_device(bias, DType::F32), 8, 3, k, true, 2.5f, s_g,
                              w_g, i_g, &fd);
  expect_close(w_g, w_w, {1e-6f, 1e-5f}, "forced weights");
}

TEST_P(CudaOps, ClampedSwigluForwardBackward) {
  REQUIRE_GPU();
  const DType dt = GetParam();
  Tensor gu = randn({33, 40}, 64, 5.f), dout = randn({33, 20}, 65);  // scale 5: the clamps at 7 engage
  const Tensor gr = rounded(gu, dt);
  expect_close(cuda::clamped_swiglu(cuda::to_device(gu, dt), 1.702f, 7.f), ops::clamped_swiglu(gr, 1.702f, 7.f),
               tol_for(dt), "clamped_swiglu");
  expect_close(cuda::clamped_swiglu_backward(cuda::to_device(gu, dt), cuda::to_device(dout, dt), 1.702f, 7.f),
               ops::clamped_swiglu_backward(gr, rounded(dout, dt), 1.702f, 7.f), dt == DType::F32 ? Tol{1e-5f, 1e-5f} : Tol{5e-2f, 2e-2f},
               "clamped_swiglu_backward");
}

TEST_P(CudaOps, ClampAndItsBackward) {
  REQUIRE_GPU();
  const DType dt = GetParam();
  Tensor x = randn({50, 24}, 54), dy = randn({50, 24}, 55);
  Tensor want = rounded(x, dt);
  ops::clamp_inplace(want, 0.7f);
  Tensor xd = cuda::to_device(x, dt);
  cuda::clamp_inplace(xd, 0.7f);
  expect_close(xd, want, tol_for(dt), "clamp");
  Tensor dy_want = rounded(dy, dt);
  ops::clamp_backward_inplace(rounded(x, dt), dy_want, 0.7f);
  Tensor dyd = cuda::to_device(dy, dt);
  cuda::clamp_backward_inplace(cuda::to_device(x, dt), dyd, 0.7f);
  expect_close(dyd, dy_want, tol_for(dt), "clamp backward");
  int zeroed = 0;
  for (float v : dy_want.to_f32_vector()) zeroed += v == 0.f;
  EXPECT_GT(zeroed, 200);  // about half the values are outside [-0.7, 0.7]
}

TEST_P(CudaOps, SigmoidGatedAddAndBackward) {
  REQUIRE_GPU();
  const DType dt = GetParam();
  Tensor out = randn({9, 300}, 56), y = randn({9, 300}, 57), logit = randn({9, 1}, 58, 2.f), dy = randn({9, 300}, 59);
  Tensor want = rounded(out, dt);
  ops::add_sigmoid_gated(want, rounded(y, dt), rounded(logit, dt));
  Tensor od = cuda::to_device(out, dt);
  cuda::add_sigmoid_gated(od, cuda::to_device(y, dt), cuda::to_device(logit, dt));
  expect_close(od, want, tol_for(dt), "add_sigmoid_gated");
  Tensor dy_want, dl_want, dy_got, dl_got;
  ops::sigmoid_gated_backward(rounded(dy, dt), rounded(y, dt), rounded(logit, dt), dy_want, dl_want);
  cuda::sigmoid_gated_backward(cuda::to_device(dy, dt), cuda::to_device(y, dt), cuda::to_device(logit, dt), dy_got, dl_got);
  expect_close(dy_got, dy_want, tol_for(dt), "sigmoid_gated_backward d_y");
  expect_close(dl_got, dl_want, dt == DType::F32 ? Tol{1e-4f, 1e-4f} : Tol{0.1f, 2e-2f}, "sigmoid_gated_backward d_logit");
}

TEST_P(CudaOps, RopeForwardAndInverse) {
  REQUIRE_GPU();
  const DType dt = GetParam();
  // Full rotation of 128 and partial rotation (64 of 128) in packs of pairs; 12 of 20 pair by pair.
  struct Case { int64_t d, rot; };
  for (const Case cs : {Case{128, 128}, Case{128, 64}, Case{20, 12}}) {
    Tensor x = randn({19, 4, cs.d}, 31), ang = randn({19, cs.rot}, 32, 3.f);
    std::vector<float> c(ang.numel()), s(ang.numel());
    for (int64_t i = 0; i < ang.numel(); ++i) {
      c[i] = std::cos(ang.f32()[i]);
      s[i] = std::sin(ang.f32()[i]);
    }
    Tensor cos = Tensor::from_vector(c, {19, cs.rot}), sin = Tensor::from_vector(s, {19, cs.rot});
    const std::string at = " (d " + std::to_string(cs.d) + ", rot " + std::to_string(cs.rot) + ")";
    for (bool inverse : {false, true}) {
      Tensor want = rounded(x, dt);
      ops::rope_inplace(want, cos, sin, inverse);
      Tensor xd = cuda::to_device(x, dt);
      cuda::rope_inplace(xd, cuda::to_device(cos, DType::F32), cuda::to_device(sin, DType::F32), inverse);
      expect_close(xd, want, tol_for(dt), (inverse ? "rope inverse" : "rope") + at);
    }
  }
}

// The fused per-head norm + RoPE (Qwen3's q/k norms) against the two kernels it replaces, bit for
// bit (y, rstd, dx; dw sums through atomics in any order: close), and both against the CPU: heads of
// 128 and 64 (fused), and a partial rotation (64 of 128) that falls back to the two kernels.
TEST_P(CudaOps, NormRopeFusedEqualsNormThenRope) {
  REQUIRE_GPU();
  const DType dt = GetParam();
  struct Case { int64_t d, rot; };
  for (const Case cs : {Case{128, 128}, Case{64, 64}, Case{128, 64}}) {
    const int64_t t = 37, heads = 5;
    const std::string at = " (d " + std::to_string(cs.d) + ", rot " + std::to_string(cs.rot) + ")";
    Tensor x = randn({t, heads, cs.d}, 71, 2.f), w = randn({cs.d}, 72, 0.5f), dy = randn({t, heads, cs.d}, 73);
    Tensor ang = randn({t, cs.rot}, 74, 3.f);
    std::vector<float> c(ang.numel()), s(ang.numel());
    for (int64_t i = 0; i < ang.numel(); ++i) {
      c[i] = std::cos(ang.f32()[i]);
      s[i] = std::sin(ang.f32()[i]);
    }
    Tensor cos = Tensor::from_vector(c, {t, cs.rot}), sin = Tensor::from_vector(s, {t, cs.rot});
    Tensor cos_d = cuda::to_device(cos, DType::F32), sin_d = cuda::to_device(sin, DType::F32);
    Tensor xd = cuda::to_device(x, dt), wd = cuda::to_device(w, DType::F32);
    // The two kernels.
    Tensor rstd_two;
    Tensor y_two = cuda::rms_norm(xd.view({t * heads, cs.d}), wd, 1e-6f, &rstd_two).view({t, heads, cs.d});
    cuda::rope_inplace(y_two, cos_d, sin_d);
    Tensor dy_two = cuda::to_device(dy, dt), dw_two = cuda::to_device(Tensor::zeros({cs.d}, DType::F32), DType::F32);
    cuda::rope_inplace(dy_two, cos_d, sin_d, /*inverse=*/true);
    Tensor dx_two = cuda::rms_norm_backward(xd.view({t * heads, cs.d}), wd, rstd_two, dy_two.view({t * heads, cs.d}), dw_two);
    // The fused op.
    Tensor rstd;
    Tensor y = cuda::rms_norm_rope(xd, wd, 1e-6f, cos_d, sin_d, &rstd);
    Tensor dyd = cuda::to_device(dy, dt), dw = cuda::to_device(Tensor::zeros({cs.d}, DType::F32), DType::F32);
    Tensor dx = cuda::rms_norm_rope_backward(xd, wd, rstd, dyd, cos_d, sin_d, dw);
    EXPECT_EQ(cuda::to_host_f32(y).to_f32_vector(), cuda::to_host_f32(y_two).to_f32_vector()) << "y" << at;
    EXPECT_EQ(cuda::to_host_f32(rstd).to_f32_vector(), cuda::to_host_f32(rstd_two).to_f32_vector()) << "rstd" << at;
    EXPECT_EQ(cuda::to_host_f32(dx).to_f32_vector(), cuda::to_host_f32(dx_two).to_f32_vector()) << "dx" << at;
    expect_close(dw, cuda::to_host_f32(dw_two), {1e-5f, 1e-5f}, "dw" + at);
    // The CPU's composition.
    Tensor y_want = ops::rms_norm_rope(rounded(x, dt), w, 1e-6f, cos, sin);
    Tensor dy_want = rounded(dy, dt), dw_want = Tensor::zeros({cs.d}, DType::F32);
    Tensor dx_want = ops::rms_norm_rope_backward(rounded(x, dt), w, 1e-6f, dy_want, cos, sin, dw_want);
    expect_close(y, y_want, tol_for(dt), "y against the CPU" + at);
    expect_close(dx, dx_want, dt == DType::F32 ? Tol{1e-4f, 1e-4f} : Tol{5e-2f, 3e-2f}, "dx against the CPU" + at);
    expect_close(dw, dw_want, dt == DType::F32 ? Tol{1e-3f, 1e-4f} : Tol{0.5f, 3e-2f}, "dw against the CPU" + at);
  }
}

TEST_P(CudaOps, EmbeddingAndBackward) {
  REQUIRE_GPU();
  const DType dt = GetParam();
  Tensor table = randn({50, 72}, 41);
  std::vector<int64_t> idv = {3, 0, 49, 3, 17, 3, 8};
  Tensor ids = Tensor::from_i64(idv, {7});
  expect_close(cuda::embedding(cuda::to_device(ids, DType::I64), cuda::to_device(table, dt)),
               ops::embedding(ids, rounded(table, dt)), {0, 0}, "embedding");
  Tensor dx = randn({7, 72}, 42);
  Tensor want = Tensor::zeros({50, 72}, DType::F32);
  ops::embedding_backward(ids, rounded(dx, dt), want);
  Tensor grad = cuda::to_device(Tensor::zeros({50, 72}, DType::F32), DType::F32);
  cuda::embedding_backward(cuda::to_device(ids, DType::I64), cuda::to_device(dx, dt), grad);
  expect_close(grad, want, {1e-5f, 1e-5f}, "embedding_backward");
  // Id 3 as the padding row: its three occurrences add nothing on either side.
  Tensor want_pad = Tensor::zeros({50, 72}, DType::F32);
  ops::embedding_backward(ids, rounded(dx, dt), want_pad, 3);
  Tensor grad_pad = cuda::to_device(Tensor::zeros({50, 72}, DType::F32), DType::F32);
  cuda::embedding_backward(cuda::to_device(ids, DType::I64), cuda::to_device(dx, dt), grad_pad, 3);
  expect_close(grad_pad, want_pad, {1e-5f, 1e-5f}, "embedding_backward with padding_idx");
  for (int64_t j = 0; j < 72; ++j) EXPECT_EQ(want_pad.f32()[3 * 72 + j], 0.f);
  // With row flags into an unzeroed gradient (poisoned: NaN): the batch's rows (id 3 three times,
  // the padding row 17 excepted) are zeroed and summed and flagged, every other row is left as it
  // was; zeroing the unwritten rows then gives the gradient written whole.
  {
    Tensor want_rows = Tensor::zeros({50, 72}, DType::F32);
    ops::embedding_backward(ids, rounded(dx, dt), want_rows, 17);
    Tensor g = cuda::empty({50, 72}, DType::F32), written = cuda::empty({50}, DType::U8);
    cuda::poison(g);
    cuda::poison(written);
    cuda::embedding_backward(cuda::to_device(ids, DType::I64), cuda::to_device(dx, dt), g, 17, &written);
    const Tensor flags = cuda::to_host_f32(written), got = cuda::to_host_f32(g);
    for (int64_t r = 0; r < 50; ++r) {
      const bool in_batch = r != 17 && std::find(idv.begin(), idv.end(), r) != idv.end();
      EXPECT_EQ(flags.f32()[r], in_batch ? 1.f : 0.f) << "row " << r;
      if (!in_batch) EXPECT_TRUE(std::isnan(got.f32()[r * 72]) && std::isnan(got.f32()[r * 72 + 71])) << "row " << r;
    }
    cuda::zero_unwritten_rows(g, written);
    expect_close(g, want_rows, {1e-5f, 1e-5f}, "embedding_backward with row flags, then unwritten rows zeroed");
  }
  Tensor bad_ids = Tensor::from_i64({1, 50}, {2});
  EXPECT_THROW(cuda::embedding(cuda::to_device(bad_ids, DType::I64), cuda::to_device(table, dt)), Error);
}

TEST_P(CudaOps, RouterSoftmaxTopk) {
  REQUIRE_GPU();
  const DType dt = GetParam();
  for (auto [e, k] : {std::pair<int64_t, int64_t>{128, 8}, {64, 6}, {8, 2}}) {
    Tensor logits = randn({77, e}, 51 + static_cast<uint32_t>(e), 2.f);
    Tensor want_p = rounded(logits, dt);
    ops::cpu::softmax_rows_inplace(want_p);
    Tensor want_v, want_i;
    ops::cpu::topk_rows(want_p, k, want_v, want_i);
    for (bool normalize : {false, true}) {
      Tensor probs, weights, indices;
      cuda::router_softmax_topk(cuda::to_device(logits, dt), k, normalize, probs, weights, indices);
      expect_close(probs, want_p, {1e-6f, 1e-5f}, "router probs");
      Tensor wv = want_v.clone();
      if (normalize)
        for (int64_t r = 0; r < 77; ++r) {
          float s = 0;
          for (int64_t j = 0; j < k; ++j) s += wv.f32()[r * k + j];
          for (int64_t j = 0; j < k; ++j) wv.f32()[r * k + j] /= s;
        }
      expect_close(weights, wv, {1e-6f, 1e-5f}, "router weights");
      Tensor got_i = cuda::to_host_f32(indices);
      EXPECT_EQ(std::vector<int64_t>(got_i.i64(), got_i.i64() + got_i.numel()),
                std::vector<int64_t>(want_i.i64(), want_i.i64() + want_i.numel()))
          << "router indices e=" << e;
    }
  }
}

// The warp-per-token router against the block-per-token one on the same inputs: bit for bit (the
// same sums in the same order), plain, renormalised and forced, with ties among the logits; and the
// block kernel (over 1,024 experts) against the CPU.
TEST_P(CudaOps, RouterWarpKernelEqualsBlockKernel) {
  REQUIRE_GPU();
  const DType dt = GetParam();
  const auto bits = [](const Tensor& t) {
    Tensor h = cuda::to_host_f32(t);
    return std::vector<float>(h.f32(), h.f32() + h.numel());
  };
  for (auto [e, k] : {std::pair<int64_t, int64_t>{128, 8}, {100, 5}, {1024, 16}, {8, 2}}) {
    const int64_t rows = 203;  // not a multiple of the warp kernel's 8 rows per block
    Tensor logits = randn({rows, e}, 71 + static_cast<uint32_t>(e), 2.f);
    for (int64_t r = 0; r < rows; r += 3) logits.f32()[r * e + e - 1] = logits.f32()[r * e];  // ties
    std::vector<int64_t> forced(static_cast<size_t>(rows * k));
    for (int64_t i = 0; i < rows * k; ++i) forced[i] = (i * 7 + 1) % e;
    Tensor forced_d = cuda::to_device(Tensor::from_i64(forced, {rows, k}), DType::I64);
    for (int variant = 0; variant < 3; ++variant) {
      const bool normalize = variant != 0;
      const Tensor* f = variant == 2 ? &forced_d : nullptr;
      Tensor dev = cuda::to_device(logits, dt);
      Tensor p1, w1, i1, p2, w2, i2;
      cuda::router_softmax_topk(dev, k, normalize, p1, w1, i1, f);
      const int64_t limit = cuda::set_router_warp_max_experts(0);
      cuda::router_softmax_topk(dev, k, normalize, p2, w2, i2, f);
      cuda::set_router_warp_max_experts(limit);
      const std::string what = "e=" + std::to_string(e) + " variant " + std::to_string(variant);
      EXPECT_EQ(bits(p1), bits(p2)) << what;
      EXPECT_EQ(bits(w1), bits(w2)) << what;
      Tensor h1 = cuda::to_host_f32(i1), h2 = cuda::to_host_f32(i2);
      EXPECT_EQ(std::vector<int64_t>(h1.i64(), h1.i64() + h1.numel()), std::vector<int64_t>(h2.i64(), h2.i64() + h2.numel()))
          << what;
    }
  }
  // Over the warp kernel's limit: the block kernel against the CPU.
  const int64_t e = 1500, k = 4;
  Tensor logits = randn({37, e}, 81, 2.f);
  Tensor want_p = rounded(logits, dt);
  ops::cpu::softmax_rows_inplace(want_p);
  Tensor want_v, want_i;
  ops::cpu::topk_rows(want_p, k, want_v, want_i);
  Tensor probs, weights, indices;
  cuda::router_softmax_topk(cuda::to_device(logits, dt), k, false, probs, weights, indices);
  expect_close(probs, want_p, {1e-6f, 1e-5f}, "router probs e=1500");
  expect_close(weights, want_v, {1e-6f, 1e-5f}, "router weights e=1500");
  Tensor got_i = cuda::to_host_f32(indices);
  EXPECT_EQ(std::vector<int64_t>(got_i.i64(), got_i.i64() + got_i.numel()),
            std::vector<int64_t>(want_i.i64(), want_i.i64() + want_i.numel()));
}

// Forced routing (the weights are the router's probabilities at the given experts) and the
// router backward (renormalisation, an extra per-expert gradient, softmax) against a host
// computation through ops::cpu::softmax_backward.
TEST_P(CudaOps, RouterForcedAndBackward) {
  REQUIRE_GPU();
  const DType dt = GetParam();
  const int64_t t = 53, e = 16, k = 4;
  Tensor logits = randn({t, e}, 61, 2.f);
  Tensor p = rounded(logits, dt);
  ops::cpu::softmax_rows_inplace(p);
  std::vector<int64_t> forced(static_cast<size_t>(t * k));
  for (int64_t i = 0; i < t * k; ++i) forced[i] = (i * 5 + 3) % e;  // distinct within a row
  Tensor forced_h = Tensor::from_i64(forced, {t, k});
  Tensor forced_d = cuda::to_device(forced_h, DType::I64);
  Tensor dw = randn({t, k}, 62), extra = randn({e}, 63, 0.1f);
  for (bool normalize : {false, true}) {
    Tensor probs, weights, indices;
    cuda::router_softmax_topk(cuda::to_device(logits, dt), k, normalize, probs, weights, indices, &forced_d);
    Tensor want_w = Tensor::empty({t, k}, DType::F32), want_dp = Tensor::zeros({t, e}, DType::F32);
    for (int64_t r = 0; r < t; ++r) {
      double sum = 0, dot = 0;
      for (int64_t j = 0; j < k; ++j) sum += p.f32()[r * e + forced[r * k + j]];
      for (int64_t j = 0; j < k; ++j) {
        const float pj = p.f32()[r * e + forced[r * k + j]];
        want_w.f32()[r * k + j] = normalize ? static_cast<float>(pj / sum) : pj;
        dot += static_cast<double>(dw.f32()[r * k + j]) * want_w.f32()[r * k + j];
      }
      for (int64_t i = 0; i < e; ++i) want_dp.f32()[r * e + i] = extra.f32()[i];
      for (int64_t j = 0; j < k; ++j)
        want_dp.f32()[r * e + forced[r * k + j]] +=
            normalize ? static_cast<float>((dw.f32()[r * k + j] - dot) / sum) : dw.f32()[r * k + j];
    }
    expect_close(weights, want_w, {1e-6f, 1e-5f}, "forced router weights");
    Tensor got_i = cuda::to_host_f32(indices);
    EXPECT_EQ(std::vector<int64_t>(got_i.i64(), got_i.i64() + got_i.numel()), forced);
    Tensor extra_d = cuda::to_device(extra, DType::F32);
    Tensor dl = cuda::router_backward(probs, indices, weights, cuda::to_device(dw, DType::F32), normalize, dt, &extra_d);
    const Tol tl = dt == DType::F32 ? Tol{1e-6f, 1e-5f} : Tol{1e-2f, 1e-2f};
    expect_close(dl, ops::cpu::softmax_backward(p, want_dp), tl, normalize ? "router backward (renormalised)" : "router backward");
  }
}

// A gradient's unwritten rows (flag 0) are read as zeros, never loaded: the same update bit for bit
// as a gradient holding zeros there, though it holds NaN. Rows of 10,008 elements (16-byte vectors,
// rows inside and across the 64K chunks) and of 13 (the element-wise path).
TEST(CudaOptimizer, UnwrittenGradientRowsReadAsZeros) {
  REQUIRE_GPU();
  for (const int64_t row : {int64_t{10008}, int64_t{13}}) {
    const int64_t rows = 7, n = rows * row;
    SCOPED_TRACE("row " + std::to_string(row));
    Tensor w = randn({n}, 91), g = randn({n}, 92, 0.1f), m = randn({n}, 93, 0.01f), v = randn({n}, 94, 0.001f);
    for (int64_t i = 0; i < n; ++i) v.f32()[i] = std::abs(v.f32()[i]);
    const std::vector<uint8_t> flags = {1, 0, 0, 1, 0, 1, 0};
    Tensor g_nan = g.clone(), g_zero = g.clone();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < row && !flags[r]; ++j) {
        g_nan.f32()[r * row + j] = NAN;
        g_zero.f32()[r * row + j] = 0.f;
      }
    Tensor flag_host = Tensor::empty({rows}, DType::U8);
    std::copy(flags.begin(), flags.end(), flag_host.data<uint8_t>());
    const ops::AdamWScalars sc{0.1f, 0.95f, 0.05f, std::sqrt(1 - 0.95f), 1e-8f, 1e-3f / 0.1f};
    auto run = [&](const Tensor& grad, bool flagged) {
      cuda::AdamWTensors t{cuda::to_device(w, DType::BF16), cuda::to_device(grad, DType::BF16),
                           cuda::to_device(m, DType::BF16), cuda::to_device(v, DType::BF16), 0.999f, Tensor()};
      if (flagged) t.grad_written_rows = cuda::to_device(flag_host, DType::U8);
      cuda::adamw_multi_tensor({t}, sc);
      return std::vector<Tensor>{cuda::to_host_f32(t.param), cuda::to_host_f32(t.exp_avg), cuda::to_host_f32(t.exp_avg_sq)};
    };
    const auto got = run(g_nan, true), want = run(g_zero, false);
    for (size_t k = 0; k < got.size(); ++k)
      EXPECT_EQ(std::memcmp(got[k].raw(), want[k].raw(), got[k].nbytes()), 0) << "output " << k;
    // The norm skips the same rows (adding nothing where the zeros would add 0: the same sum). Both
    // sides flagged, the zeros' flags all set, so both take the same path (vectors only where the
    // rows are whole vectors: rows of 13 sum element by element, in another order).
    Tensor all_rows = Tensor::empty({rows}, DType::U8);
    std::fill(all_rows.data<uint8_t>(), all_rows.data<uint8_t>() + rows, uint8_t{1});
    EXPECT_EQ(cuda::global_grad_norm({cuda::to_device(g_nan, DType::BF16)}, {cuda::to_device(flag_host, DType::U8)}),
              cuda::global_grad_norm({cuda::to_device(g_zero, DType::BF16)}, {cuda::to_device(all_rows, DType::U8)}));
  }
}

// Groups of 8 whose gradient and moments are all zero (signed zeros mixed in: an expert no token
// has reached) take AdamW's short path; it must give torch's bits: moments +0, the weight only
// decayed (or untouched without decay), the same as adamw_element on the host. Beside them, groups
// with a zero gradient but live moments, and random ones, through the full update; with eps = 0
// the zero groups take the full update too (0 / 0: NaN weights, as on the host). BF16 and F32,
// rows flagged unwritten among them, more than one chunk and a tail.
TEST(CudaOptimizer, ZeroGroupsKeepTorchsBits) {
  REQUIRE_GPU();
  const int64_t row = 1024, rows = 72, n = row * rows + 5;  // 72 rows: two chunks, and a tail of 5
  Tensor w = randn({n}, 141), g = randn({n}, 142, 0.1f), m = randn({n}, 143, 0.01f), v = randn({n}, 144, 0.001f);
  for (int64_t i = 0; i < n; ++i) v.f32()[i] = std::abs(v.f32()[i]);
  std::vector<uint8_t> flags(rows, 1);
  for (int64_t r = 0; r < rows; ++r) {
    const int kind = static_cast<int>(r % 4);  // 0, 1: all zero (1 unwritten); 2: zero g only; 3: random
    for (int64_t j = r * row; j < (r + 1) * row && kind < 3; ++j) {
      const float z = (j % 3 == 0) ? -0.f : 0.f;
      g.f32()[j] = (j % 5 == 0) ? -0.f : 0.f;
      if (kind < 2) {
        m.f32()[j] = z;
        v.f32()[j] = (j % 7 == 0) ? -0.f : 0.f;
      }
    }
    if (kind == 1) flags[static_cast<size_t>(r)] = 0;
  }
  Tensor flag_host = Tensor::empty({rows}, DType::U8);
  std::copy(flags.begin(), flags.end(), flag_host.data<uint8_t>());
  for (const DType dt : {DType::BF16, DType::F32})
    for (const float wd_mul : {1.f, 0.999f})
      for (const float eps : {1e-8f, 0.f}) {
        SCOPED_TRACE(std::string(dtype_name(dt)) + " wd_mul " + std::to_string(wd_mul) + " eps " + std::to_string(eps));
        const ops::AdamWScalars sc{0.1f, 0.95f, 0.05f, std::sqrt(1 - 0.95f), eps, 1e-3f / 0.1f};
        cuda::AdamWTensors t{cuda::to_device(w, dt), cuda::to_device(g, dt), cuda::to_device(m, dt), cuda::to_device(v, dt),
                             wd_mul, Tensor()};
        // The flagged rows as one tensor, the 5 elements after them as a second (the element path).
        const auto part = [&t](int64_t start, int64_t len) {
          cuda::AdamWTensors p = t;
          p.param = t.param.slice0(start, len);
          p.grad = t.grad.slice0(start, len);
          p.exp_avg = t.exp_avg.slice0(start, len);
          p.exp_avg_sq = t.exp_avg_sq.slice0(start, len);
          return p;
        };
        cuda::AdamWTensors tf = part(0, row * rows);
        tf.grad_written_rows = cuda::to_device(flag_host, DType::U8);
        const cuda::AdamWTensors tail = part(row * rows, n - row * rows);
        cuda::adamw_multi_tensor({tf, tail}, sc);
        const Tensor got_w = cuda::to_host_f32(t.param), got_m = cuda::to_host_f32(t.exp_avg),
                     got_v = cuda::to_host_f32(t.exp_avg_sq);
        const auto rd = [&](float x) { return Tensor::from_vector({x}, {1}).to(dt).item_f32(); };
        int64_t zero_mismatch = 0, other_far = 0;
        for (int64_t i = 0; i < n; ++i) {
          float wi = rd(w.f32()[i]), mi = rd(m.f32()[i]), vi = rd(v.f32()[i]);
          const int64_t r = i / row;
          const bool unwritten = r < rows && !flags[static_cast<size_t>(r)];
          ops::adamw_element(wi, unwritten ? 0.f : rd(g.f32()[i]), mi, vi, wd_mul, sc);
          wi = rd(wi), mi = rd(mi), vi = rd(vi);
          const bool zero_group = r < rows && r % 4 < 2;
          if (zero_group) {
            // Bit for bit (NaN with eps = 0: both sides NaN).
            const bool same_w = std::isnan(wi) ? std::isnan(got_w.f32()[i])
                                               : std::memcmp(&wi, got_w.f32() + i, sizeof(float)) == 0;
            if (!same_w || std::memcmp(&mi, got_m.f32() + i, 4) != 0 || (!std::isnan(vi) && std::memcmp(&vi, got_v.f32() + i, 4) != 0))
              ++zero_mismatch;
          } else if (std::abs(got_w.f32()[i] - wi) > 8e-3f * std::abs(wi) + 1e-6f ||
                     std::abs(got_m.f32()[i] - mi) > 8e-3f * std::abs(mi) + 1e-7f) {
            ++other_far;
          }
        }
        EXPECT_EQ(zero_mismatch, 0) << "elements of all-zero groups not bit for bit torch's update";
        EXPECT_EQ(other_far, 0) << "other elements off the host's update";
      }
}

// Zero-moment row flags (ops::AdamWTensors::zero_moment_rows): a flagged row whose gradient is
// unwritten is skipped whole (its gradient NaN here, to show it is not read), a written row clears
// its flag. Three steps writing different rows (some once and never again, some never), against
// the host's full update of every element from the device's previous state: rows never written bit
// for bit (the weight decayed where that changes a stored value: F32, or BF16 at 0.999; untouched
// where it cannot: BF16 at 1 - 1e-7), the rest within rounding, and the flags left set exactly on
// the rows never written. A view the vector path cannot take (not 16-byte aligned) drops its flags.
TEST(CudaOptimizer, ZeroMomentRowsKeepTorchsBitsAcrossSteps) {
  REQUIRE_GPU();
  const int64_t row = 1024, rows = 72, n = row * rows;  // two chunks
  const auto written = [](int64_t r, int s) { return r < 48 && (r + s) % 4 == 0; };  // r % 4 == 1, r >= 48: never
  const ops::AdamWScalars sc{0.1f, 0.95f, 0.05f, std::sqrt(1 - 0.95f), 1e-8f, 1e-3f / 0.1f};
  for (const DType dt : {DType::BF16, DType::F32})
    for (const float wd_mul : {1.f - 1e-7f, 0.999f}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " wd_mul " + std::to_string(wd_mul));
      const auto rd = [&](float x) { return Tensor::from_vector({x}, {1}).to(dt).item_f32(); };
      cuda::AdamWTensors t{cuda::to_device(randn({n}, 151), dt), Tensor(), cuda::to_device(Tensor::zeros({n}, DType::F32), dt),
                           cuda::to_device(Tensor::zeros({n}, DType::F32), dt), wd_mul, Tensor()};
      Tensor ones = Tensor::empty({rows}, DType::U8);
      std::fill_n(ones.data<uint8_t>(), rows, uint8_t{1});
      t.zero_moment_rows = cuda::to_device(ones, DType::U8);
      for (int s = 0; s < 3; ++s) {
        SCOPED_TRACE("step " + std::to_string(s));
        const Tensor g = randn({n}, 152 + s, 0.1f);
        Tensor g_dev = g.clone(), flags = Tensor::empty({rows}, DType::U8);
        for (int64_t r = 0; r < rows; ++r) {
          flags.data<uint8_t>()[r] = written(r, s);
          if (!written(r, s)) std::fill_n(g_dev.f32() + r * row, row, NAN);
        }
        t.grad = cuda::to_device(g_dev, dt);
        t.grad_written_rows = cuda::to_device(flags, DType::U8);
        Tensor w = cuda::to_host_f32(t.param), m = cuda::to_host_f32(t.exp_avg), v = cuda::to_host_f32(t.exp_avg_sq);
        cuda::adamw_multi_tensor({t}, sc);
        const Tensor got_w = cuda::to_host_f32(t.param), got_m = cuda::to_host_f32(t.exp_avg),
                     got_v = cuda::to_host_f32(t.exp_avg_sq);
        int64_t untouched_mismatch = 0, other_far = 0;
        for (int64_t i = 0; i < n; ++i) {
          const int64_t r = i / row;
          bool ever = false;
          for (int k = 0; k <= s; ++k) ever = ever || written(r, k);
          float wi = w.f32()[i], mi = m.f32()[i], vi = v.f32()[i];
          ops::adamw_element(wi, written(r, s) ? rd(g.f32()[i]) : 0.f, mi, vi, wd_mul, sc);
          wi = rd(wi), mi = rd(mi), vi = rd(vi);
          if (!ever) {
            if (std::memcmp(&wi, got_w.f32() + i, 4) != 0 || std::memcmp(&mi, got_m.f32() + i, 4) != 0 ||
                std::memcmp(&vi, got_v.f32() + i, 4) != 0)
              ++untouched_mismatch;
          } else if (std::abs(got_w.f32()[i] - wi) > 8e-3f * std::abs(wi) + 1e-6f ||
                     std::abs(got_m.f32()[i] - mi) > 8e-3f * std::abs(mi) + 1e-7f) {
            ++other_far;
          }
        }
        EXPECT_EQ(untouched_mismatch, 0) << "rows never written not bit for bit the full update";
        EXPECT_EQ(other_far, 0) << "other elements off the host's update";
      }
      const Tensor left = cuda::to_host_f32(t.zero_moment_rows);
      for (int64_t r = 0; r < rows; ++r) EXPECT_EQ(left.f32()[r], (r % 4 == 1 || r >= 48) ? 1.f : 0.f) << "row " << r;
    }
  // Not 16-byte aligned: the element path, which keeps no flags, so they all become 0.
  Tensor buf = cuda::to_device(randn({4 * row + 1}, 153), DType::BF16);
  cuda::AdamWTensors t{buf.slice0(1, 4 * row), cuda::to_device(randn({4 * row}, 154, 0.1f), DType::BF16),
                       cuda::to_device(Tensor::zeros({4 * row}, DType::F32), DType::BF16),
                       cuda::to_device(Tensor::zeros({4 * row}, DType::F32), DType::BF16), 1.f, Tensor()};
  Tensor four = Tensor::empty({4}, DType::U8);
  std::fill_n(four.data<uint8_t>(), 4, uint8_t{1});
  t.grad_written_rows = cuda::to_device(four, DType::U8);
  t.zero_moment_rows = cuda::to_device(four, DType::U8);
  cuda::adamw_multi_tensor({t}, sc);
  const Tensor left = cuda::to_host_f32(t.zero_moment_rows);
  for (int64_t r = 0; r < 4; ++r) EXPECT_EQ(left.f32()[r], 0.f) << "row " << r;
}

// Clipping applied as AdamW reads the gradients equals scaling them in place first, bit for bit,
// under the bf16 policy (BF16 gradients: the scaled value rounded as scale_inplace stores it), over
// more than one chunk and an element-wise tail.
TEST(CudaOptimizer, ClipScaleAsReadEqualsScaledGradients) {
  REQUIRE_GPU();
  const int64_t n = 70003;
  Tensor w = randn({n}, 95), g = randn({n}, 96, 0.1f), m = randn({n}, 97, 0.01f), v = randn({n}, 98, 0.001f);
  for (int64_t i = 0; i < n; ++i) v.f32()[i] = std::abs(v.f32()[i]);
  const ops::AdamWScalars sc{0.1f, 0.95f, 0.05f, std::sqrt(1 - 0.95f), 1e-8f, 1e-3f / 0.1f};
  auto run = [&](bool in_adamw) {
    cuda::AdamWTensors t{cuda::to_device(w, DType::BF16), cuda::to_device(g, DType::BF16), cuda::to_device(m, DType::BF16),
                         cuda::to_device(v, DType::BF16), 0.999f, Tensor()};
    ops::AdamWScalars s = sc;
    if (in_adamw) s.grad_scale = 0.413f;
    else cuda::scale_inplace({t.grad}, 0.413f);
    cuda::adamw_multi_tensor({t}, s);
    return std::vector<Tensor>{cuda::to_host_f32(t.param), cuda::to_host_f32(t.exp_avg), cuda::to_host_f32(t.exp_avg_sq)};
  };
  const auto got = run(true), want = run(false);
  for (size_t k = 0; k < got.size(); ++k) EXPECT_EQ(std::memcmp(got[k].raw(), want[k].raw(), got[k].nbytes()), 0) << k;
}

// The gradient norm and clipping's in-place scaling on 16-byte vectors and on the element-wise path
// (a view one element in, not 16-byte aligned), BF16 and F32: the scaled values as the CPU stores
// them, bit for bit; the norm within float summation order.
TEST(CudaOptimizer, NormAndScaleMatchTheCpuOnVectorsAndTails) {
  REQUIRE_GPU();
  const int64_t n = 70003;  // more than one chunk, and a tail that is not a whole vector
  for (const DType dt : {DType::BF16, DType::F32}) {
    for (const int64_t skip : {int64_t{0}, int64_t{1}}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " skip " + std::to_string(skip));
      const Tensor host = ops::to_device(randn({n + skip}, 131, 0.3f), Device::cpu(), dt);
      Tensor dev_whole = cuda::to_device(host, dt);
      Tensor dev = dev_whole.slice0(skip, n);
      Tensor cpu = host.clone().slice0(skip, n);
      EXPECT_NEAR(cuda::global_grad_norm({dev}), ops::global_grad_norm({cpu}), 1e-5 * ops::global_grad_norm({cpu}));
      cuda::scale_inplace({dev}, 0.377f);
      ops::scale_inplace({cpu}, 0.377f);
      const Tensor got = cuda::to_host_f32(dev), want = ops::to_device(cpu, Device::cpu(), DType::F32);
      EXPECT_EQ(std::memcmp(got.raw(), want.raw(), got.nbytes()), 0);
    }
  }
}

// AdamW with BF16 moments (the bf16 policy) and with F32 masters refreshing a BF16 copy
// (bf16-mixed), against adamw_element on the host with the same roundings.
TEST(CudaOptimizer, Bf16MomentsAndMasterCopy) {
  REQUIRE_GPU();
  const int64_t n = 70003;  // more than one chunk, and a tail that is not a whole vector
  Tensor w = randn({n}, 71), g = randn({n}, 72, 0.1f), m = randn({n}, 73, 0.01f), v = randn({n}, 74, 0.001f);
  for (int64_t i = 0; i < n; ++i) v.f32()[i] = std::abs(v.f32()[i]);
  const ops::AdamWScalars sc{0.1f, 0.95f, 0.05f, std::sqrt(1 - 0.95f), 1e-8f, 1e-3f / 0.1f};
  auto bf = [](float x) { return Tensor::from_vector({x}, {1}).to(DType::BF16).item_f32(); };
  // bf16 policy: every tensor BF16.
  {
    cuda::AdamWTensors t{cuda::to_device(w, DType::BF16), cuda::to_device(g, DType::BF16), cuda::to_device(m, DType::BF16),
                         cuda::to_device(v, DType::BF16), 0.999f, Tensor()};
    cuda::adamw_multi_tensor({t}, sc);
    Tensor want_w = Tensor::empty({n}, DType::F32), want_m = Tensor::empty({n}, DType::F32);
    for (int64_t i = 0; i < n; ++i) {
      float wi = bf(w.f32()[i]), mi = bf(m.f32()[i]), vi = bf(v.f32()[i]);
      ops::adamw_element(wi, bf(g.f32()[i]), mi, vi, 0.999f, sc);
      want_w.f32()[i] = bf(wi);
      want_m.f32()[i] = bf(mi);
    }
    expect_close(t.param, want_w, {1e-6f, 8e-3f}, "bf16 AdamW weights");
    expect_close(t.exp_avg, want_m, {1e-7f, 8e-3f}, "bf16 AdamW exp_avg");
  }
  // bf16-mixed: F32 master and moments, BF16 gradient, BF16 copy written in the same pass.
  {
    Tensor copy = cuda::empty({n}, DType::BF16);
    cuda::poison(copy);
    cuda::AdamWTensors t{cuda::to_device(w, DType::F32), cuda::to_device(g, DType::BF16), cuda::to_device(m, DType::F32),
                         cuda::to_device(v, DType::F32), 0.999f, copy};
    cuda::adamw_multi_tensor({t}, sc);
    Tensor want = Tensor::empty({n}, DType::F32);
    for (int64_t i = 0; i < n; ++i) {
      float wi = w.f32()[i], mi = m.f32()[i], vi = v.f32()[i];
      ops::adamw_element(wi, bf(g.f32()[i]), mi, vi, 0.999f, sc);
      want.f32()[i] = wi;
    }
    expect_close(t.param, want, {1e-6f, 1e-5f}, "bf16-mixed master weights");
    expect_close(copy, want, {1e-6f, 8e-3f}, "bf16-mixed working copy");
  }
}

// The small device helpers the training step uses: add, copy, convert, fill, and the normal
// generator's moments (and its determinism for one seed).
// MOEFORGE_PHASE_TIMES=events: a phase's device time runs from mark to mark on the device's clock
// (here it includes 20 ms the device sat idle while the host slept), and the lag at a mark tells
// whether the device was behind the host there (milliseconds of queued work) or had caught up.
TEST(CudaHelpers, PhaseTimesEventsSeeDeviceTimeAndLag) {
  REQUIRE_GPU();
  gpu::PhaseTimes p(gpu::PhaseMode::Events);
  Tensor a = cuda::to_device(randn({1 << 24}, 97), DType::F32);  // 64 MB
  p.start();
  for (int i = 0; i < 40; ++i) cuda::add_inplace(a, a);  // ~5 GB moved: milliseconds of queued work
  p.mark("busy");
  std::this_thread::sleep_for(std::chrono::milliseconds(60));  // the device catches up and idles
  cuda::add_inplace(a, a);
  p.mark("starved");
  p.finish_step();
  EXPECT_GT(p.totals().at("busy"), 0.5);
  EXPECT_GT(p.totals().at("starved"), 20.0);  // mostly the host's sleep, seen on the device's clock
  EXPECT_GT(p.mean_lag_ms("busy"), 0.5);
  EXPECT_LT(p.mean_lag_ms("starved"), p.mean_lag_ms("busy"));
  EXPECT_LT(p.mean_lag_ms("starved"), 1.0);
}

// zero_blocks: listed blocks zeroed, the others untouched; 16-byte words (more blocks than one
// launch lists: 600 of 700) and odd block sizes (one memset each).
TEST(CudaHelpers, ZeroBlocksClearsOnlyTheListedBlocks) {
  REQUIRE_GPU();
  for (const int64_t block : {int64_t{48}, int64_t{13}}) {  // F32 elements per block: 192 bytes, 52 bytes
    const int64_t blocks = 700;
    Tensor host = randn({blocks, block}, 98);
    Tensor d = cuda::to_device(host, DType::F32);
    std::vector<int32_t> listed;
    for (int32_t b = 0; b < blocks; ++b)
      if (b % 7 != 3) listed.push_back(b);  // 600 blocks
    cuda::zero_blocks(d.raw(), block * 4, listed);
    Tensor want = host.clone();
    for (int32_t b : listed) std::fill(want.f32() + b * block, want.f32() + (b + 1) * block, 0.f);
    expect_close(d, want, {0.f, 0.f}, "zero_blocks, blocks of " + std::to_string(block) + " floats");
  }
}

TEST(CudaHelpers, AddCopyConvertFill) {
  REQUIRE_GPU();
  Tensor a = randn({1000}, 81), b = randn({1000}, 82);
  Tensor ad = cuda::to_device(a, DType::F32), bd = cuda::to_device(b, DType::F32);
  Tensor c = cuda::copy(ad);
  cuda::add_inplace(c, bd);
  Tensor want = a.clone();
  for (int64_t i = 0; i < 1000; ++i) want.f32()[i] += b.f32()[i];
  expect_close(c, want, {1e-6f, 1e-6f}, "add_inplace");
  expect_close(ad, a, {0.f, 0.f}, "copy leaves the source");
  // In packs (BF16, 1000 elements) and element by element (F32, 1001: no pack of 4 divides it).
  {
    Tensor x = randn({1000}, 83), y = randn({1000}, 84);
    Tensor yd = cuda::to_device(y, DType::BF16);
    cuda::add_inplace(yd, cuda::to_device(x, DType::BF16));
    Tensor sum = rounded(y, DType::BF16);
    ops::add_inplace(sum, rounded(x, DType::BF16));
    expect_close(yd, rounded(sum, DType::BF16), {0.f, 0.f}, "add_inplace bf16");
    Tensor x1 = randn({1001}, 85), y1 = randn({1001}, 86);
    Tensor y1d = cuda::to_device(y1, DType::F32);
    cuda::add_inplace(y1d, cuda::to_device(x1, DType::F32));
    Tensor sum1 = y1.clone();
    ops::add_inplace(sum1, x1);
    expect_close(y1d, sum1, {1e-6f, 1e-6f}, "add_inplace odd length");
  }
  Tensor h = cuda::empty({1000}, DType::BF16);
  cuda::convert(ad, h);
  expect_close(h, rounded(a, DType::BF16), {0.f, 0.f}, "convert to bf16");
  Tensor n1 = cuda::empty({1 << 20}, DType::F32), n2 = cuda::empty({1 << 20}, DType::F32);
  cuda::fill_normal(n1, 0.5f, 2.f, 7);
  cuda::fill_normal(n2, 0.5f, 2.f, 7);
  const auto x = cuda::to_host_f32(n1).to_f32_vector();
  double mean = 0, var = 0;
  for (float xi : x) mean += xi;
  mean /= static_cast<double>(x.size());
  for (float xi : x) var += (xi - mean) * (xi - mean);
  var /= static_cast<double>(x.size());
  EXPECT_NEAR(mean, 0.5, 0.01);
  EXPECT_NEAR(std::sqrt(var), 2.0, 0.01);
  EXPECT_EQ(x, cuda::to_host_f32(n2).to_f32_vector()) << "same seed, same values";
  cuda::fill(n1, 3.f);
  EXPECT_EQ(cuda::to_host_f32(n1).item_f32(12345), 3.f);
}

// Rows of 5003 (scalar path), 5008 and 16 (16-byte vector path) and Qwen3's vocabulary of 151,936,
// out of place and in place, targets at the ends of the rows (the vector path's final group).
TEST_P(CudaOps, CrossEntropyFusedGradient) {
  REQUIRE_GPU();
  const DType dt = GetParam();
  for (const int64_t v : {int64_t{5003}, int64_t{5008}, int64_t{16}, int64_t{151936}})
    for (bool in_place : {false, true}) {
      const int64_t n = v > 10000 ? 5 : 29;
      Tensor logits = randn({n, v}, 61 + v, 3.f);
      std::vector<int64_t> t(n);
      for (int64_t i = 0; i < n; ++i) t[i] = (i * 977) % v;
      t[1] = v - 1;  // the last element, in the vector path's final group
      t[2] = 0;
      t[4] = -100;
      if (n > 11) t[11] = -100;
      Tensor targets = Tensor::from_i64(t, {n});
      Tensor want_d = Tensor::zeros({n, v}, DType::F32);
      int64_t want_n = 0, got_n = 0;
      const double want = ops::cross_entropy_backward(rounded(logits, dt), targets, -100, 0.25f, want_d, &want_n);
      Tensor dev_logits = cuda::to_device(logits, dt);
      Tensor dlogits = in_place ? dev_logits : Tensor();
      const double got =
          cuda::cross_entropy_backward(dev_logits, cuda::to_device(targets, DType::I64), -100, 0.25f, dlogits, &got_n);
      if (in_place) EXPECT_EQ(dlogits.raw(), dev_logits.raw()) << "in place means no new buffer";
      const std::string what = "cross_entropy v=" + std::to_string(v) + (in_place ? " in place" : "");
      EXPECT_EQ(got_n, want_n) << what;
      EXPECT_NEAR(got, want, 1e-4 * std::fabs(want) + 1e-4) << what;
      expect_close(dlogits, want_d, dt == DType::F32 ? Tol{1e-6f, 1e-4f} : Tol{2e-3f, 2e-2f}, what);
    }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CudaOps, ::testing::Values(DType::F32, DType::BF16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

TEST(CudaAllocator, SteadyStateReusesBlocksAndReportsPeak) {
  REQUIRE_GPU();
  cuda::synchronize();
  for (int step = 0; step < 3; ++step) {
    const auto before = cuda::allocator_stats();
    {
      Tensor a = cuda::empty({1 << 20}, DType::F32), b = cuda::empty({3000}, DType::BF16);
    }
    const auto after = cuda::allocator_stats();
    if (step > 0) EXPECT_EQ(after.cuda_malloc_calls, before.cuda_malloc_calls) << "step " << step;
    EXPECT_EQ(after.allocated_bytes, before.allocated_bytes);
    EXPECT_GE(after.peak_allocated_bytes, before.allocated_bytes + (4 << 20));
  }
}

TEST(CudaAllocator, OutOfMemoryIsOneClearError) {
  REQUIRE_GPU();
  try {
    cuda::empty({int64_t{1} << 40}, DType::F32, "a test tensor");  // 4 TiB
    FAIL();
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("out of GPU memory allocating"), std::string::npos) << m;
    EXPECT_NE(m.find("for a test tensor"), std::string::npos) << m;
    EXPECT_NE(m.find("activation_checkpointing"), std::string::npos) << m;
  }
}

}  // namespace

#include "nn/params.h"
#include "train/gradients.h"
#include "train/optimizer.h"

namespace {

// Three AdamW steps with clipping on the GPU against the CPU optimizer (torch-exact), over tensors
// that straddle the kernel's chunk boundary, with and without weight decay per tensor.
TEST(CudaOptimizer, AdamWAndGradNormMatchTheCpuOptimizer) {
  REQUIRE_GPU();
  nn::ParamStore cpu;
  const std::vector<Shape> shapes = {{300, 257}, {65536 + 17}, {5}, {64, 64}};
  for (size_t i = 0; i < shapes.size(); ++i) {
    cpu.add("p" + std::to_string(i), shapes[i]);
    cpu.all()[i].value = randn(shapes[i], 100 + static_cast<uint32_t>(i), 0.1f);
    cpu.all()[i].decay = i % 2 == 0;
  }
  cpu.ensure_grads();
  train::AdamWOptions o;
  o.lr = 1e-3;
  o.weight_decay = 0.1;
  o.decay_norms_and_biases = false;
  train::AdamW opt(cpu, o);
  std::vector<cuda::AdamWTensors> dev;
  for (auto& p : cpu.all())
    dev.push_back({cuda::to_device(p.value, DType::F32), cuda::empty(p.value.shape(), DType::F32),
                   cuda::to_device(Tensor::zeros(p.value.shape(), DType::F32), DType::F32),
                   cuda::to_device(Tensor::zeros(p.value.shape(), DType::F32), DType::F32)});
  for (int step = 1; step <= 3; ++step) {
    const double lr = o.lr * (1.0 - 0.1 * step);
    std::vector<Tensor> dev_grads;
    for (size_t i = 0; i < shapes.size(); ++i) {
      Tensor g = randn(shapes[i], 1000 * step + static_cast<uint32_t>(i), 2.f);
      cpu.all()[i].grad = g;
      dev[i].grad = cuda::to_device(g, DType::F32);
      dev_grads.push_back(dev[i].grad);
    }
    const double want_norm = train::clip_grad_norm(cpu, 1.0);
    const double got_norm = cuda::global_grad_norm(dev_grads);
    EXPECT_NEAR(got_norm, want_norm, 1e-5 * want_norm);
    cuda::scale_inplace(dev_grads, static_cast<float>(1.0 / (got_norm + 1e-6)));
    opt.step(lr);
    for (size_t i = 0; i < shapes.size(); ++i)
      dev[i].weight_decay_mul = static_cast<float>(1.0 - lr * (cpu.all()[i].decay ? o.weight_decay : 0.0));
    cuda::adamw_multi_tensor(dev, train::adamw_scalars(o, lr, step));
  }
  for (size_t i = 0; i < shapes.size(); ++i) {
    expect_close(dev[i].param, cpu.all()[i].value, {1e-6f, 1e-5f}, "param " + std::to_string(i));
    expect_close(dev[i].exp_avg_sq, opt.state()[2 * i + 1].second, {1e-9f, 1e-5f}, "exp_avg_sq " + std::to_string(i));
  }
}

}  // namespace

namespace {

// Expert row counts with empty experts, one-row experts and large ones.
std::vector<int64_t> ragged_offsets(int64_t experts, uint32_t seed) {
  std::mt19937 g(seed);
  std::vector<int64_t> off{0};
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t r = e % 5 == 1 ? 0 : (e % 7 == 3 ? 1 : static_cast<int64_t>(g() % 90));
    off.push_back(off.back() + r);
  }
  return off;
}

struct GroupedShape {
  int64_t n = 48, k = 40;
};
void grouped_case(DType dt, DType dw_dtype, const std::vector<int64_t>& off, GroupedShape shape, const std::string& kind);

// The path ragged experts take: CUTLASS's grouped kernel for BF16 when the build has it (the test
// machine is an H100), cuBLAS otherwise.
std::string ragged_path(DType dt) {
#ifdef MOEFORGE_HAVE_CUTLASS
  if (dt == DType::BF16) return "cutlass";
#endif
  (void)dt;
  return "";  // cuBLAS's grouped call or the loop; not pinned
}

// The path written weight gradients of ragged experts take: the ragged-K kernel for BF16 when the
// build has CUTLASS (the test machine is an H100); empty when it is not pinned.
std::string ragged_weight_grad_path(DType dt) {
#ifdef MOEFORGE_HAVE_CUTLASS
  if (dt == DType::BF16) return "cutlass-ragged";
#endif
  (void)dt;
  return "";
}

// Ragged experts (some empty), equal ones (one strided-batched GEMM), a large one among small ones,
// and native routing's skew at shapes that span several 128 x 256 tiles with partial edge tiles;
// weight gradients into F32 and (BF16) into the weights' dtype.
TEST_P(CudaOps, GroupedLinearForwardAndBothBackwards) {
  REQUIRE_GPU();
  const DType dt = GetParam();
  const int64_t e = 12;
  std::vector<int64_t> uniform(e + 1);
  for (int64_t i = 0; i <= e; ++i) uniform[i] = 9 * i;
  for (DType dw_dtype : dt == DType::BF16 ? std::vector<DType>{DType::F32, DType::BF16} : std::vector<DType>{DType::F32}) {
    const std::string dws = " dW " + std::string(dtype_name(dw_dtype));
    grouped_case(dt, dw_dtype, ragged_offsets(e, 77), {}, "ragged" + dws);
    grouped_case(dt, dw_dtype, uniform, {}, "uniform" + dws);
    // One expert with more than 1024 rows: on cuBLAS its weight gradient runs alone, the rest grouped.
    grouped_case(dt, dw_dtype, {0, 1100, 1105, 1105, 1200}, {}, "one large expert" + dws);
    grouped_case(dt, dw_dtype, {0, 700, 703, 703, 960, 968, 969}, {264, 200}, "skewed multi-tile" + dws);
  }
}

// Many tiles (2048 weight-gradient tiles: every SM takes many, of many experts) with empty and
// one-row experts among 128 ragged ones. (Session 16 ran this under a scheduler of its own that
// gave each SM runs of consecutive tiles; measured 4-9% slower under native routing, removed:
// docs/perf-notes.md.)
TEST(CudaOpsGrouped, ManyTilesOfManyRaggedExperts) {
  REQUIRE_GPU();
  std::mt19937 g(5);
  std::vector<int64_t> off{0};
  for (int64_t e = 0; e < 128; ++e) off.push_back(off.back() + (e % 9 == 4 ? 0 : e % 11 == 6 ? 1 : int64_t(g() % 512)));
  grouped_case(DType::BF16, DType::BF16, off, {512, 1024}, "many tiles");
}

// The ragged-K weight gradient's boundaries: experts that start and end inside a 64-row k tile,
// several experts inside one tile, a one-row expert at a tile's last row, an expert of exactly
// one aligned tile, of four, of 301 rows, empty experts first, between and last (their gradient
// written as zeros over poison), a row count that ends inside a tile, and n, k that leave partial
// 128 x 256 tiles.
TEST(CudaOpsGrouped, RaggedWeightGradAtTileBoundaries) {
  REQUIRE_GPU();
  const std::vector<int64_t> off = {0, 0, 5, 63, 64, 128, 128, 129, 200, 201, 330, 331, 331, 395, 600, 600, 856, 1157};
  for (DType dw_dtype : {DType::BF16, DType::F32}) {
    SCOPED_TRACE(dtype_name(dw_dtype));
    grouped_case(DType::BF16, dw_dtype, off, {136, 264}, "tile boundaries");
  }
}

void grouped_case(DType dt, DType dw_dtype, const std::vector<int64_t>& off, GroupedShape shape, const std::string& kind) {
  const int64_t e = static_cast<int64_t>(off.size()) - 1, n = shape.n, k = shape.k;
  const int64_t rows = off.back();
  Tensor x = randn({rows, k}, 81), w = randn({e, n, k}, 82, 0.2f), dy = randn({rows, n}, 83);
  Tensor xr = rounded(x, dt), wr = rounded(w, dt), dyr = rounded(dy, dt);
  Tensor y_want = Tensor::zeros({rows, n}, DType::F32), dx_want = Tensor::zeros({rows, k}, DType::F32);
  Tensor dw_want = Tensor::zeros({e, n, k}, DType::F32);
  for (int64_t i = 0; i < e; ++i) {
    const int64_t r = off[i + 1] - off[i];
    if (r == 0) continue;
    const float* we = wr.f32() + i * n * k;
    ops::cpu::gemm_f32(false, true, r, n, k, 1.f, xr.f32() + off[i] * k, k, we, k, 0.f, y_want.f32() + off[i] * n, n);
    ops::cpu::gemm_f32(false, false, r, k, n, 1.f, dyr.f32() + off[i] * n, n, we, k, 0.f, dx_want.f32() + off[i] * k, k);
    ops::cpu::gemm_f32(true, false, n, k, r, 1.f, dyr.f32() + off[i] * n, n, xr.f32() + off[i] * k, k, 0.f,
                  dw_want.f32() + i * n * k, k);
  }
  const Tol t = dt == DType::F32 ? Tol{1e-4f, 1e-4f} : Tol{3e-2f, 2e-2f};
  // Weight gradients sum up to ~1000 rows; a BF16 result adds its own rounding (2^-8 relative).
  const Tol tw = dt == DType::F32 ? Tol{1e-4f, 1e-4f} : dw_dtype == DType::BF16 ? Tol{0.3f, 3e-2f} : Tol{0.1f, 3e-2f};
  Tensor xd = cuda::to_device(x, dt), wd = cuda::to_device(w, dt), dyd = cuda::to_device(dy, dt);
  Tensor y = cuda::empty({rows, n}, dt), dx = cuda::empty({rows, k}, dt), dw = cuda::empty({e, n, k}, dw_dtype);
  cuda::poison(y);
  cuda::poison(dx);
  cuda::poison(dw);
  const bool equal_experts = kind.rfind("uniform", 0) == 0;
  const std::string want_path = equal_experts ? "strided" : ragged_path(dt);
  const auto check_path = [&](const char* what, const std::string& want) {
    if (!want.empty()) EXPECT_EQ(cuda::last_grouped_gemm_path(), want) << what << " " << kind;
  };
  cuda::grouped_linear(xd, wd, off, y);
  check_path("forward", want_path);
  cuda::grouped_linear_input_grad(dyd, wd, off, dx);
  check_path("input grad", want_path);
  cuda::grouped_linear_weight_grad(dyd, xd, off, dw, /*accumulate=*/false);
  check_path("weight grad", equal_experts || ragged_weight_grad_path(dt).empty() ? want_path : ragged_weight_grad_path(dt));
  expect_close(y, y_want, t, "grouped forward " + kind);
  expect_close(dx, dx_want, t, "grouped input grad " + kind);
  expect_close(dw, dw_want, tw, "grouped weight grad (empty experts zeroed) " + kind);
  // Accumulating adds to what is there.
  cuda::grouped_linear_weight_grad(dyd, xd, off, dw, /*accumulate=*/true);
  Tensor twice = dw_want.clone();
  ops::add_inplace(twice, dw_want);
  expect_close(dw, twice, Tol{2 * tw.atol, tw.rtol}, "grouped weight grad accumulate " + kind);
  // With row flags the empty experts are left as they were (the poison: all bits set, NaN) and
  // flagged 0; zeroing the unwritten rows then gives the gradient written whole.
  Tensor dw_flagged = cuda::empty({e, n, k}, dw_dtype), written = cuda::empty({e}, DType::U8);
  cuda::poison(dw_flagged);
  cuda::poison(written);
  cuda::grouped_linear_weight_grad(dyd, xd, off, dw_flagged, /*accumulate=*/false, &written);
  check_path("weight grad with row flags",
             equal_experts || ragged_weight_grad_path(dt).empty() ? want_path : ragged_weight_grad_path(dt));
  const Tensor flags = cuda::to_host_f32(written), got = cuda::to_host_f32(dw_flagged);
  for (int64_t i = 0; i < e; ++i) {
    const bool has_rows = off[i + 1] > off[i];
    EXPECT_EQ(flags.f32()[i], has_rows ? 1.f : 0.f) << "expert " << i << " " << kind;
    const float first = got.f32()[i * n * k], last = got.f32()[(i + 1) * n * k - 1];
    if (!has_rows) EXPECT_TRUE(std::isnan(first) && std::isnan(last)) << "empty expert " << i << " was written " << kind;
  }
  cuda::zero_unwritten_rows(dw_flagged, written);
  expect_close(dw_flagged, dw_want, tw, "grouped weight grad, empty experts flagged then zeroed " + kind);
  // Asked for partial squares, the ragged kernel takes every written gradient (equal experts too)
  // and leaves them; their total is dW's sum of squares as stored (the unwritten experts' poison
  // not counted). Other paths leave none.
  Tensor dw_sq = cuda::empty({e, n, k}, dw_dtype), written_sq = cuda::empty({e}, DType::U8), squares;
  cuda::poison(dw_sq);
  squares = cuda::empty({3}, DType::F32);  // whatever the caller held is replaced
  cuda::grouped_linear_weight_grad(dyd, xd, off, dw_sq, /*accumulate=*/false, &written_sq, &squares);
  const std::string sq_path = ragged_weight_grad_path(dt);
  if (!sq_path.empty()) {
    EXPECT_EQ(cuda::last_grouped_gemm_path(), sq_path) << "weight grad with partial squares " << kind;
    ASSERT_TRUE(squares.defined()) << kind;
    const Tensor stored = cuda::to_host_f32(dw_sq), partial = cuda::to_host_f32(squares);
    double want = 0, got_sum = 0;
    for (int64_t i = 0; i < e; ++i)
      if (off[i + 1] > off[i])
        for (int64_t j = i * n * k; j < (i + 1) * n * k; ++j) want += static_cast<double>(stored.f32()[j]) * stored.f32()[j];
    for (int64_t j = 0; j < partial.numel(); ++j) got_sum += partial.f32()[j];
    EXPECT_NEAR(got_sum, want, 1e-5 * want + 1e-30) << "partial squares " << kind;
    cuda::zero_unwritten_rows(dw_sq, written_sq);
    expect_close(dw_sq, dw_want, tw, "the gradient written beside its partial squares " + kind);
  } else {
    EXPECT_FALSE(squares.defined()) << "partial squares off the ragged kernel " << kind;
  }
}

TEST_P(CudaOps, RoutingPermuteUnpermuteAndBackward) {
  REQUIRE_GPU();
  const DType dt = GetParam();
  const int64_t t = 300, k = 4, e = 16;
  // h = 72: rows of whole 16-byte packs (the vectorised kernels); 70: the element-wise path.
  for (const int64_t h : {int64_t{72}, int64_t{70}}) {
    SCOPED_TRACE("h = " + std::to_string(h));
    std::mt19937 g(91);
    std::vector<int64_t> idx(t * k);
    for (int64_t i = 0; i < t; ++i) {
      std::vector<int64_t> pool(e);
      for (int64_t j = 0; j < e; ++j) pool[j] = j;
      std::shuffle(pool.begin(), pool.end(), g);
      for (int64_t j = 0; j < k; ++j) idx[i * k + j] = (i % 3 == 0 && j == 0) ? 5 : pool[j] == 5 ? 6 : pool[j];
    }
    for (int64_t i = 0; i < t * k; ++i) idx[i] = idx[i] == 9 ? 10 : idx[i];  // expert 9 gets no tokens
    // Reference plan: rows grouped by expert, token order inside.
    std::vector<int64_t> off(e + 1, 0), dest(t * k);
    for (int64_t a : idx) ++off[a + 1];
    for (int64_t i = 0; i < e; ++i) off[i + 1] += off[i];
    std::vector<int64_t> fill(off.begin(), off.end() - 1);
    for (int64_t a = 0; a < t * k; ++a) dest[a] = fill[idx[a]]++;
    Tensor x = randn({t, h}, 92), w = randn({t, k}, 93, 0.5f), dy = randn({t, h}, 94), yp = randn({t * k, h}, 95);
    Tensor xr = rounded(x, dt), ypr = rounded(yp, dt), dyr = rounded(dy, dt);

    const auto plan = cuda::plan_routing(cuda::to_device(Tensor::from_i64(idx, {t, k}), DType::I64), e);
    EXPECT_EQ(plan.offsets, off);
    Tensor got_dest = cuda::to_host_f32(plan.dest_row);
    EXPECT_EQ(std::vector<int64_t>(got_dest.i64(), got_dest.i64() + t * k), dest);

    Tensor xp_want = Tensor::zeros({t * k, h}, DType::F32), y_want = Tensor::zeros({t, h}, DType::F32);
    Tensor dx_want = Tensor::zeros({t, h}, DType::F32), dyp_want = Tensor::zeros({t * k, h}, DType::F32);
    Tensor dw_want = Tensor::zeros({t, k}, DType::F32);
    for (int64_t a = 0; a < t * k; ++a) {
      const int64_t tok = a / k;
      for (int64_t c = 0; c < h; ++c) {
        xp_want.f32()[dest[a] * h + c] = xr.f32()[tok * h + c];
        y_want.f32()[tok * h + c] += w.f32()[a] * ypr.f32()[dest[a] * h + c];
        dyp_want.f32()[dest[a] * h + c] = w.f32()[a] * dyr.f32()[tok * h + c];
        dw_want.f32()[a] += dyr.f32()[tok * h + c] * ypr.f32()[dest[a] * h + c];
        dx_want.f32()[tok * h + c] += ypr.f32()[dest[a] * h + c];  // permute backward of d_xp = yp
      }
    }
    Tensor wd = cuda::to_device(w, DType::F32), ypd = cuda::to_device(yp, dt);
    expect_close(cuda::permute_tokens(cuda::to_device(x, dt), plan), xp_want, {0, 0}, "permute");
    expect_close(cuda::unpermute_tokens(ypd, wd, plan), y_want, tol_for(dt), "unpermute");
    Tensor dyp, dwt;
    cuda::unpermute_tokens_backward(cuda::to_device(dy, dt), ypd, wd, plan, dyp, dwt);
    expect_close(dyp, dyp_want, tol_for(dt), "unpermute backward d_yp");
    expect_close(dwt, dw_want, dt == DType::F32 ? Tol{1e-4f, 1e-4f} : Tol{0.1f, 2e-2f}, "unpermute backward d_weights");
    expect_close(cuda::permute_tokens_backward(ypd, plan), dx_want, tol_for(dt), "permute backward");
  }
  EXPECT_THROW(cuda::plan_routing(cuda::to_device(Tensor::from_i64({0, 16}, {1, 2}), DType::I64), e), Error);
}

// More assignments than one tile of the rank kernel (1024 threads x 32 = 32,768), the last tile
// partial, skewed toward a few experts (one with nearly all of a tile) and some experts empty: the
// plan numbers each expert's rows in token order across the tiles.
TEST(CudaOpsRouting, PlansOverSeveralRankTiles) {
  REQUIRE_GPU();
  const int64_t t = 9001, k = 8, e = 128;
  std::mt19937 g(17);
  std::vector<int64_t> idx(t * k);
  for (int64_t a = 0; a < t * k; ++a) {
    const uint32_t r = g();
    idx[a] = a < 30000 && r % 4 != 0 ? 7 : (r % 8 == 0 ? 3 : static_cast<int64_t>(r % 100));
  }
  std::vector<int64_t> off(e + 1, 0), dest(t * k);
  for (int64_t x : idx) ++off[x + 1];
  for (int64_t i = 0; i < e; ++i) off[i + 1] += off[i];
  std::vector<int64_t> fill(off.begin(), off.end() - 1);
  for (int64_t a = 0; a < t * k; ++a) dest[a] = fill[idx[a]]++;
  const auto plan = cuda::plan_routing(cuda::to_device(Tensor::from_i64(idx, {t, k}), DType::I64), e);
  EXPECT_EQ(plan.offsets, off);
  Tensor got = cuda::to_host_f32(plan.dest_row);
  EXPECT_EQ(std::vector<int64_t>(got.i64(), got.i64() + t * k), dest);
}

// A started plan: its permutation queued before the host has the offsets gives what the finished
// plan gives, the offsets arrive at finish_plan, and several plans can be in flight at once (each
// its own pinned slot). An expert index out of range: the permutation skips the pair it could not
// place (no write outside the buffer) and finish_plan names the error.
TEST(CudaOpsRouting, StartedPlansPermuteBeforeTheirOffsetsArrive) {
  REQUIRE_GPU();
  const int64_t t = 257, k = 4, e = 37, h = 64;
  std::mt19937 g(3);
  std::vector<std::vector<int64_t>> indices(3, std::vector<int64_t>(t * k));
  for (auto& idx : indices)
    for (auto& a : idx) a = static_cast<int64_t>(g() % (e - 3));  // the last three experts get nothing
  const Tensor x = randn({t, h}, 4);
  const Tensor xd = cuda::to_device(x, DType::BF16);
  std::vector<ops::RoutingPlan> started;
  std::vector<Tensor> permuted;
  for (const auto& idx : indices) {
    started.push_back(ops::plan_routing_started(cuda::to_device(Tensor::from_i64(idx, {t, k}), DType::I64), e));
    EXPECT_TRUE(started.back().offsets.empty());
    permuted.push_back(ops::permute_tokens(xd, started.back()));
  }
  for (size_t i = 0; i < indices.size(); ++i) {
    ops::finish_plan(started[i]);
    const auto plan = cuda::plan_routing(cuda::to_device(Tensor::from_i64(indices[i], {t, k}), DType::I64), e);
    EXPECT_EQ(started[i].offsets, plan.offsets) << i;
    expect_close(permuted[i], cuda::to_host_f32(cuda::permute_tokens(xd, plan)), {0, 0}, "started permute");
  }
  std::vector<int64_t> bad(t * k, 1);
  bad[5] = e + 2;
  auto plan = ops::plan_routing_started(cuda::to_device(Tensor::from_i64(bad, {t, k}), DType::I64), e);
  const Tensor unplaced = ops::permute_tokens(xd, plan);  // runs on the device before the check
  try {
    ops::finish_plan(plan);
    ADD_FAILURE() << "an out-of-range expert index passed";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("plan_routing: an expert index is outside [0, 37)"), std::string::npos)
        << err.what();
  }
  EXPECT_NO_THROW(cuda::synchronize());  // no fault on the device
}

// The row gather of the expert-parallel exchange: repeats, skipped rows, reversed order; exact.
TEST_P(CudaOps, GatherRowsMatchesAHostGather) {
  REQUIRE_GPU();
  const DType dt = GetParam();
  const int64_t r = 57, h = 40;
  std::mt19937 g(17);
  std::uniform_int_distribution<int64_t> pick(0, r - 1);
  std::vector<int64_t> index(200);
  for (auto& i : index) i = pick(g);
  index[0] = r - 1;
  Tensor x = randn({r, h}, 18), xr = rounded(x, dt);
  Tensor want = Tensor::zeros({static_cast<int64_t>(index.size()), h}, DType::F32);
  for (size_t i = 0; i < index.size(); ++i)
    for (int64_t c = 0; c < h; ++c) want.f32()[i * h + c] = xr.f32()[index[i] * h + c];
  Tensor idx = cuda::to_device(Tensor::from_i64(index, {static_cast<int64_t>(index.size())}), DType::I64);
  expect_close(cuda::gather_rows(cuda::to_device(x, dt), idx), want, {0, 0}, "gather_rows");
  Tensor none = cuda::to_device(Tensor::from_i64(std::vector<int64_t>{}, {0}), DType::I64);
  EXPECT_EQ(cuda::gather_rows(cuda::to_device(x, dt), none).size(0), 0);
}

}  // namespace

namespace {

// Attention forward and backward against the CPU reference: causal with GQA, head dims 64 and 128,
// plain, with a sliding window, and with document ids of a packed row.
// Runs each case on both backends: the native kernels (MOEFORGE_ATTENTION=native) and the default
// choice, which is cuDNN for BF16 without document ids when this build has it; the test checks
// that the backend it meant to exercise is the one that ran.
void attention_case(DType dt, int64_t s, bool want_native);

TEST_P(CudaOps, AttentionForwardBackwardMatchCpu) {
  REQUIRE_GPU();
  for (int64_t s : {77, 300}) {
    attention_case(GetParam(), s, true);
    attention_case(GetParam(), s, false);
  }
}

void attention_case(DType dt, int64_t s, bool want_native) {
  if (want_native) setenv("MOEFORGE_ATTENTION", "native", 1);
  else unsetenv("MOEFORGE_ATTENTION");
  const int64_t b = 2, hq = 8, hkv = 2;
  std::vector<int64_t> docs(b * s);
  for (int64_t i = 0; i < b * s; ++i) docs[i] = (i % s) < 30 ? 0 : ((i % s) < 31 ? 1 : 2);  // a one-token document too
  Tensor doc_ids = Tensor::from_i64(docs, {b, s});
  for (int64_t d : {64, 128})
    for (int mode = 0; mode < 3; ++mode) {
      const std::optional<int64_t> window = mode == 1 ? std::optional<int64_t>(9) : std::nullopt;
      const Tensor* dids = mode == 2 ? &doc_ids : nullptr;
      const float scale = 1.f / std::sqrt(static_cast<float>(d));
      Tensor q = randn({b, s, hq, d}, 200 + static_cast<uint32_t>(d), 1.f), k = randn({b, s, hkv, d}, 300, 1.f),
             v = randn({b, s, hkv, d}, 400), dout = randn({b, s, hq, d}, 500);
      Tensor qr = rounded(q, dt), kr = rounded(k, dt), vr = rounded(v, dt), dor = rounded(dout, dt);
      Tensor want = ops::attention(qr, kr, vr, scale, window, dids);
      Tensor dq_w, dk_w, dv_w;
      ops::attention_backward(qr, kr, vr, dor, scale, window, dids, dq_w, dk_w, dv_w);
      Tensor qd = cuda::to_device(q, dt), kd = cuda::to_device(k, dt), vd = cuda::to_device(v, dt);
      Tensor dd = mode == 2 ? cuda::to_device(doc_ids, DType::I64) : Tensor();
      Tensor lse;
      const std::string backend = cuda::attention_backend(qd, window ? *window : 0, mode == 2 ? &dd : nullptr);
#ifdef MOEFORGE_HAVE_CUDNN
      const bool cudnn_expected = !want_native && dt == DType::BF16 && mode != 2;
#else
      const bool cudnn_expected = false;
#endif
      EXPECT_EQ(backend, cudnn_expected ? "cudnn" : "native");
      Tensor out = cuda::attention(qd, kd, vd, scale, window ? *window : 0, mode == 2 ? &dd : nullptr, &lse);
      const std::string what = backend + " s=" + std::to_string(s) + " d=" + std::to_string(d) + " mode=" + std::to_string(mode);
      const Tol t = dt == DType::F32 ? Tol{2e-5f, 2e-4f} : Tol{3e-2f, 3e-2f};
      expect_close(out, want, t, "attention forward " + what);
      Tensor dq, dk, dv;
      cuda::attention_backward(qd, kd, vd, out, lse, cuda::to_device(dout, dt), scale, window ? *window : 0,
                               mode == 2 ? &dd : nullptr, dq, dk, dv);
      const Tol tb = dt == DType::F32 ? Tol{1e-4f, 1e-3f} : Tol{6e-2f, 5e-2f};
      expect_close(dq, dq_w, tb, "attention dq " + what);
      expect_close(dk, dk_w, tb, "attention dk " + what);
      expect_close(dv, dv_w, tb, "attention dv " + what);
    }
  unsetenv("MOEFORGE_ATTENTION");
}

// GPT-OSS's sinks (on both backends, with a window on some cases) and MLA's different q/k and v
// head dims (192 / 128, and the test fixtures' 24 / 12) against the CPU reference, gradients of the
// sinks included.
TEST_P(CudaOps, AttentionSinksAndMlaHeadDimsMatchCpu) {
  REQUIRE_GPU();
  const DType dt = GetParam();
  const int64_t b = 2, s = 70, hq = 4, hkv = 2;
  struct Case {
    int64_t d, dv;
    bool sinks;
    std::optional<int64_t> window;
    bool native;
  };
  const Case cases[] = {{64, 64, true, std::nullopt, true}, {64, 64, true, 5, true},   {64, 64, true, std::nullopt, false},
                        {64, 64, true, 5, false},           {192, 128, false, std::nullopt, true}, {24, 12, false, std::nullopt, true},
                        {12, 8, true, std::nullopt, true}};
  for (const Case& c : cases) {
    if (c.native) setenv("MOEFORGE_ATTENTION", "native", 1);
    else unsetenv("MOEFORGE_ATTENTION");
    const float scale = 1.f / std::sqrt(static_cast<float>(c.d));
    Tensor q = randn({b, s, hq, c.d}, 710), k = randn({b, s, hkv, c.d}, 711), v = randn({b, s, hkv, c.dv}, 712),
           dout = randn({b, s, hq, c.dv}, 713), sinks = randn({hq}, 714, 2.f);
    Tensor qr = rounded(q, dt), kr = rounded(k, dt), vr = rounded(v, dt), dor = rounded(dout, dt);
    const Tensor* sk = c.sinks ? &sinks : nullptr;
    Tensor want = ops::attention(qr, kr, vr, scale, c.window, nullptr, sk);
    Tensor dq_w, dk_w, dv_w, ds_w;
    ops::attention_backward(qr, kr, vr, dor, scale, c.window, nullptr, dq_w, dk_w, dv_w, sk, c.sinks ? &ds_w : nullptr);
    Tensor qd = cuda::to_device(q, dt), kd = cuda::to_device(k, dt), vd = cuda::to_device(v, dt),
           sd = cuda::to_device(sinks, DType::F32), lse;
    const Tensor* skd = c.sinks ? &sd : nullptr;
    const std::string what = "d=" + std::to_string(c.d) + "/" + std::to_string(c.dv) + (c.sinks ? " sinks" : "") +
                             (c.window ? " window" : "") + (c.native ? " native" : " default backend");
    Tensor out = cuda::attention(qd, kd, vd, scale, c.window ? *c.window : 0, nullptr, &lse, skd);
    expect_close(out, want, dt == DType::F32 ? Tol{2e-5f, 2e-4f} : Tol{3e-2f, 3e-2f}, "attention forward " + what);
    Tensor dq, dk, dv, ds;
    cuda::attention_backward(qd, kd, vd, out, lse, cuda::to_device(dout, dt), scale, c.window ? *c.window : 0, nullptr,
                             dq, dk, dv, skd, c.sinks ? &ds : nullptr);
    const Tol tb = dt == DType::F32 ? Tol{1e-4f, 1e-3f} : Tol{6e-2f, 5e-2f};
    expect_close(dq, dq_w, tb, "attention dq " + what);
    expect_close(dk, dk_w, tb, "attention dk " + what);
    expect_close(dv, dv_w, tb, "attention dv " + what);
    if (c.sinks) expect_close(ds, ds_w, dt == DType::F32 ? Tol{1e-3f, 1e-3f} : Tol{0.3f, 5e-2f}, "attention dsinks " + what);
  }
  unsetenv("MOEFORGE_ATTENTION");
}

}  // namespace

namespace {

// Against the unfused CPU path: logits = h W^T, cross-entropy with its gradient, then both linear
// gradients; chunks of 7 rows over 40 tokens (a partial last chunk, ignored targets).
TEST_P(CudaOps, FusedLinearCrossEntropyMatchesUnfused) {
  REQUIRE_GPU();
  const DType dt = GetParam();
  const int64_t n = 40, h = 64, v = 1000;
  Tensor hid = randn({n, h}, 601), w = randn({v, h}, 602, 0.2f);
  std::vector<int64_t> t(n);
  for (int64_t i = 0; i < n; ++i) t[i] = i % 9 == 4 ? -100 : (i * 131) % v;
  Tensor targets = Tensor::from_i64(t, {n});
  Tensor hr = rounded(hid, dt), wr = rounded(w, dt);
  Tensor logits = rounded(ops::linear(hr, wr), dt);  // logits exist in the activation dtype
  Tensor dlogits = Tensor::zeros({n, v}, DType::F32);
  int64_t want_n = 0;
  const double want = ops::cross_entropy_backward(logits, targets, -100, 0.03f, dlogits, &want_n);
  Tensor dl = rounded(dlogits, dt);
  Tensor dh_want = ops::linear_input_grad(dl, wr);
  Tensor dw_want = Tensor::zeros({v, h}, DType::F32);
  ops::linear_weight_grad(dl, hr, dw_want);
  Tensor dh, dw = cuda::to_device(Tensor::zeros({v, h}, DType::F32), DType::F32);
  int64_t got_n = 0;
  const double got = cuda::fused_linear_cross_entropy(cuda::to_device(hid, dt), cuda::to_device(w, dt),
                                                      cuda::to_device(targets, DType::I64), -100, 0.03f, dh, &dw, &got_n, 7);
  EXPECT_EQ(got_n, want_n);
  EXPECT_NEAR(got, want, (dt == DType::F32 ? 1e-4 : 2e-2) * std::fabs(want));
  const Tol t2 = dt == DType::F32 ? Tol{1e-5f, 1e-4f} : Tol{3e-3f, 5e-2f};
  expect_close(dh, dh_want, t2, "fused CE d_hidden");
  expect_close(dw, dw_want, t2, "fused CE dW");
}

}  // namespace
