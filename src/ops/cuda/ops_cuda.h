// CUDA implementations of the ops in ops/ops.h, on device tensors (cuda::empty / to_device).
// Activations are BF16 or F32 (the output takes the input's dtype), arithmetic is F32, and every op
// is tested against its CPU reference on fresh random inputs (tests/gpu/test_cuda_ops.cpp).
#pragma once
#include <cstdint>

#include <vector>

#include "core/tensor.h"
#include "ops/op_types.h"

namespace moeforge::cuda {

// Row-major C[M,N] = op(A) op(B) (+ C when accumulate), through cuBLASLt with F32 accumulation.
// A is [M,K] ([K,M] when trans_a), B is [K,N] ([N,K] when trans_b). C may be F32 with BF16 inputs.
void gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c, bool accumulate = false);
// y = x W^T: the nn.Linear layout (x [M,K], W [N,K]).
Tensor linear(const Tensor& x, const Tensor& weight);

// Random initialisation on the device: N(mean, std) from a counter-based generator (the same
// values for the same seed on any GPU), or a constant.
void fill_normal(Tensor& x, float mean, float std, uint64_t seed);
void fill(Tensor& x, float value);
// dst = src converted elementwise (F32 / BF16 / F16, same element count).
void convert(const Tensor& src, Tensor& dst);

// y += x (same dtype and size); a device copy of x; x set to zero bytes.
void add_inplace(Tensor& y, const Tensor& x);
Tensor copy(const Tensor& x, const char* what = "copy");
void zero(Tensor& x);

// RMSNorm over the last dimension; rstd [rows] F32 is kept for the backward.
Tensor rms_norm(const Tensor& x, const Tensor& weight, float eps, Tensor* rstd = nullptr);
// residual += x, then y = rms_norm(residual): the pre-norm block's add and norm in one pass.
Tensor add_rms_norm(const Tensor& x, Tensor& residual, const Tensor& weight, float eps, Tensor* rstd = nullptr);
// dx from dy; dw (F32) accumulates.
Tensor rms_norm_backward(const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& dy, Tensor& dw);

// The family variants' small pieces (ops.h has their CPU references): y [rows, n] += bias on
// every row; db [n] (F32 or BF16) += column sums of dy; clamp to [-c, c] in place and its backward
// (dy zeroed where the unclipped value was outside); out += sigmoid(logit [T,1]) * y [T,H] and its
// backward (d_y, d_logit allocated here in y's and logit's dtypes).
void add_bias_rows(Tensor& y, const Tensor& bias);
void bias_grad(const Tensor& dy, Tensor& db);
void clamp_inplace(Tensor& x, float c);
void clamp_backward_inplace(const Tensor& unclipped, Tensor& dy, float c);
void add_sigmoid_gated(Tensor& out, const Tensor& y, const Tensor& logit);
// Rows grouped by expert (offsets [E+1] on the host, as the grouped GEMMs take them): y [rows, n]
// += bias [E, n] of each row's expert; db [E, n] (F32 or BF16) += each expert's column sums of dy.
void grouped_add_bias(Tensor& y, const Tensor& bias, const std::vector<int64_t>& offsets);
void grouped_bias_grad(const Tensor& dy, const std::vector<int64_t>& offsets, Tensor& db);
// Latent attention's column moves (ops.h: copy_columns, sum_row_groups, (de)interleave_pairs).
void copy_columns(const Tensor& src, int64_t src_width, int64_t src_c0, int64_t src_row_div, Tensor& dst,
                  int64_t dst_width, int64_t dst_c0, int64_t n, bool add = false);
Tensor sum_row_groups(const Tensor& src, int64_t src_width, int64_t src_c0, int64_t n, int64_t group);
Tensor deinterleave_pairs(const Tensor& x, int64_t d);
Tensor interleave_pairs(const Tensor& x, int64_t d);
// DeepSeek-V3's routing (ops::grouped_sigmoid_route): scores [T,E] F32, weights [T,k] F32 (final:
// renormalised and scaled), indices [T,k] I64; bias [E] (F32 or BF16); E <= 1024, k <= 64. And the
// backward to d(logits) [T,E] in `dtype`.
void grouped_sigmoid_route(const Tensor& logits, const Tensor& bias, int64_t n_group, int64_t topk_group, int64_t k,
                           bool normalize, float scaling, Tensor& scores, Tensor& weights, Tensor& indices,
                           const Tensor* forced = nullptr);
Tensor grouped_sigmoid_route_backward(const Tensor& scores, const Tensor& indices, const Tensor& d_weights,
                                      bool normalize, float scaling, DType dtype);
// GPT-OSS's expert activation (gate/up interleaved, ops::clamped_swiglu) and its backward.
Tensor clamped_swiglu(const Tensor& gate_up, float alpha, float limit);
Tensor clamped_swiglu_backward(const Tensor& gate_up, const Tensor& dout, float alpha, float limit);
void sigmoid_gated_backward(const Tensor& dy, const Tensor& y, const Tensor& logit, Tensor& d_y, Tensor& d_logit);

// silu(gate) * up with gate_up [T, 2I] (gate first); and d(gate_up) from d(out).
Tensor swiglu(const Tensor& gate_up);
Tensor swiglu_backward(const Tensor& gate_up, const Tensor& dout);

// x [T, H, D] rotated in place by cos/sin [T, rot] (F32) over the first `rot` dims (rotate_half).
void rope_inplace(Tensor& x, const Tensor& cos, const Tensor& sin, bool inverse = false);

// out[i] = table[ids[i]] (ids I64, checked on the device: an id out of range sets an error flag
// that is reported here); table_grad (F32 or BF16) [V,D] += rows of dx at ids.
Tensor embedding(const Tensor& ids, const Tensor& table);
void embedding_backward(const Tensor& ids, const Tensor& dx, Tensor& table_grad, int64_t padding_idx = -1);

// Router: probs = softmax(logits) [T,E] F32, then the k largest per row (ties to the lower index)
// as weights [T,k] F32 (renormalised to sum 1 when `normalize`) and indices [T,k] I64. `forced`
// (device I64 [T,k], ids in range) replaces the top-k choice (balanced or replayed routing); the
// weights are then the router's probabilities at those experts, so the router still learns.
void router_softmax_topk(const Tensor& logits, int64_t k, bool normalize, Tensor& probs, Tensor& weights,
                         Tensor& indices, const Tensor* forced = nullptr);
// The router's backward: d(logits) [T,E] in `dtype` from d(weights) [T,k] F32, through the
// renormalisation and the softmax (the discrete choice gets no gradient). `dprobs_extra` (device
// F32 [E], optional) is added to every row's d(probs): the load-balancing loss's gradient.
Tensor router_backward(const Tensor& probs, const Tensor& indices, const Tensor& weights, const Tensor& d_weights,
                       bool normalize, DType dtype, const Tensor* dprobs_extra = nullptr);

// Cross-entropy of logits [N,V] against targets [N] (I64) fused with its gradient: dlogits =
// scale * (softmax - onehot) on counted rows, 0 on ignored ones. Returns the summed loss.
// Passing `dlogits` = `logits` computes the gradient in place (no second logits-sized buffer).
double cross_entropy_backward(const Tensor& logits, const Tensor& targets, int64_t ignore_index, float scale,
                              Tensor& dlogits, int64_t* counted);
// Per-row losses [N] F32 (0 on ignored rows) and the count of counted rows (ops::cross_entropy_rows).
Tensor cross_entropy_rows(const Tensor& logits, const Tensor& targets, int64_t ignore_index, int64_t* counted);

}  // namespace moeforge::cuda

namespace moeforge::cuda {

// Multi-tensor AdamW: one launch updates every parameter (F32 or BF16 values, gradients and
// moments, each read into F32) with the arithmetic of ops/adamw_math.h, the same as the CPU
// optimizer. BF16 moments are the `bf16` policy (torch AdamW on a BF16 model); F32 master weights
// with a BF16 working copy, refreshed in the same pass, are `bf16-mixed`.
using AdamWTensors = ops::AdamWTensors;
void adamw_multi_tensor(const std::vector<AdamWTensors>& tensors, const ops::AdamWScalars& scalars);

// sqrt of the sum of squares of every gradient (F32 or BF16), accumulated in F32 per block and
// F64 across blocks; and every tensor scaled in place (gradient clipping).
double global_grad_norm(const std::vector<Tensor>& grads);
void scale_inplace(const std::vector<Tensor>& tensors, float factor);

}  // namespace moeforge::cuda

namespace moeforge::cuda {

// ---- Mixture-of-experts token flow. `offsets` [E+1] (host) delimit each expert's rows in the
// permuted buffer; experts with no rows are skipped (and get a zero weight gradient).

// y[rows of e] = x[rows of e] W[e]^T           x [R,K], W [E,N,K], y [R,N]
void grouped_linear(const Tensor& x, const Tensor& w, const std::vector<int64_t>& offsets, Tensor& y);
// dx[rows of e] = dy[rows of e] W[e]           dy [R,N], W [E,N,K], dx [R,K]
void grouped_linear_input_grad(const Tensor& dy, const Tensor& w, const std::vector<int64_t>& offsets, Tensor& dx);
// dW[e] (+)= dy[rows of e]^T x[rows of e]      dW [E,N,K] (F32 or the weights' dtype)
void grouped_linear_weight_grad(const Tensor& dy, const Tensor& x, const std::vector<int64_t>& offsets, Tensor& dw,
                                bool accumulate);
// Which path the last grouped GEMM took: "strided" (equal experts), "cutlass" (ragged BF16 on
// Hopper), "cublas-grouped", "split" (large weight gradients alone, the rest grouped) or "loop".
const char* last_grouped_gemm_path();

// Routing plan from the router's expert indices [T,k] (I64): every (token, slot) pair gets a row of
// the permuted buffer, grouped by expert and in token order inside an expert (deterministic).
using RoutingPlan = ops::RoutingPlan;
RoutingPlan plan_routing(const Tensor& expert_indices, int64_t num_experts);
// xp[dest_row(t,j)] = x[t]                                     x [T,H] -> xp [T*k,H]
Tensor permute_tokens(const Tensor& x, const RoutingPlan& plan);
// y[t] = sum_j weights[t,j] * yp[dest_row(t,j)] (summed in F32, in slot order)   -> y [T,H]
Tensor unpermute_tokens(const Tensor& yp, const Tensor& weights, const RoutingPlan& plan);
// Backward of unpermute: d_yp[dest(t,j)] = weights[t,j] * dy[t] and d_weights[t,j] = <dy[t], yp[dest(t,j)]>.
void unpermute_tokens_backward(const Tensor& dy, const Tensor& yp, const Tensor& weights, const RoutingPlan& plan,
                               Tensor& d_yp, Tensor& d_weights);
// Backward of permute: dx[t] = sum_j d_xp[dest_row(t,j)].
Tensor permute_tokens_backward(const Tensor& d_xp, const RoutingPlan& plan);
// out[i] = in[index[i]] for rows: in [R,H], index device I64 [n] (values in [0, R)) -> out [n,H].
// Reorders rows between the expert-parallel exchange's (source rank, expert) and (expert, source
// rank) orders.
Tensor gather_rows(const Tensor& in, const Tensor& index);

}  // namespace moeforge::cuda

namespace moeforge::cuda {

// Causal attention with GQA, an optional sliding window (keys with q - k < window) and optional
// document ids [B,S] (I64; no attention across documents of a packed row), flash-style: scores are
// never stored; the log-sum-exp per (b, head, query) [B,Hq,S] F32 is kept for the backward.
// q/k [B,S,H,D], v [B,S,Hkv,DV] -> [B,S,Hq,DV]: D = DV in {8, 16, 32, 64, 96, 128}, or MLA's
// D 192 with DV 128. This first version computes on CUDA cores in F32 (the correctness
// reference); BF16 calls with D = DV and without document ids go to cuDNN's fused attention when
// the build has it (attention_backend says which). `sinks` [Hq] (GPT-OSS, optional): one more
// logit per head in every softmax, applied to the finished attention (the output rescaled by the
// keys' share, the log-sum-exp extended), so either backend takes them.
// window <= 0: no sliding window.
Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, float scale, int64_t window, const Tensor* doc_ids,
                 Tensor* lse, const Tensor* sinks = nullptr);
// dq, dk, dv from dout, the forward's output and lse (probabilities recomputed; no atomics:
// dk/dv are accumulated per key row over every query head of its group). With sinks, `dsinks`
// (optional) receives their gradient [Hq] F32.
void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                        const Tensor& dout, float scale, int64_t window, const Tensor* doc_ids, Tensor& dq, Tensor& dk,
                        Tensor& dv, const Tensor* sinks = nullptr, Tensor* dsinks = nullptr);
// Which implementation attention() / attention_backward() take for these arguments: "cudnn"
// (cuDNN's fused attention: BF16/F16, no document ids, when built with cuDNN) or "native" (the
// kernels above; forced with MOEFORGE_ATTENTION=native).
const char* attention_backend(const Tensor& q, int64_t window, const Tensor* doc_ids);

}  // namespace moeforge::cuda

namespace moeforge::cuda {

// The LM head and cross-entropy fused over chunks of `chunk_rows` tokens: for each chunk, logits =
// h W^T (in h's dtype, as Transformers rounds them before upcasting), the fused softmax gradient,
// d_hidden = dlogits W and dW += dlogits^T h. Only one chunk's logits ever exist (chunk_rows x V
// instead of N x V: 0.3 GB instead of 1.2 GB at 4096 tokens and a 151936 vocabulary in BF16).
// targets [N] I64 (already shifted), `scale` multiplies the gradient (1 / counted tokens for a
// mean). Returns the summed loss; dw (F32 or W's dtype) accumulates.
double fused_linear_cross_entropy(const Tensor& hidden, const Tensor& weight, const Tensor& targets, int64_t ignore_index,
                                  float scale, Tensor& d_hidden, Tensor& dw, int64_t* counted, int64_t chunk_rows = 1024);

}  // namespace moeforge::cuda
