// Dequantisation of hub checkpoints' quantized weights on synthetic blocks: float8 e4m3 codes
// against values from the OCP 8-bit floating point spec (normals, subnormals, the maximum, NaN),
// FP8 block scales with partial edge blocks against a direct per-element reference, and MXFP4 rows
// (nibble order, E8M0 scales) against hand-computed values; bad shapes are one clear error.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "hf/dequantize.h"
#include "test_util.h"

using namespace moeforge;

namespace {

Tensor bytes(const std::vector<uint8_t>& v, Shape s, DType dt = DType::U8) {
  Tensor t = Tensor::empty(std::move(s), dt);
  std::memcpy(t.raw(), v.data(), v.size());
  return t;
}

TEST(Fp8E4M3, CodesDecodeToTheSpecValues) {
  EXPECT_EQ(hf::fp8_e4m3_to_float(0x00), 0.0f);
  EXPECT_TRUE(std::signbit(hf::fp8_e4m3_to_float(0x80)));
  EXPECT_EQ(hf::fp8_e4m3_to_float(0x38), 1.0f);     // 0.0111.000
  EXPECT_EQ(hf::fp8_e4m3_to_float(0x3C), 1.5f);     // 0.0111.100
  EXPECT_EQ(hf::fp8_e4m3_to_float(0x40), 2.0f);     // 0.1000.000
  EXPECT_EQ(hf::fp8_e4m3_to_float(0xC0), -2.0f);
  EXPECT_EQ(hf::fp8_e4m3_to_float(0x7E), 448.0f);   // the largest finite value
  EXPECT_EQ(hf::fp8_e4m3_to_float(0xFE), -448.0f);
  EXPECT_EQ(hf::fp8_e4m3_to_float(0x08), 0.015625f);  // the smallest normal, 2^-6
  EXPECT_EQ(hf::fp8_e4m3_to_float(0x01), 0.001953125f);  // the smallest subnormal, 2^-9
  EXPECT_EQ(hf::fp8_e4m3_to_float(0x07), 7 * 0.001953125f);
  EXPECT_TRUE(std::isnan(hf::fp8_e4m3_to_float(0x7F)));
  EXPECT_TRUE(std::isnan(hf::fp8_e4m3_to_float(0xFF)));
  EXPECT_EQ(hf::fp8_e4m3_to_float(0x77), 240.0f);   // 0.1110.111: 1.875 * 2^7; e = 15 with m < 7 is finite
  EXPECT_EQ(hf::fp8_e4m3_to_float(0x78), 256.0f);   // 0.1111.000
  // Monotonic over the positive finite codes.
  for (int c = 1; c < 0x7F; ++c) EXPECT_LT(hf::fp8_e4m3_to_float(c - 1), hf::fp8_e4m3_to_float(c)) << c;
}

TEST(Fp4E2M1, CodesDecodeToTheSpecValues) {
  const float want[16] = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6, -0.0f, -0.5f, -1, -1.5f, -2, -3, -4, -6};
  for (int c = 0; c < 16; ++c) EXPECT_EQ(hf::fp4_e2m1_to_float(c), want[c]) << c;
}

TEST(Dequantize, Fp8BlocksWithPartialEdgeBlocks) {
  // [5, 7] in 2 x 3 blocks: 3 x 3 scales, the last row and column of blocks partial.
  const int64_t n = 5, k = 7;
  std::mt19937 g(5);
  std::vector<uint8_t> codes(n * k);
  for (auto& c : codes) {
    c = static_cast<uint8_t>(g() & 0xFF);
    if ((c & 0x7F) == 0x7F) c = 0x38;  // no NaN in a weight
  }
  const std::vector<float> s = {0.5f, 2.0f, 0.25f, 1.0f, 3.0f, 0.125f, 8.0f, 0.75f, 1.5f};
  Tensor w = bytes(codes, {n, k}, DType::F8_E4M3);
  Tensor out = hf::dequantize_fp8_blocks(w, Tensor::from_vector(s, {3, 3}), 2, 3, DType::F32, "layer.q_a_proj.weight");
  ASSERT_EQ(out.shape(), (Shape{n, k}));
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < k; ++c)
      EXPECT_EQ(out.f32()[r * k + c], hf::fp8_e4m3_to_float(codes[r * k + c]) * s[(r / 2) * 3 + c / 3]) << r << "," << c;
  // BF16 output: the F32 product rounded once.
  Tensor bf = hf::dequantize_fp8_blocks(w, Tensor::from_vector(s, {3, 3}), 2, 3, DType::BF16, "w");
  EXPECT_EQ(bf.dtype(), DType::BF16);
  EXPECT_EQ(test::max_abs_diff(bf.to(DType::F32), out.to(DType::BF16).to(DType::F32)), 0.f);
  // A scale grid that does not cover the weight names the tensor.
  const std::string err = test::error_of(
      [&] { hf::dequantize_fp8_blocks(w, Tensor::from_vector({1, 1, 1, 1}, {2, 2}), 2, 3, DType::F32, "layer.q_a_proj.weight"); });
  EXPECT_NE(err.find("layer.q_a_proj.weight_scale_inv: shape [2, 2] does not cover a [5, 7] weight in 2x3 blocks"),
            std::string::npos) << err;
}

TEST(Dequantize, Mxfp4RowsLowNibbleFirstWithE8M0Scales) {
  // blocks [2, 2, 16] (2 rows of 2 groups), scales [2, 2].
  std::vector<uint8_t> blk(2 * 2 * 16, 0);
  blk[0] = 0x21;  // row 0 group 0: values 0 and 1 = +0.5 (lo nibble 1), +1.0 (hi nibble 2)
  blk[15] = 0xF7;  // values 30, 31 = +6 (7), -6 (15)
  blk[16] = 0x9A;  // row 0 group 1: -1.0 (0xA), -0.5 (0x9)
  blk[3 * 16 + 1] = 0x55;  // row 1 group 1: values 2, 3 = +3, +3
  const std::vector<uint8_t> sc = {127, 128, 125, 130};  // x1, x2, x0.25, x8
  Tensor out = hf::dequantize_mxfp4(bytes(blk, {2, 2, 16}), bytes(sc, {2, 2}), DType::F32, "experts.gate_up_proj");
  ASSERT_EQ(out.shape(), (Shape{2, 64}));
  const float* o = out.f32();
  EXPECT_EQ(o[0], 0.5f);
  EXPECT_EQ(o[1], 1.0f);
  EXPECT_EQ(o[30], 6.0f);
  EXPECT_EQ(o[31], -6.0f);
  EXPECT_EQ(o[32], -2.0f);  // -1.0 * 2
  EXPECT_EQ(o[33], -1.0f);  // -0.5 * 2
  EXPECT_EQ(o[64 + 32 + 2], 24.0f);  // 3 * 8
  EXPECT_EQ(o[64 + 32 + 3], 24.0f);
  float nonzero = 0;
  for (int i = 0; i < 128; ++i) nonzero += o[i] != 0.0f;
  EXPECT_EQ(nonzero, 8);  // the four bytes set, two values each
  const std::string err = test::error_of(
      [&] { hf::dequantize_mxfp4(bytes(blk, {2, 2, 16}), bytes({1, 2, 3}, {3}), DType::F32, "experts.down_proj"); });
  EXPECT_NE(err.find("experts.down_proj_scales: shape [3] does not match blocks [2, 2, 16]"), std::string::npos) << err;
}

}  // namespace
