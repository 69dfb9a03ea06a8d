// Fused linear cross-entropy: the LM head's logits are produced, consumed and turned into gradients
// one chunk of tokens at a time, so the N x V logits tensor (the largest activation of a training
// step at a 150k vocabulary) is never materialised. Three GEMMs per chunk, all through cuBLASLt.
#include "ops/cuda/check.h"
#include "ops/cuda/ops_cuda.h"
#include "ops/cuda/runtime.h"

namespace moeforge::cuda {

double fused_linear_cross_entropy(const Tensor& hidden, const Tensor& weight, const Tensor& targets, int64_t ignore_index,
                                  float scale, Tensor& d_hidden, Tensor* dw, int64_t* counted, int64_t chunk_rows,
                                  bool accumulate_dw) {
  MF_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.shape()[1] == weight.shape()[1],
           "fused_linear_cross_entropy: hidden ", shape_str(hidden.shape()), " and lm_head ", shape_str(weight.shape()),
           " do not agree");
  const int64_t n = hidden.shape()[0], v = weight.shape()[0];
  MF_CHECK(targets.dtype() == DType::I64 && targets.numel() == n, "fused_linear_cross_entropy: targets must be I64 [N]");
  MF_CHECK(!dw || dw->shape() == weight.shape(), "fused_linear_cross_entropy: dw must have the lm_head's shape");
  MF_CHECK(chunk_rows > 0, "fused_linear_cross_entropy: chunk_rows must be positive");
  d_hidden = empty(hidden.shape(), hidden.dtype(), "fused cross-entropy hidden gradient");
  // Row losses stay on the device until the end: one synchronisation per call, not one per chunk
  // (each left the GPU idle until the host had launched the chunk's next GEMM).
  Tensor losses = empty({n}, DType::F32, "fused cross-entropy row losses");
  for (int64_t r0 = 0; r0 < n; r0 += chunk_rows) {
    const int64_t rows = std::min(chunk_rows, n - r0);
    const Tensor h = hidden.slice0(r0, rows);
    Tensor logits = empty({rows, v}, hidden.dtype(), "a chunk of logits");
    gemm(h, false, weight, true, logits);
    Tensor dlogits = logits;  // in place: one chunk-sized buffer
    Tensor chunk_losses = losses.slice0(r0, rows);
    cross_entropy_backward_rows(logits, targets.slice0(r0, rows), ignore_index, scale, dlogits, chunk_losses);
    Tensor dh = d_hidden.slice0(r0, rows);
    gemm(dlogits, false, weight, false, dh);
    // The first chunk writes dW when it is not to be accumulated into; the rest add to it.
    if (dw) gemm(dlogits, true, h, false, *dw, /*accumulate=*/accumulate_dw || r0 > 0);
  }
  if (dw && !accumulate_dw && n == 0) zero(*dw);
  return sum_row_losses(losses, counted);
}

}  // namespace moeforge::cuda
