// Quantized weights of hub checkpoints, dequantized on load (training runs on bf16/fp32 weights):
// - DeepSeek-V3's FP8 block quantisation (`quantization_config`: fmt "e4m3", weight_block_size
//   [bn, bk]): a weight [N, K] stored as float8 e4m3 with `weight_scale_inv` [ceil(N/bn),
//   ceil(K/bk)] (F32); W[n, k] = e4m3(w[n, k]) * scale_inv[n / bn][k / bk], as Transformers'
//   fine-grained FP8 dequantisation computes it.
// - GPT-OSS's MXFP4 experts (OCP microscaling): `*_blocks` [..., G, 16] uint8 (32 e2m1 values per
//   row, the low nibble first) and `*_scales` [..., G] uint8 (E8M0, bias 127); a row's values are
//   lut[nibble] * 2^(scale - 127), laid out [..., G * 32] as Transformers' convert_moe_packed_tensors
//   produces them before its final transpose (which the GPT-OSS loader applies).
#pragma once
#include <cstdint>
#include <string>

#include "core/tensor.h"

namespace moeforge::hf {

// One float8 e4m3 ("fn": no infinities, S.1111.111 is NaN) code as a float (exact).
float fp8_e4m3_to_float(uint8_t code);
// One e2m1 (FP4) code, 0..15 (bit 3 the sign).
float fp4_e2m1_to_float(uint8_t code);

// `weight` [N, K] (F8_E4M3 or U8 codes), `scale_inv` [ceil(N/bn), ceil(K/bk)] F32 -> [N, K] in
// `out` (rounded once, from F32). `name` names the tensor in errors.
Tensor dequantize_fp8_blocks(const Tensor& weight, const Tensor& scale_inv, int64_t block_rows, int64_t block_cols,
                             DType out, const std::string& name);

// `blocks` [..., G, 16] U8, `scales` [..., G] U8 -> [..., G * 32] in `out`.
Tensor dequantize_mxfp4(const Tensor& blocks, const Tensor& scales, DType out, const std::string& name);

}  // namespace moeforge::hf
