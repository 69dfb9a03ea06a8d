// The LM head and cross-entropy fused over chunks of tokens (the reference for
// ops/cuda/fused_linear_ce.cpp): only one chunk's logits exist at a time.
#include <algorithm>

#include "core/error.h"
#include "ops/cpu/cpu_ops.h"

namespace moeforge::ops::cpu {

double fused_linear_cross_entropy(const Tensor& hidden, const Tensor& weight, const Tensor& targets,
                                  int64_t ignore_index, float scale, Tensor& d_hidden, Tensor* dw, int64_t* counted,
                                  int64_t chunk_rows, bool accumulate_dw) {
  MF_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
           "fused_linear_cross_entropy: hidden ", shape_str(hidden.shape()), " and lm_head ",
           shape_str(weight.shape()), " do not agree");
  const int64_t n = hidden.size(0);
  MF_CHECK(targets.dtype() == DType::I64 && targets.numel() == n, "fused_linear_cross_entropy: targets must be I64 [N]");
  MF_CHECK(!dw || dw->shape() == weight.shape(), "fused_linear_cross_entropy: dw must have the lm_head's shape");
  MF_CHECK(chunk_rows > 0, "fused_linear_cross_entropy: chunk_rows must be positive");
  d_hidden = Tensor::empty(hidden.shape(), DType::F32);
  double total = 0;
  int64_t count = 0;
  for (int64_t r0 = 0; r0 < n; r0 += chunk_rows) {
    const int64_t rows = std::min(chunk_rows, n - r0);
    const Tensor h = hidden.slice0(r0, rows);
    Tensor logits = linear(h, weight);
    Tensor dlogits = Tensor::empty(logits.shape(), DType::F32);
    int64_t c = 0;
    total += cross_entropy_backward(logits, targets.slice0(r0, rows), ignore_index, scale, dlogits, &c);
    count += c;
    Tensor dh = linear_input_grad(dlogits, weight);
    std::copy(dh.f32(), dh.f32() + dh.numel(), d_hidden.f32() + r0 * hidden.size(1));
    if (dw) linear_weight_grad(dlogits, h, *dw, /*accumulate=*/accumulate_dw || r0 > 0);
  }
  if (dw && !accumulate_dw && n == 0) std::fill(dw->f32(), dw->f32() + dw->numel(), 0.f);
  if (counted) *counted = count;
  return total;
}

}  // namespace moeforge::ops::cpu
