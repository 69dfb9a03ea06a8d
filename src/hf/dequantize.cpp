#include "hf/dequantize.h"

#include <cmath>
#include <limits>
#include <vector>

#include "core/error.h"

namespace moeforge::hf {

float fp8_e4m3_to_float(uint8_t code) {
  const bool negative = code & 0x80;
  const int exponent = (code >> 3) & 0xF, mantissa = code & 0x7;
  float v;
  if (exponent == 0xF && mantissa == 0x7)
    v = std::numeric_limits<float>::quiet_NaN();
  else if (exponent == 0)
    v = std::ldexp(static_cast<float>(mantissa), -9);  // subnormal: m/8 * 2^(1-7)
  else
    v = std::ldexp(1.0f + static_cast<float>(mantissa) / 8.0f, exponent - 7);
  return negative ? -v : v;
}

float fp4_e2m1_to_float(uint8_t code) {
  static const float kMagnitude[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  const float m = kMagnitude[code & 0x7];
  return (code & 0x8) ? -m : m;
}

Tensor dequantize_fp8_blocks(const Tensor& weight, const Tensor& scale_inv, int64_t block_rows, int64_t block_cols,
                             DType out, const std::string& name) {
  MF_CHECK(weight.dtype() == DType::F8_E4M3 || weight.dtype() == DType::U8, name, ": FP8 weight has dtype ",
           dtype_name(weight.dtype()), " (expected F8_E4M3)");
  MF_CHECK(weight.dim() == 2, name, ": FP8 weight must be 2-D, got ", shape_str(weight.shape()));
  MF_CHECK(block_rows > 0 && block_cols > 0, name, ": weight_block_size must be positive");
  const int64_t n = weight.size(0), k = weight.size(1);
  const int64_t bn = (n + block_rows - 1) / block_rows, bk = (k + block_cols - 1) / block_cols;
  MF_CHECK(scale_inv.dim() == 2 && scale_inv.size(0) == bn && scale_inv.size(1) == bk, name,
           "_scale_inv: shape ", shape_str(scale_inv.shape()), " does not cover a ", shape_str(weight.shape()),
           " weight in ", block_rows, "x", block_cols, " blocks (expected [", bn, ", ", bk, "])");
  const Tensor s = scale_inv.dtype() == DType::F32 ? scale_inv : scale_inv.to(DType::F32);
  float lut[256];
  for (int c = 0; c < 256; ++c) lut[c] = fp8_e4m3_to_float(static_cast<uint8_t>(c));
  Tensor f = Tensor::empty({n, k}, DType::F32);
  const uint8_t* w = static_cast<const uint8_t*>(weight.raw());
  const float* sc = s.f32();
  float* o = f.f32();
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < k; ++c) o[r * k + c] = lut[w[r * k + c]] * sc[(r / block_rows) * bk + c / block_cols];
  return out == DType::F32 ? f : f.to(out);
}

Tensor dequantize_mxfp4(const Tensor& blocks, const Tensor& scales, DType out, const std::string& name) {
  MF_CHECK(blocks.dtype() == DType::U8 && scales.dtype() == DType::U8, name, ": MXFP4 blocks and scales must be U8, got ",
           dtype_name(blocks.dtype()), " and ", dtype_name(scales.dtype()));
  MF_CHECK(blocks.dim() >= 2 && blocks.shape().back() == 16, name, "_blocks: shape ", shape_str(blocks.shape()),
           " (expected [..., G, 16]: 32 four-bit values per row)");
  const Shape prefix(blocks.shape().begin(), blocks.shape().end() - 1);
  MF_CHECK(scales.shape() == prefix, name, "_scales: shape ", shape_str(scales.shape()), " does not match blocks ",
           shape_str(blocks.shape()), " (expected ", shape_str(prefix), ")");
  const int64_t rows = shape_numel(prefix);
  Shape out_shape(prefix.begin(), prefix.end() - 1);
  out_shape.push_back(prefix.back() * 32);
  Tensor f = Tensor::empty(out_shape, DType::F32);
  float lut[16];
  for (int c = 0; c < 16; ++c) lut[c] = fp4_e2m1_to_float(static_cast<uint8_t>(c));
  const uint8_t* b = static_cast<const uint8_t*>(blocks.raw());
  const uint8_t* e = static_cast<const uint8_t*>(scales.raw());
  float* o = f.f32();
  for (int64_t r = 0; r < rows; ++r) {
    const int exponent = static_cast<int>(e[r]) - 127;
    for (int i = 0; i < 16; ++i) {
      const uint8_t byte = b[r * 16 + i];
      o[r * 32 + 2 * i] = std::ldexp(lut[byte & 0x0F], exponent);
      o[r * 32 + 2 * i + 1] = std::ldexp(lut[byte >> 4], exponent);
    }
  }
  return out == DType::F32 ? f : f.to(out);
}

}  // namespace moeforge::hf
