// Each CPU op against a direct (naive, double precision) computation of its definition.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "nn/rotary.h"
#include "ops/cpu/cpu_ops.h"
#include "ops/ops.h"
#include "test_util.h"

using namespace moeforge;
using test::random_tensor;

TEST(Ops, MatmulNtMatchesNaive) {
  for (auto [m, n, k] : {std::tuple{1, 1, 1}, {7, 5, 3}, {33, 65, 70}, {130, 17, 257}}) {
    Tensor a = random_tensor({m, k}, 1), b = random_tensor({n, k}, 2), c = Tensor::empty({m, n}, DType::F32);
    ops::gemm(a, false, b, true, c);
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < n; ++j) {
        double s = 0;
        for (int p = 0; p < k; ++p) s += double(a.f32()[i * k + p]) * b.f32()[j * k + p];
        ASSERT_NEAR(c.f32()[i * n + j], s, 1e-4 * (1 + std::abs(s))) << m << "x" << n << "x" << k;
      }
  }
}

TEST(Ops, MatmulAcceptsBf16Weights) {
  Tensor a = random_tensor({4, 8}, 3), b = random_tensor({5, 8}, 4, 1.f, DType::BF16);
  Tensor c1 = Tensor::empty({4, 5}, DType::F32), c2 = Tensor::empty({4, 5}, DType::F32);
  ops::gemm(a, false, b, true, c1);
  ops::gemm(a, false, b.to(DType::F32), true, c2);
  EXPECT_EQ(test::max_abs_diff(c1, c2), 0.f);
}

TEST(Ops, RmsNorm) {
  Tensor x = random_tensor({3, 10}, 5), w = random_tensor({10}, 6);
  Tensor y = ops::rms_norm(x, w, 1e-6f);
  for (int r = 0; r < 3; ++r) {
    double ss = 0;
    for (int i = 0; i < 10; ++i) ss += double(x.f32()[r * 10 + i]) * x.f32()[r * 10 + i];
    const double inv = 1 / std::sqrt(ss / 10 + 1e-6);
    for (int i = 0; i < 10; ++i) EXPECT_NEAR(y.f32()[r * 10 + i], w.f32()[i] * x.f32()[r * 10 + i] * inv, 1e-5);
  }
}

TEST(Ops, SoftmaxAndTopkPreferLowerIndexOnTies) {
  Tensor x = Tensor::from_vector({1, 3, 3, 0, 2, 2, 2, 5}, {2, 4});
  Tensor v, i;
  ops::cpu::topk_rows(x, 2, v, i);
  EXPECT_EQ(std::vector<int64_t>(i.i64(), i.i64() + 4), std::vector<int64_t>({1, 2, 3, 0}));
  ops::cpu::softmax_rows_inplace(x);
  double s = 0;
  for (int j = 0; j < 4; ++j) s += x.f32()[j];
  EXPECT_NEAR(s, 1.0, 1e-6);
  EXPECT_NEAR(x.f32()[1] / x.f32()[0], std::exp(2.0), 1e-4);
}

TEST(Ops, RopeRotatesHalves) {
  Tensor x = Tensor::from_vector({1, 2, 3, 4}, {1, 1, 4});
  const float c0 = std::cos(0.5f), s0 = std::sin(0.5f), c1 = std::cos(0.25f), s1 = std::sin(0.25f);
  Tensor cos = Tensor::from_vector({c0, c1, c0, c1}, {1, 4}), sin = Tensor::from_vector({s0, s1, s0, s1}, {1, 4});
  ops::rope_inplace(x, cos, sin);
  EXPECT_NEAR(x.f32()[0], 1 * c0 - 3 * s0, 1e-6);
  EXPECT_NEAR(x.f32()[1], 2 * c1 - 4 * s1, 1e-6);
  EXPECT_NEAR(x.f32()[2], 3 * c0 + 1 * s0, 1e-6);
  EXPECT_NEAR(x.f32()[3], 4 * c1 + 2 * s1, 1e-6);
}

namespace {
// Direct attention for one (batch, q-head) with an explicit mask predicate.
template <typename Mask>
void naive_attention(const Tensor& q, const Tensor& k, const Tensor& v, float scale, Mask allowed, Tensor& out) {
  const int64_t b = q.size(0), s = q.size(1), hq = q.size(2), d = q.size(3), hkv = k.size(2);
  for (int64_t bi = 0; bi < b; ++bi)
    for (int64_t h = 0; h < hq; ++h)
      for (int64_t i = 0; i < s; ++i) {
        std::vector<double> p(s, 0.0);
        double mx = -1e300, sum = 0;
        for (int64_t j = 0; j < s; ++j) {
          if (!allowed(bi, i, j)) continue;
          double dot = 0;
          for (int64_t x = 0; x < d; ++x)
            dot += double(q.f32()[((bi * s + i) * hq + h) * d + x]) * k.f32()[((bi * s + j) * hkv + h / (hq / hkv)) * d + x];
          p[j] = dot * scale;
          mx = std::max(mx, p[j]);
        }
        for (int64_t j = 0; j < s; ++j) sum += allowed(bi, i, j) ? std::exp(p[j] - mx) : 0;
        for (int64_t x = 0; x < d; ++x) {
          double o = 0;
          for (int64_t j = 0; j < s; ++j)
            if (allowed(bi, i, j)) o += std::exp(p[j] - mx) / sum * v.f32()[((bi * s + j) * hkv + h / (hq / hkv)) * d + x];
          out.f32()[((bi * s + i) * hq + h) * d + x] = static_cast<float>(o);
        }
      }
}
}  // namespace

TEST(Ops, AttentionCausalWindowAndDocuments) {
  const int64_t b = 2, s = 9, hq = 4, hkv = 2, d = 8;
  Tensor q = random_tensor({b, s, hq, d}, 7), k = random_tensor({b, s, hkv, d}, 8), v = random_tensor({b, s, hkv, d}, 9);
  Tensor ref = Tensor::empty({b, s, hq, d}, DType::F32);
  const float scale = 0.35f;
  naive_attention(q, k, v, scale, [](int64_t, int64_t i, int64_t j) { return j <= i; }, ref);
  EXPECT_LT(test::max_abs_diff(ops::attention(q, k, v, scale, std::nullopt), ref), 1e-5);
  naive_attention(q, k, v, scale, [](int64_t, int64_t i, int64_t j) { return j <= i && i - j < 3; }, ref);
  EXPECT_LT(test::max_abs_diff(ops::attention(q, k, v, scale, 3), ref), 1e-5);
  std::vector<int64_t> docs = {0, 0, 0, 1, 1, 2, 2, 2, 2, 0, 0, 0, 0, 0, 5, 5, 5, 5};
  Tensor doc_ids = Tensor::from_i64(docs, {b, s});
  naive_attention(q, k, v, scale, [&](int64_t bi, int64_t i, int64_t j) {
    return j <= i && docs[bi * s + i] == docs[bi * s + j];
  }, ref);
  EXPECT_LT(test::max_abs_diff(ops::attention(q, k, v, scale, std::nullopt, &doc_ids), ref), 1e-5);
}

TEST(Ops, CrossEntropyIgnoresIndex) {
  Tensor logits = Tensor::from_vector({0, 1, 2, 3, 3, 3}, {2, 3});
  int64_t n = 0;
  Tensor l = ops::cross_entropy_rows(logits, Tensor::from_i64({2, -100}, {2}), -100, &n);
  EXPECT_EQ(n, 1);
  EXPECT_NEAR(l.f32()[0], std::log(std::exp(0.) + std::exp(1.) + std::exp(2.)) - 2.0, 1e-6);
  EXPECT_EQ(l.f32()[1], 0.f);
}

// The fused LM head's default chunk: every token in one chunk while its logits fit the budget,
// else the fewest equal chunks that fit, rounded up to 64 rows (never more rows than tokens).
TEST(Ops, CrossEntropyChunkRowsByLogitBytes) {
  const int64_t gib = int64_t{1} << 30;
  EXPECT_EQ(ops::cross_entropy_chunk_rows(4096, 151936, 2), 4096);  // 1.16 GiB: one chunk
  EXPECT_EQ(ops::cross_entropy_chunk_rows(4096, 151936, 4), 2048);  // F32 logits: two
  EXPECT_EQ(ops::cross_entropy_chunk_rows(4096, 201088, 2), 2048);  // 1.53 GiB: two
  // 2.83 GiB against 1 GiB (1766 rows fit): 3 chunks of 1667 rows, rounded up to 1728.
  EXPECT_EQ(ops::cross_entropy_chunk_rows(5000, 151936, 4, gib), 1728);
  EXPECT_EQ(ops::cross_entropy_chunk_rows(100, 10, 2), 100);
  EXPECT_EQ(ops::cross_entropy_chunk_rows(0, 151936, 2), 1);  // no tokens: any positive chunk
  EXPECT_EQ(ops::cross_entropy_chunk_rows(70, 1000, 2, 1), 64);  // a budget under one row: 64 rows
  EXPECT_THROW(ops::cross_entropy_chunk_rows(10, 0, 2), Error);
}

// The reference AdamW with zero-moment row flags: the same update as without them (they are a hint
// for the device), the flags of written rows cleared and the others kept; flags without row flags
// for the gradient, or of another count, are one clear error.
TEST(Ops, AdamwZeroMomentRowsClearedWhereWritten) {
  const int64_t rows = 4, row = 3, n = rows * row;
  std::vector<float> wv(n), gv(n);
  for (int64_t i = 0; i < n; ++i) wv[i] = 0.1f * static_cast<float>(i) - 0.5f, gv[i] = 0.01f * static_cast<float>(i % 5) - 0.02f;
  const ops::AdamWScalars sc{0.1f, 0.999f, 0.001f, std::sqrt(1.f - 0.999f), 1e-8f, 1e-3f / 0.1f};
  const auto run = [&](bool with_flags, Tensor* zero_rows) {
    ops::AdamWTensors t{Tensor::from_vector(wv, {n}), Tensor::from_vector(gv, {n}), Tensor::zeros({n}, DType::F32),
                        Tensor::zeros({n}, DType::F32), 0.99f, Tensor()};
    t.grad_written_rows = Tensor::from_vector({1, 0, 1, 0}, {rows}).to(DType::U8);
    if (with_flags) t.zero_moment_rows = *zero_rows;
    ops::adamw_multi_tensor({t}, sc);
    return std::vector<Tensor>{t.param, t.exp_avg, t.exp_avg_sq};
  };
  Tensor zero_rows = Tensor::from_vector({1, 1, 0, 1}, {rows}).to(DType::U8);
  const auto got = run(true, &zero_rows), want = run(false, nullptr);
  for (size_t k = 0; k < got.size(); ++k) EXPECT_EQ(std::memcmp(got[k].raw(), want[k].raw(), got[k].nbytes()), 0) << k;
  const uint8_t* z = zero_rows.data<uint8_t>();
  EXPECT_EQ(z[0], 0);  // written: cleared
  EXPECT_EQ(z[1], 1);  // unwritten: kept
  EXPECT_EQ(z[2], 0);
  EXPECT_EQ(z[3], 1);
  ops::AdamWTensors bad{Tensor::from_vector(wv, {n}), Tensor::from_vector(gv, {n}), Tensor::zeros({n}, DType::F32),
                        Tensor::zeros({n}, DType::F32), 1.f, Tensor()};
  bad.zero_moment_rows = zero_rows;
  EXPECT_THROW(ops::adamw_multi_tensor({bad}, sc), Error);  // no written-row flags
  bad.grad_written_rows = Tensor::from_vector({1, 1, 1, 1, 1, 1}, {6}).to(DType::U8);
  EXPECT_THROW(ops::adamw_multi_tensor({bad}, sc), Error);  // 6 row flags against 4
}

// The experts' weight gradient written with its partial squares: their total is dW's sum of squares
// as stored (rounded to BF16 where dW is BF16), experts without rows counting as zeros whatever dW
// held there (with row flags they keep it); and the norm adds them as they are. Not when adding to
// a gradient (the squares would describe only the part added).
TEST(Ops, GroupedWeightGradPartialSquaresAddUpToTheStoredGradient) {
  const std::vector<int64_t> off = {0, 3, 3, 8, 9, 9, 13};
  const int64_t e = 6, n = 5, k = 7;
  const Tensor dy = random_tensor({13, n}, 31), x = random_tensor({13, k}, 32);
  for (DType dt : {DType::F32, DType::BF16})
    for (bool flags : {false, true}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + (flags ? " with row flags" : ""));
      Tensor dw = Tensor::from_vector(std::vector<float>(e * n * k, 5.f), {e, n, k}, dt), written = Tensor::empty({e}, DType::U8), squares;
      ops::grouped_linear_weight_grad(dy, x, off, dw, /*accumulate=*/false, flags ? &written : nullptr, &squares);
      ASSERT_TRUE(squares.defined());
      EXPECT_EQ(squares.dtype(), DType::F32);
      const Tensor stored = dw.to(DType::F32);
      double want = 0, got = 0;
      for (int64_t i = 0; i < e; ++i)
        if (off[i + 1] > off[i])
          for (int64_t j = i * n * k; j < (i + 1) * n * k; ++j) want += static_cast<double>(stored.f32()[j]) * stored.f32()[j];
      for (int64_t j = 0; j < squares.numel(); ++j) got += squares.f32()[j];
      EXPECT_NEAR(got, want, 1e-6 * want);
      // The norm of the gradient read (its unwritten rows as zeros) and of its partial squares agree.
      const double read = flags ? ops::global_grad_norm({dw}, {written}) : ops::global_grad_norm({dw});
      EXPECT_NEAR(ops::global_grad_norm({}, {}, {squares}), read, 1e-6 * read);
      // Both kinds in one call add up.
      EXPECT_NEAR(ops::global_grad_norm({dw}, flags ? std::vector<Tensor>{written} : std::vector<Tensor>{}, {squares}),
                  std::sqrt(2.0) * read, 1e-6 * read);
    }
  Tensor dw = Tensor::zeros({e, n, k}, DType::F32), squares;
  EXPECT_THROW(ops::grouped_linear_weight_grad(dy, x, off, dw, /*accumulate=*/true, nullptr, &squares), Error);
  EXPECT_THROW(ops::global_grad_norm({}, {}, {Tensor::zeros({2}, DType::BF16)}), Error);  // partial squares are F32
}

TEST(Ops, SwigluAndEmbedding) {
  Tensor gu = Tensor::from_vector({1, -2, 3, 4}, {1, 4});
  Tensor y = ops::swiglu(gu);
  EXPECT_NEAR(y.f32()[0], 1 / (1 + std::exp(-1.0)) * 3, 1e-6);
  EXPECT_NEAR(y.f32()[1], -2 / (1 + std::exp(2.0)) * 4, 1e-6);
  Tensor table = Tensor::from_vector({0, 1, 10, 11, 20, 21}, {3, 2}, DType::BF16);
  Tensor e = ops::embedding(Tensor::from_i64({2, 0}, {2}), table);
  EXPECT_EQ(e.to_f32_vector(), std::vector<float>({20, 21, 0, 1}));
  EXPECT_THROW(ops::embedding(Tensor::from_i64({3}, {1}), table), Error);
}

TEST(Rotary, YarnUsesTheExplicitFactorAsTransformers5) {
  hf::RopeConfig r;
  r.type = "yarn";
  r.theta = 10000;
  r.factor = 4.0;
  r.original_max_position_embeddings = 32;  // max_position_embeddings / original = 2, not 4
  nn::RotaryEmbedding rope(r, 16, 64);
  EXPECT_NEAR(rope.attention_scaling(), 0.1 * std::log(4.0) + 1.0, 1e-6);
  // The lowest frequency is fully interpolated: base frequency / factor.
  const double base_lowest = 1.0 / std::pow(10000.0, 14.0 / 16.0);
  EXPECT_NEAR(rope.inv_freq().back(), base_lowest / 4.0, 1e-9);
  EXPECT_NEAR(rope.inv_freq().front(), 1.0, 1e-7);  // the highest is extrapolated (unchanged)
}

TEST(Rotary, LinearAndLlama3) {
  hf::RopeConfig r;
  r.type = "linear";
  r.factor = 2.0;
  nn::RotaryEmbedding lin(r, 8, 64);
  EXPECT_NEAR(lin.inv_freq()[1], 1.0 / std::pow(10000.0, 2.0 / 8.0) / 2.0, 1e-9);
  r.type = "llama3";
  r.factor = 8.0;
  r.original_max_position_embeddings = 64;
  nn::RotaryEmbedding l3(r, 8, 128);
  // wavelength 2*pi/inv_freq: > 64 (low_freq_factor 1) divided by 8; < 16 (high 4) unchanged.
  EXPECT_NEAR(l3.inv_freq()[0], 1.0, 1e-7);
  const double f3 = 1.0 / std::pow(10000.0, 6.0 / 8.0);
  EXPECT_NEAR(l3.inv_freq()[3], f3 / 8.0, 1e-9);
}
