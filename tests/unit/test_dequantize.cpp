// Dequantisation of hub checkpoints' quantized weights on synthetic blocks: float8 e4m3 codes
// against values from the OCP 8-bit floating point spec (normals, subnormals, the maximum, NaN),
// FP8 block scales with partial edge blocks against a direct per-element reference, and MXFP4 rows
// (nibble order, E8M0 scales) against hand-computed values; bad shapes are one clear error. A GPT-OSS
// checkpoint with MXFP4 experts loads to the values the spec decodes.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "core/error.h"
#include "hf/dequantize.h"
#include "hf/safetensors.h"
#include "models/pretrained.h"
#include "test_util.h"

using namespace moeforge;
namespace fs = std::filesystem;

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

namespace {

// MXFP4 as the OCP spec defines it (independently of hf/dequantize.cpp): the e2m1 magnitudes, and
// for a row of 32 values one power-of-two scale with the largest magnitude at most 6.
constexpr float kE2M1[8] = {0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f};

uint8_t nearest_e2m1(float v) {
  uint8_t best = 0;
  for (uint8_t c = 1; c < 8; ++c)
    if (std::abs(std::abs(v) - kE2M1[c]) < std::abs(std::abs(v) - kE2M1[best])) best = c;
  return static_cast<uint8_t>(best | (v < 0 && best ? 8 : 0));
}

struct Mxfp4 {
  Tensor blocks, scales, values;  // [E, R, G, 16] U8, [E, R, G] U8, and the decoded [E, R, G * 32] F32
};

// Quantises w [E, R, C] (C a multiple of 32) row group by row group.
Mxfp4 quantize_mxfp4(const Tensor& w) {
  const int64_t e = w.size(0), r = w.size(1), c = w.size(2), g = c / 32;
  Mxfp4 q{Tensor::empty({e, r, g, 16}, DType::U8), Tensor::empty({e, r, g}, DType::U8), Tensor::empty({e, r, c}, DType::F32)};
  auto* blocks = q.blocks.data<uint8_t>();
  auto* scales = q.scales.data<uint8_t>();
  for (int64_t row = 0; row < e * r; ++row)
    for (int64_t gi = 0; gi < g; ++gi) {
      const float* v = w.f32() + row * c + gi * 32;
      float amax = 0.f;
      for (int i = 0; i < 32; ++i) amax = std::max(amax, std::abs(v[i]));
      const int s = amax > 0 ? static_cast<int>(std::ceil(std::log2(amax / 6.f))) : 0;
      scales[row * g + gi] = static_cast<uint8_t>(s + 127);
      for (int i = 0; i < 32; i += 2) {
        const uint8_t lo = nearest_e2m1(std::ldexp(v[i], -s)), hi = nearest_e2m1(std::ldexp(v[i + 1], -s));
        blocks[(row * g + gi) * 16 + i / 2] = static_cast<uint8_t>(lo | (hi << 4));  // the low nibble first
        for (int k = 0; k < 2; ++k) {
          const uint8_t code = k == 0 ? lo : hi;
          q.values.f32()[row * c + gi * 32 + i + k] = std::ldexp((code & 8 ? -1.f : 1.f) * kE2M1[code & 7], s);
        }
      }
    }
  return q;
}

// [E, A, B] -> [E, B, A].
Tensor swap_last_two(const Tensor& x) {
  const int64_t e = x.size(0), a = x.size(1), b = x.size(2);
  Tensor out = Tensor::empty({e, b, a}, DType::F32);
  for (int64_t i = 0; i < e; ++i)
    for (int64_t p = 0; p < a; ++p)
      for (int64_t q = 0; q < b; ++q) out.f32()[(i * b + q) * a + p] = x.f32()[(i * a + p) * b + q];
  return out;
}

}  // namespace

// A GPT-OSS checkpoint whose experts' gate_up_proj is stored as the hub stores it (MXFP4 blocks and
// scales of the transposed [E, 2I, H] rows, quantization_config in config.json) loads to exactly the
// weights of a plain checkpoint holding the decoded values, and saves as that plain checkpoint.
TEST(Dequantize, GptOssMxfp4ExpertsLoadAsTheirValues) {
  test::TempDir tmp;
  const std::string src = test::fixture("gpt_oss_a");
  auto base = hf::SafetensorsCheckpoint::open(src);
  hf::NamedTensors quantised, plain;
  for (const auto& n : base.names()) {
    Tensor t = base.get(n).to(DType::F32);
    if (n.size() > 12 && n.compare(n.size() - 12, 12, "gate_up_proj") == 0) {
      const Mxfp4 q = quantize_mxfp4(swap_last_two(t));  // rows of [E, 2I, H]: H = 32 values, one group
      quantised.emplace_back(n + "_blocks", q.blocks);
      quantised.emplace_back(n + "_scales", q.scales);
      plain.emplace_back(n, swap_last_two(q.values));
    } else {
      quantised.emplace_back(n, t);
      plain.emplace_back(n, t);
    }
  }
  auto cfg = nlohmann::ordered_json::parse(std::ifstream(src + "/config.json"));
  for (const char* d : {"q", "p"}) fs::create_directories(tmp / d);
  hf::save_safetensors(tmp / "p/model.safetensors", plain);
  test::write_bytes(tmp / "p/config.json", cfg.dump(2));
  cfg["quantization_config"] = {{"quant_method", "mxfp4"}, {"modules_to_not_convert", {"model.layers.*.self_attn"}}};
  hf::save_safetensors(tmp / "q/model.safetensors", quantised);
  test::write_bytes(tmp / "q/config.json", cfg.dump(2));

  auto q = models::from_pretrained(tmp / "q"), p = models::from_pretrained(tmp / "p");
  int quantised_params = 0;
  for (size_t i = 0; i < q.model->params().all().size(); ++i) {
    const auto& a = q.model->params().all()[i];
    ASSERT_EQ(test::max_abs_diff(a.value, p.model->params().all()[i].value), 0.f) << a.name;
    quantised_params += a.name.find("gate_up_proj") != std::string::npos && a.name.find("bias") == std::string::npos;
  }
  EXPECT_EQ(quantised_params, 2);  // both layers' experts came from MXFP4
  // The decoded values differ from the fixture's (the test would prove nothing otherwise).
  EXPECT_GT(test::max_abs_diff(p.model->params().find("model.layers.0.mlp.experts.gate_up_proj")->value,
                               base.get("model.layers.0.mlp.experts.gate_up_proj")),
            1e-3f);
  models::save_pretrained(*q.model, q.source_dir, tmp / "out");
  auto out = hf::SafetensorsCheckpoint::open(tmp / "out");
  EXPECT_TRUE(out.contains("model.layers.0.mlp.experts.gate_up_proj"));
  EXPECT_FALSE(out.contains("model.layers.0.mlp.experts.gate_up_proj_blocks"));
  EXPECT_FALSE(nlohmann::ordered_json::parse(std::ifstream(tmp / "out/config.json")).contains("quantization_config"));
}

TEST(DequantizeBadInput, Mxfp4WithoutScalesNamesTheTensor) {
  test::TempDir tmp;
  const std::string src = test::fixture("gpt_oss_a");
  auto base = hf::SafetensorsCheckpoint::open(src);
  hf::NamedTensors tensors;
  for (const auto& n : base.names())
    if (n != "model.layers.1.mlp.experts.gate_up_proj") tensors.emplace_back(n, base.get(n));
  tensors.emplace_back("model.layers.1.mlp.experts.gate_up_proj_blocks", Tensor::zeros({4, 32, 1, 16}, DType::U8));
  fs::create_directories(tmp / "m");
  hf::save_safetensors(tmp / "m/model.safetensors", tensors);
  fs::copy_file(src + "/config.json", tmp / "m/config.json");
  try {
    models::from_pretrained(tmp / "m");
    FAIL() << "loaded without the scales";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("missing tensor 'model.layers.1.mlp.experts.gate_up_proj' (nor its MXFP4"),
              std::string::npos)
        << e.what();
  }
}

namespace {

// e4m3 ("fn") as the OCP FP8 spec defines it, written here apart from hf/dequantize.cpp.
float e4m3_value(uint8_t code) {
  const int e = (code >> 3) & 15, m = code & 7;
  const float mag = e == 0 ? std::ldexp(static_cast<float>(m), -9) : std::ldexp(1.f + m / 8.f, e - 7);
  return code & 0x80 ? -mag : mag;
}

uint8_t nearest_e4m3(float v) {
  uint8_t best = 0;
  for (int c = 1; c < 127; ++c)  // 127 is NaN
    if (std::abs(std::abs(v) - e4m3_value(static_cast<uint8_t>(c))) < std::abs(std::abs(v) - e4m3_value(best)))
      best = static_cast<uint8_t>(c);
  return static_cast<uint8_t>(best | (v < 0 ? 0x80 : 0));
}

// w [N, K] as e4m3 codes with one scale per [bn, bk] block (edge blocks partial), and the values
// the codes decode to.
struct Fp8 {
  Tensor codes, scale_inv, values;
};
Fp8 quantize_fp8(const Tensor& w, int64_t bn, int64_t bk) {
  const int64_t n = w.size(0), k = w.size(1), gn = (n + bn - 1) / bn, gk = (k + bk - 1) / bk;
  Fp8 q{Tensor::empty({n, k}, DType::F8_E4M3), Tensor::empty({gn, gk}, DType::F32), Tensor::empty({n, k}, DType::F32)};
  for (int64_t bi = 0; bi < gn; ++bi)
    for (int64_t bj = 0; bj < gk; ++bj) {
      float amax = 0.f;
      for (int64_t i = bi * bn; i < std::min(n, (bi + 1) * bn); ++i)
        for (int64_t j = bj * bk; j < std::min(k, (bj + 1) * bk); ++j) amax = std::max(amax, std::abs(w.f32()[i * k + j]));
      const float s = amax > 0 ? amax / 448.f : 1.f;
      q.scale_inv.f32()[bi * gk + bj] = s;
      for (int64_t i = bi * bn; i < std::min(n, (bi + 1) * bn); ++i)
        for (int64_t j = bj * bk; j < std::min(k, (bj + 1) * bk); ++j) {
          const uint8_t c = nearest_e4m3(w.f32()[i * k + j] / s);
          static_cast<uint8_t*>(q.codes.raw())[i * k + j] = c;
          q.values.f32()[i * k + j] = e4m3_value(c) * s;
        }
    }
  return q;
}

}  // namespace

// A DeepSeek-V3 checkpoint as the hub stores it: linear weights in FP8 e4m3 with weight_scale_inv
// per block (16 x 16 here, so edge blocks are partial), quantization_config in config.json, and a
// multi-token prediction layer beyond num_hidden_layers. It loads to exactly the weights of a plain
// checkpoint holding the decoded values; the MTP layer is set aside; the save is plain.
TEST(Dequantize, DeepSeekFp8CheckpointLoadsAsItsValues) {
  test::TempDir tmp;
  const std::string src = test::fixture("deepseek_v3_a");
  auto base = hf::SafetensorsCheckpoint::open(src);
  hf::NamedTensors quantised, plain;
  int fp8_tensors = 0;
  for (const auto& n : base.names()) {
    Tensor t = base.get(n).to(DType::F32);
    const bool linear = t.dim() == 2 && n.find("proj") != std::string::npos;
    if (linear) {
      const Fp8 q = quantize_fp8(t, 16, 16);
      quantised.emplace_back(n, q.codes);
      quantised.emplace_back(n + "_scale_inv", q.scale_inv);
      plain.emplace_back(n, q.values);
      ++fp8_tensors;
    } else {
      quantised.emplace_back(n, t);
      plain.emplace_back(n, t);
    }
  }
  ASSERT_GT(fp8_tensors, 30);  // attention, dense MLP, experts and shared experts
  // Part of an MTP layer (no eh_proj: not built; set aside and not saved).
  quantised.emplace_back("model.layers.3.enorm.weight", Tensor::zeros({32}, DType::F32));
  auto cfg = nlohmann::ordered_json::parse(std::ifstream(src + "/config.json"));
  for (const char* d : {"q", "p"}) fs::create_directories(tmp / d);
  hf::save_safetensors(tmp / "p/model.safetensors", plain);
  test::write_bytes(tmp / "p/config.json", cfg.dump(2));
  cfg["quantization_config"] = {{"quant_method", "fp8"}, {"fmt", "e4m3"}, {"activation_scheme", "dynamic"},
                                {"weight_block_size", {16, 16}}};
  hf::save_safetensors(tmp / "q/model.safetensors", quantised);
  test::write_bytes(tmp / "q/config.json", cfg.dump(2));

  auto q = models::from_pretrained(tmp / "q"), p = models::from_pretrained(tmp / "p");
  EXPECT_TRUE(q.report.unexpected.empty()) << q.report.unexpected.front();
  for (size_t i = 0; i < q.model->params().all().size(); ++i)
    ASSERT_EQ(test::max_abs_diff(q.model->params().all()[i].value, p.model->params().all()[i].value), 0.f)
        << q.model->params().all()[i].name;
  EXPECT_GT(test::max_abs_diff(p.model->params().find("model.layers.0.self_attn.kv_b_proj.weight")->value,
                               base.get("model.layers.0.self_attn.kv_b_proj.weight")),
            1e-4f);  // FP8 changed the values: the equality above is not trivial
  models::save_pretrained(*q.model, q.source_dir, tmp / "out");
  auto out = hf::SafetensorsCheckpoint::open(tmp / "out");
  EXPECT_EQ(out.entry("model.layers.0.self_attn.kv_b_proj.weight").dtype, DType::F32);  // the model's dtype
  EXPECT_FALSE(out.contains("model.layers.0.self_attn.kv_b_proj.weight_scale_inv"));
  EXPECT_FALSE(out.contains("model.layers.3.enorm.weight"));
  EXPECT_FALSE(nlohmann::ordered_json::parse(std::ifstream(tmp / "out/config.json")).contains("quantization_config"));
}

TEST(DequantizeBadInput, Fp8WithoutQuantizationConfigNamesTheTensor) {
  test::TempDir tmp;
  const std::string src = test::fixture("deepseek_v3_b");
  auto base = hf::SafetensorsCheckpoint::open(src);
  hf::NamedTensors tensors;
  for (const auto& n : base.names())
    tensors.emplace_back(n, n == "model.layers.0.self_attn.o_proj.weight" ? Tensor::zeros(base.entry(n).shape, DType::F8_E4M3)
                                                                          : base.get(n));
  fs::create_directories(tmp / "m");
  hf::save_safetensors(tmp / "m/model.safetensors", tensors);
  fs::copy_file(src + "/config.json", tmp / "m/config.json");
  try {
    models::from_pretrained(tmp / "m");
    FAIL() << "an FP8 tensor loaded without quantization_config";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("tensor 'model.layers.0.self_attn.o_proj.weight' has dtype F8_E4M3"),
              std::string::npos)
        << e.what();
  }
  auto cfg = nlohmann::ordered_json::parse(std::ifstream(src + "/config.json"));
  cfg["quantization_config"] = {{"quant_method", "gptq"}};
  test::write_bytes(tmp / "m/config.json", cfg.dump(2));
  try {
    models::from_pretrained(tmp / "m");
    FAIL() << "gptq accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("(quantization_config): field 'quant_method' is 'gptq'"), std::string::npos)
        << e.what();
  }
}
