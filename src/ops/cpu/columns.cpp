// Column moves of row-major [rows, width] activations that latent attention (MLA) needs: splitting
// a projection into its parts, broadcasting the shared rotary key to every head and summing its
// gradient back, and the interleaved-pair layout of DeepSeek's RoPE.
#include <cstring>

#include "core/error.h"
#include "ops/cpu/cpu_ops.h"

namespace moeforge::ops::cpu {

void copy_columns(const Tensor& src, int64_t src_width, int64_t src_c0, int64_t src_row_div, Tensor& dst,
                  int64_t dst_width, int64_t dst_c0, int64_t n, bool add) {
  const int64_t rows = dst.numel() / dst_width;
  MF_CHECK(src_c0 + n <= src_width && dst_c0 + n <= dst_width && src_row_div >= 1 &&
               src.numel() >= (rows / src_row_div) * src_width,
           "copy_columns: columns [", src_c0, ", ", src_c0 + n, ") of width ", src_width, " into [", dst_c0, ", ",
           dst_c0 + n, ") of width ", dst_width);
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src.f32() + (r / src_row_div) * src_width + src_c0;
    float* d = dst.f32() + r * dst_width + dst_c0;
    if (add)
      for (int64_t c = 0; c < n; ++c) d[c] += s[c];
    else
      std::memcpy(d, s, n * sizeof(float));
  }
}

Tensor sum_row_groups(const Tensor& src, int64_t src_width, int64_t src_c0, int64_t n, int64_t group) {
  const int64_t rows = src.numel() / src_width / group;
  Tensor out = Tensor::zeros({rows, n}, DType::F32);
  for (int64_t r = 0; r < rows * group; ++r)
    for (int64_t c = 0; c < n; ++c) out.f32()[(r / group) * n + c] += src.f32()[r * src_width + src_c0 + c];
  return out;
}

namespace {

// Row by row: interleaved (x0, x1), (x2, x3), ... <-> [x0, x2, ... | x1, x3, ...].
Tensor move_pairs(const Tensor& x, int64_t d, bool deinterleave) {
  Tensor out = Tensor::empty(x.shape(), DType::F32);
  const int64_t rows = x.numel() / d, half = d / 2;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < half; ++i)
      for (int64_t odd = 0; odd < 2; ++odd) {
        const int64_t paired = r * d + 2 * i + odd, split = r * d + odd * half + i;
        out.f32()[deinterleave ? split : paired] = x.f32()[deinterleave ? paired : split];
      }
  return out;
}

}  // namespace

Tensor deinterleave_pairs(const Tensor& x, int64_t d) { return move_pairs(x, d, true); }
Tensor interleave_pairs(const Tensor& x, int64_t d) { return move_pairs(x, d, false); }

}  // namespace moeforge::ops::cpu
