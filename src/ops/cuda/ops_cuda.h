// CUDA implementations of the ops in ops/ops.h, on device tensors (cuda::empty / to_device).
// Activations are BF16 or F32 (the output takes the input's dtype), arithmetic is F32, and every op
// is tested against its CPU reference on fresh random inputs (tests/gpu/test_cuda_ops.cpp).
#pragma once
#include <cstdint>

#include "core/tensor.h"

namespace moeforge::cuda {

// Row-major C[M,N] = op(A) op(B) (+ C when accumulate), through cuBLASLt with F32 accumulation.
// A is [M,K] ([K,M] when trans_a), B is [K,N] ([N,K] when trans_b). C may be F32 with BF16 inputs.
void gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c, bool accumulate = false);
// y = x W^T: the nn.Linear layout (x [M,K], W [N,K]).
Tensor linear(const Tensor& x, const Tensor& weight);

// RMSNorm over the last dimension; rstd [rows] F32 is kept for the backward.
Tensor rms_norm(const Tensor& x, const Tensor& weight, float eps, Tensor* rstd = nullptr);
// residual += x, then y = rms_norm(residual): the pre-norm block's add and norm in one pass.
Tensor add_rms_norm(const Tensor& x, Tensor& residual, const Tensor& weight, float eps, Tensor* rstd = nullptr);
// dx from dy; dw (F32) accumulates.
Tensor rms_norm_backward(const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& dy, Tensor& dw);

// silu(gate) * up with gate_up [T, 2I] (gate first); and d(gate_up) from d(out).
Tensor swiglu(const Tensor& gate_up);
Tensor swiglu_backward(const Tensor& gate_up, const Tensor& dout);

// x [T, H, D] rotated in place by cos/sin [T, rot] (F32) over the first `rot` dims (rotate_half).
void rope_inplace(Tensor& x, const Tensor& cos, const Tensor& sin, bool inverse = false);

// out[i] = table[ids[i]] (ids I64, checked on the device: an id out of range sets an error flag
// that is reported here); table_grad (F32) [V,D] += rows of dx at ids.
Tensor embedding(const Tensor& ids, const Tensor& table);
void embedding_backward(const Tensor& ids, const Tensor& dx, Tensor& table_grad);

// Router: probs = softmax(logits) [T,E] F32, then the k largest per row (ties to the lower index)
// as weights [T,k] F32 (renormalised to sum 1 when `normalize`) and indices [T,k] I64.
void router_softmax_topk(const Tensor& logits, int64_t k, bool normalize, Tensor& probs, Tensor& weights,
                         Tensor& indices);

// Cross-entropy of logits [N,V] against targets [N] (I64) fused with its gradient: dlogits =
// scale * (softmax - onehot) on counted rows, 0 on ignored ones. Returns the summed loss.
double cross_entropy_backward(const Tensor& logits, const Tensor& targets, int64_t ignore_index, float scale,
                              Tensor& dlogits, int64_t* counted);

}  // namespace moeforge::cuda
