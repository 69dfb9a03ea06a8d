// Every op moeforge computes, as pure functions over tensors with no model knowledge.
// ops/cpu/ holds the reference implementations (fp32 arithmetic, OpenMP, BLAS for GEMMs); a CUDA
// implementation of an op must match its CPU reference within a stated tolerance.
// Activations are F32 on the CPU; weight operands of GEMMs may be F32 or BF16.
#pragma once
#include <optional>

#include "core/tensor.h"

namespace moeforge::ops {

// C[M,N] = A[M,K] * B[N,K]^T (+ C when accumulate). The layout of nn.Linear: y = x W^T.
void matmul_nt(const Tensor& a, const Tensor& b, Tensor& c, bool accumulate = false);
Tensor linear(const Tensor& x, const Tensor& weight);  // x [..., K], weight [N, K] -> [..., N]

// Raw fp32 GEMM: C = alpha * op(A) op(B) + beta * C, row-major, op = transpose when the flag is set.
void gemm_f32(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
              const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

// y = x * rsqrt(mean(x^2) + eps) * w over the last dimension (Transformers' RMSNorm, fp32 inside).
Tensor rms_norm(const Tensor& x, const Tensor& weight, float eps);

// rows of token embeddings: out[i] = table[ids[i]]; ids are I64 and checked against the vocabulary.
Tensor embedding(const Tensor& ids, const Tensor& table);

// x [T, H, D] rotated in place by cos/sin [T, rot] over the first `rot` dims (rotate_half convention).
// `inverse` rotates by the opposite angle: the backward of the rotation (it is orthogonal).
void rope_inplace(Tensor& x, const Tensor& cos, const Tensor& sin, bool inverse = false);

// Scaled dot-product attention over one batch of packed rows.
// q [B,S,Hq,D], k/v [B,S,Hkv,D] (Hq a multiple of Hkv) -> [B,S,Hq,D].
// Causal; `window` keeps keys with q - k < window; `doc_ids` [B,S] (optional, I64) stops attention
// across documents of a packed row.
// `sinks` [Hq] (optional; GPT-OSS): a per-head logit that joins each row's softmax without a value,
// so a row's key probabilities sum to less than 1. v's head dim may differ from q/k's (MLA).
Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, float scale, std::optional<int64_t> window,
                 const Tensor* doc_ids = nullptr, const Tensor* sinks = nullptr);

// out = silu(gate) * up, where gate_up [T, 2I] holds gate in the first half and up in the second.
Tensor swiglu(const Tensor& gate_up);

// GPT-OSS's expert activation: gate_up [T, 2I] with gate and up interleaved (columns 2j and 2j+1)
// -> (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha g), g = min(gate, limit); [T, I].
Tensor clamped_swiglu(const Tensor& gate_up, float alpha, float limit);

// Softmax over the last dimension, in place.
void softmax_rows_inplace(Tensor& x);

// The k largest values of each row (ties broken towards the lower index, as torch.topk on CPU does),
// descending: values [T,k] F32 and indices [T,k] I64.
void topk_rows(const Tensor& x, int64_t k, Tensor& values, Tensor& indices);

// DeepSeek-V3's router on logits [T, E]: scores = sigmoid(logits) [T, E] F32; the choice adds
// `bias` [E] (e_score_correction_bias), keeps the topk_group best of n_group groups (a group scores
// its two best) and takes the top k (ties to the lower index); weights [T, k] = the chosen scores,
// divided by (their sum + 1e-20) when `normalize`, times `scaling`; indices [T, k] I64. `forced`
// [T, k] (I64) replaces the choice.
void grouped_sigmoid_route(const Tensor& logits, const Tensor& bias, int64_t n_group, int64_t topk_group, int64_t k,
                           bool normalize, float scaling, Tensor& scores, Tensor& weights, Tensor& indices,
                           const Tensor* forced = nullptr);

// Column moves for latent attention. copy_columns: dst[r, dst_c0 + c] (+)= src[r / src_row_div,
// src_c0 + c] for c < n over every row of dst ([rows, dst_width]); src_row_div > 1 broadcasts a
// row to several (the shared rotary key to every head). sum_row_groups: out[r, c] = sum over g of
// src[r * group + g, src_c0 + c] ([rows, n]). deinterleave_pairs: each row of d values (x0, x1),
// (x2, x3), ... becomes [x0, x2, ... | x1, x3, ...] (DeepSeek's interleaved RoPE before the
// rotate_half rotation); interleave_pairs undoes it.
void copy_columns(const Tensor& src, int64_t src_width, int64_t src_c0, int64_t src_row_div, Tensor& dst,
                  int64_t dst_width, int64_t dst_c0, int64_t n, bool add = false);
Tensor sum_row_groups(const Tensor& src, int64_t src_width, int64_t src_c0, int64_t n, int64_t group);
Tensor deinterleave_pairs(const Tensor& x, int64_t d);
Tensor interleave_pairs(const Tensor& x, int64_t d);

// x += y (same shape).
void add_inplace(Tensor& x, const Tensor& y);

// Per-row cross-entropy of logits [N,V] against targets [N] (I64); rows whose target equals
// `ignore_index` get 0 and are not counted. Returns the per-row losses [N] and the count.
Tensor cross_entropy_rows(const Tensor& logits, const Tensor& targets, int64_t ignore_index, int64_t* counted);

// y [rows, n] += bias [n] on every row (bias F32 or BF16).
void add_bias_rows(Tensor& y, const Tensor& bias);
// x clamped to [-c, c] in place (OLMoE's clip_qkv).
void clamp_inplace(Tensor& x, float c);
// out [T, H] += sigmoid(logit [T, 1]) * y [T, H]: a shared expert's output through its gate.
void add_sigmoid_gated(Tensor& out, const Tensor& y, const Tensor& logit);

// ---- Backward passes. "accumulate" outputs are added to; the rest are written.

// dW [N,K] += dy[M,N]^T x[M,K]
void linear_weight_grad(const Tensor& dy, const Tensor& x, Tensor& dw);
// dx [M,K] = dy[M,N] W[N,K]
Tensor linear_input_grad(const Tensor& dy, const Tensor& weight);

// RMSNorm over the last dimension: returns dx; dw (F32) accumulates.
Tensor rms_norm_backward(const Tensor& x, const Tensor& weight, float eps, const Tensor& dy, Tensor& dw);

// Attention backward (probabilities recomputed, as a flash kernel would): returns dq, dk, dv.
// With `sinks`, `dsinks` (optional) receives their gradient [Hq].
void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout, float scale,
                        std::optional<int64_t> window, const Tensor* doc_ids, Tensor& dq, Tensor& dk, Tensor& dv,
                        const Tensor* sinks = nullptr, Tensor* dsinks = nullptr);

// d(gate_up) [T, 2I] (interleaved) from d(clamped_swiglu) [T, I].
Tensor clamped_swiglu_backward(const Tensor& gate_up, const Tensor& dout, float alpha, float limit);

// d(gate_up) [T, 2I] from d(silu(gate) * up) [T, I].
Tensor swiglu_backward(const Tensor& gate_up, const Tensor& dout);

// db [n] (F32) += column sums of dy [rows, n]: a bias's gradient.
void bias_grad(const Tensor& dy, Tensor& db);
// The clamp's backward in place: dy is zeroed where the value before the clamp was outside
// [-c, c] (torch.clamp passes the gradient on the boundary).
void clamp_backward_inplace(const Tensor& unclipped, Tensor& dy, float c);
// add_sigmoid_gated's backward: d_y = sigmoid(logit) * dy, d_logit = sum_h(dy * y) * s (1 - s).
void sigmoid_gated_backward(const Tensor& dy, const Tensor& y, const Tensor& logit, Tensor& d_y, Tensor& d_logit);

// table_grad [V, D] += rows of dx [N, D] at ids [N]. Rows whose id is `padding_idx` (when >= 0) add
// nothing, as torch's nn.Embedding(padding_idx=...) that Transformers builds from pad_token_id.
void embedding_backward(const Tensor& ids, const Tensor& dx, Tensor& table_grad, int64_t padding_idx = -1);

// d(logits) [T, E] of grouped_sigmoid_route from d(weights) [T, k] (the choice gets no gradient).
Tensor grouped_sigmoid_route_backward(const Tensor& scores, const Tensor& indices, const Tensor& d_weights,
                                      bool normalize, float scaling);

// Softmax backward over the last dimension given the probabilities: dlogits = p * (dp - sum(p * dp)).
Tensor softmax_backward(const Tensor& probs, const Tensor& dprobs);

// Cross-entropy rows fused with its gradient: dlogits = scale * (softmax - onehot) on counted rows, 0
// elsewhere. Returns the summed loss over counted rows.
double cross_entropy_backward(const Tensor& logits, const Tensor& targets, int64_t ignore_index, float scale,
                              Tensor& dlogits, int64_t* counted);

}  // namespace moeforge::ops
