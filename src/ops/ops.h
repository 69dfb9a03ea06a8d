// Every op moeforge computes, as pure functions over tensors with no model knowledge: one
// signature per op, dispatched on the device of its tensors (ops/dispatch.cpp) to the CPU reference
// (ops/cpu/cpu_ops.h: fp32 arithmetic, OpenMP, OpenBLAS) or the CUDA kernels (ops/cuda/ops_cuda.h).
// Every op exists on both devices; tests/unit/test_backend_ops.cpp runs one table of cases on
// both and compares them.
// Dtypes: on the CPU activations are F32 and weight operands F32 or BF16; on CUDA activations are
// F32 or BF16 (an output takes its input's dtype) with F32 arithmetic. Outputs that a caller may
// not need (rstd, lse, dsinks) are optional pointers on both devices.
// C++17-clean: CUDA units include it.
#pragma once
#include <optional>
#include <vector>

#include "core/tensor.h"
#include "ops/op_types.h"

namespace moeforge::ops {

// ---- Tensors on a device

// An uninitialised tensor on `device` (the heap, or the CUDA caching allocator; `what` names it in
// an out-of-memory error), and a copy of `t` on `device` converted to `dtype`.
Tensor empty(const Shape& shape, DType dtype, Device device, const char* what = "tensor");
Tensor to_device(const Tensor& t, Device device, DType dtype);
// A copy of x on its device; x's elements set to 0; waiting until `device` has done the work queued
// on it (nothing to wait for on the CPU).
Tensor copy(const Tensor& x);
void zero(Tensor& x);
// Inverted dropout: x * keep / (1 - p), keep_i = 0 with probability p, drawn from a counter-based
// hash of (seed, i): the same mask on both devices for the same seed and shape, and again for the
// same seed (how a backward or a recomputation reproduces its forward's mask). F32 or BF16.
Tensor dropout_scaled(const Tensor& x, float p, uint64_t seed);
// A zeroed tensor on `device`.
Tensor zeros(const Shape& shape, DType dtype, Device device, const char* what = "tensor");
void synchronize(Device device);

// ---- GEMMs

// Row-major C[M,N] = op(A) op(B) (+ C when accumulate); A is [M,K] ([K,M] when trans_a), B is [K,N]
// ([N,K] when trans_b). C is F32 (or A's dtype on CUDA); arithmetic in F32.
void gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c, bool accumulate = false);
// y = x W^T: nn.Linear's layout (x [..., K], weight [N, K] -> [..., N]).
Tensor linear(const Tensor& x, const Tensor& weight);
// dW [N,K] += dy[M,N]^T x[M,K] (accumulate false: dW = ..., what dW held is not read)
void linear_weight_grad(const Tensor& dy, const Tensor& x, Tensor& dw, bool accumulate = true);
// dx [M,K] = dy[M,N] W[N,K]
Tensor linear_input_grad(const Tensor& dy, const Tensor& weight);

// ---- Norms, embeddings, rotary

// y = x * rsqrt(mean(x^2) + eps) * w over the last dimension (Transformers' RMSNorm, fp32 inside);
// `rstd` (optional) receives the per-row 1/rms [rows] F32 that the backward can reuse.
Tensor rms_norm(const Tensor& x, const Tensor& weight, float eps, Tensor* rstd = nullptr);
// sum = residual + x (a new tensor, rounded to x's dtype; residual is not changed), then
// y = rms_norm(sum): a pre-norm block's residual add and norm in one pass.
Tensor add_rms_norm(const Tensor& x, const Tensor& residual, const Tensor& weight, float eps, Tensor& sum,
                    Tensor* rstd = nullptr);
// dx from dy; dw (F32) accumulates. `rstd` (optional) is the forward's; without it it is recomputed.
// With `residual_grad` (x's shape and dtype), dx + residual_grad is returned instead, the same
// values as the gradient stored then add_inplace (a pre-norm block's input gradient: its residual
// branch plus its norm's), in one pass where the backend fuses them (CUDA).
Tensor rms_norm_backward(const Tensor& x, const Tensor& weight, float eps, const Tensor& dy, Tensor& dw,
                         const Tensor* rstd = nullptr, const Tensor* residual_grad = nullptr);

// out[i] = table[ids[i]]; ids are I64 and checked against the vocabulary.
Tensor embedding(const Tensor& ids, const Tensor& table);
// table_grad [V, D] += rows of dx [N, D] at ids [N]. Rows whose id is `padding_idx` (when >= 0) add
// nothing, as torch's nn.Embedding(padding_idx=...) that Transformers builds from pad_token_id.
// With `written_rows` (U8 [V] on table_grad's device) table_grad may hold anything: the op zeroes
// and then adds to only the rows of `ids` (the padding row excepted) and flags them 1, the others 0
// (unwritten: zeros to whoever reads them through the flags, nn::ParamAccess::written_rows).
void embedding_backward(const Tensor& ids, const Tensor& dx, Tensor& table_grad, int64_t padding_idx = -1,
                        Tensor* written_rows = nullptr);
// Zeroes the rows of t (viewed as [written.numel(), rest]) whose flag in `written` (U8) is 0.
void zero_unwritten_rows(Tensor& t, const Tensor& written);

// x [T, H, D] rotated in place by cos/sin [T, rot] (F32) over the first `rot` dims (rotate_half
// convention). `inverse` rotates by the opposite angle: the backward of the rotation (orthogonal).
void rope_inplace(Tensor& x, const Tensor& cos, const Tensor& sin, bool inverse = false);
// Per-head RMSNorm then RoPE (Qwen3's q_norm / k_norm before apply_rotary_pos_emb): x [T, H, D]
// normalised per head of D, then rotated by cos/sin [T, rot]. The values of rms_norm (rounded to
// x's dtype as it stores them) then rope_inplace, in one pass where the backend has a fused kernel
// (CUDA, rot = D). `rstd` as rms_norm's ([T * H]).
Tensor rms_norm_rope(const Tensor& x, const Tensor& weight, float eps, const Tensor& cos, const Tensor& sin,
                     Tensor* rstd = nullptr);
// Its backward: dy [T, H, D] (in the rotated space) rotated back, then rms_norm_backward; dw (F32
// [D]) accumulates. dy may be overwritten.
Tensor rms_norm_rope_backward(const Tensor& x, const Tensor& weight, float eps, Tensor& dy, const Tensor& cos,
                              const Tensor& sin, Tensor& dw, const Tensor* rstd = nullptr);

// ---- Attention

// Scaled dot-product attention over one batch of packed rows: q [B,S,Hq,D], k [B,S,Hkv,D],
// v [B,S,Hkv,DV] (Hq a multiple of Hkv; DV may differ from D, as in MLA) -> [B,S,Hq,DV]. Causal;
// `window` keeps keys with q - k < window; `doc_ids` [B,S] (I64, optional) stops attention across
// the documents of a packed row; `sinks` [Hq] (optional; GPT-OSS) is a per-head logit that joins
// each row's softmax without a value. `lse` (optional) receives the log-sum-exp of each row's scaled
// logits [B,Hq,S] F32 (the sink included), which the CUDA backward reuses.
// Generation: k and v may hold more positions Sk > S than q (a KV cache); q's rows are then the
// last S positions (query i at position Sk - S + i, as a cached decode step), without doc_ids.
// The backward takes Sk == S only.
Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, float scale, std::optional<int64_t> window,
                 const Tensor* doc_ids = nullptr, const Tensor* sinks = nullptr, Tensor* lse = nullptr);
// dq, dk, dv (written) from dout; with sinks, `dsinks` (optional) receives their gradient [Hq] F32.
// `out` and `lse` (optional) are the forward's: the CUDA kernels need them and recompute them when
// absent; the CPU recomputes the probabilities row by row whatever is given.
void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout, float scale,
                        std::optional<int64_t> window, const Tensor* doc_ids, Tensor& dq, Tensor& dk, Tensor& dv,
                        const Tensor* sinks = nullptr, Tensor* dsinks = nullptr, const Tensor* out = nullptr,
                        const Tensor* lse = nullptr);

// ---- Activations and small pieces of the family variants

// out = silu(gate) * up, with gate_up [T, 2I] holding gate in the first half; and d(gate_up).
// `act`, when given, receives swiglu(gate_up) as swiglu() computes it, bit for bit (the experts'
// backward needs it for the down projection's weight gradient: one pass fewer than recomputing it).
Tensor swiglu(const Tensor& gate_up);
Tensor swiglu_backward(const Tensor& gate_up, const Tensor& dout, Tensor* act = nullptr);
// GPT-OSS's expert activation: gate_up [T, 2I] with gate and up interleaved (columns 2j and 2j+1)
// -> (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha g), g = min(gate, limit); [T, I]. And back.
Tensor clamped_swiglu(const Tensor& gate_up, float alpha, float limit);
Tensor clamped_swiglu_backward(const Tensor& gate_up, const Tensor& dout, float alpha, float limit);

// x += y (same shape and dtype).
void add_inplace(Tensor& x, const Tensor& y);
// y [rows, n] += bias [n] on every row (bias F32 or BF16); db [n] (F32) += column sums of dy.
void add_bias_rows(Tensor& y, const Tensor& bias);
void bias_grad(const Tensor& dy, Tensor& db);
// x clamped to [-c, c] in place (OLMoE's clip_qkv); its backward zeroes dy where the value before
// the clamp was outside [-c, c] (torch.clamp passes the gradient on the boundary).
void clamp_inplace(Tensor& x, float c);
void clamp_backward_inplace(const Tensor& unclipped, Tensor& dy, float c);
// out [T, H] += sigmoid(logit [T, 1]) * y [T, H] (a shared expert through its gate); its backward:
// d_y = sigmoid(logit) * dy, d_logit = sum_h(dy * y) * s (1 - s) (both allocated here).
void add_sigmoid_gated(Tensor& out, const Tensor& y, const Tensor& logit);
void sigmoid_gated_backward(const Tensor& dy, const Tensor& y, const Tensor& logit, Tensor& d_y, Tensor& d_logit);

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

// ---- Routers

// Softmax router: probs = softmax(logits) [T,E] F32, then the k largest per row (ties to the lower
// index, as torch.topk on CPU) as weights [T,k] F32 (renormalised to sum 1 when `normalize`) and
// indices [T,k] I64. `forced` ([T,k] I64 on the logits' device) replaces the choice (balanced or
// replayed routing); the weights are then the probabilities at those experts, so the router learns.
// GPT-OSS's softmax over its top-k logits is this with `normalize`.
void router_softmax_topk(const Tensor& logits, int64_t k, bool normalize, Tensor& probs, Tensor& weights,
                         Tensor& indices, const Tensor* forced = nullptr);
// d(logits) [T,E] in `dtype` from d(weights) [T,k] F32 through the renormalisation and the softmax
// (the discrete choice gets no gradient). `dprobs_extra` [E] F32 (optional) is added to every row's
// d(probs): the load-balancing loss's gradient. The CPU computes in F32 only.
Tensor router_backward(const Tensor& probs, const Tensor& indices, const Tensor& weights, const Tensor& d_weights,
                       bool normalize, const Tensor* dprobs_extra = nullptr, DType dtype = DType::F32);
// DeepSeek-V3's router on logits [T, E]: scores = sigmoid(logits) [T, E] F32; the choice adds
// `bias` [E] (e_score_correction_bias), keeps the topk_group best of n_group groups (a group scores
// its two best) and takes the top k (ties to the lower index); weights [T, k] = the chosen scores,
// divided by (their sum + 1e-20) when `normalize`, times `scaling`; indices [T, k] I64. `forced`
// [T, k] (I64) replaces the choice. Its backward gives d(logits) [T, E] in `dtype`.
void grouped_sigmoid_route(const Tensor& logits, const Tensor& bias, int64_t n_group, int64_t topk_group, int64_t k,
                           bool normalize, float scaling, Tensor& scores, Tensor& weights, Tensor& indices,
                           const Tensor* forced = nullptr);
Tensor grouped_sigmoid_route_backward(const Tensor& scores, const Tensor& indices, const Tensor& d_weights,
                                      bool normalize, float scaling, DType dtype = DType::F32);

// ---- Expert token flow and grouped GEMMs. `offsets` [E+1] (host) delimit each expert's rows;
// experts with no rows are skipped (and get a zero weight gradient when not accumulating).

// y[rows of e] = x[rows of e] W[e]^T           x [R,K], W [E,N,K], y [R,N] (allocated by the caller)
void grouped_linear(const Tensor& x, const Tensor& w, const std::vector<int64_t>& offsets, Tensor& y);
// dx[rows of e] = dy[rows of e] W[e]           dy [R,N], W [E,N,K], dx [R,K]
void grouped_linear_input_grad(const Tensor& dy, const Tensor& w, const std::vector<int64_t>& offsets, Tensor& dx);
// b [E, parts*N, parts*R] holds per expert a parts x parts grid of [N, R] blocks: every block off the
// diagonal is set to zero (LoRA's fused gate|up B stays block-diagonal: gate and up adapt apart).
void zero_off_diagonal_blocks(Tensor& b, int64_t parts);
// dW[e] (+)= dy[rows of e]^T x[rows of e]      dW [E,N,K] (F32 or the weights' dtype)
// Not accumulating, experts without rows get zeros; with `written_experts` (U8 [E] on dW's device,
// only when not accumulating) they are left unwritten instead and flagged 0, the others 1.
// `squares` (only when not accumulating): set to F32 partial sums on dW's device whose total is dW's
// sum of squares as stored, where the backend computes them on the way (the CUDA ragged kernel's
// epilogue, the host per expert), else left undefined; the gradient norm then need not read dW.
void grouped_linear_weight_grad(const Tensor& dy, const Tensor& x, const std::vector<int64_t>& offsets, Tensor& dw,
                                bool accumulate, Tensor* written_experts = nullptr, Tensor* squares = nullptr);
// y [rows, n] += bias [E, n] of each row's expert; db [E, n] += each expert's column sums of dy.
void grouped_add_bias(Tensor& y, const Tensor& bias, const std::vector<int64_t>& offsets);
void grouped_bias_grad(const Tensor& dy, const std::vector<int64_t>& offsets, Tensor& db);

// The plan of a routing (ops/op_types.h) from expert indices [T,k] (I64).
RoutingPlan plan_routing(const Tensor& expert_indices, int64_t num_experts);
// The same, its host offsets left to finish_plan: on a GPU dest_row (and what is queued after it,
// e.g. permute_tokens) runs while the counts travel to the host, instead of after the host has
// waited for them. An expert index out of range is reported by finish_plan (permute_tokens skips
// the pairs it could not place meanwhile).
RoutingPlan plan_routing_started(const Tensor& expert_indices, int64_t num_experts);
void finish_plan(RoutingPlan& plan);
// xp[dest_row(t,j)] = x[t]: x [T,H] -> xp [T*k,H]
Tensor permute_tokens(const Tensor& x, const RoutingPlan& plan);
// y[t] = sum_j weights[t,j] * yp[dest_row(t,j)] (summed in F32, in slot order) -> y [T,H]
Tensor unpermute_tokens(const Tensor& yp, const Tensor& weights, const RoutingPlan& plan);
// unpermute's backward: d_yp[dest(t,j)] = weights[t,j] * dy[t], d_weights[t,j] = <dy[t], yp[dest(t,j)]>.
void unpermute_tokens_backward(const Tensor& dy, const Tensor& yp, const Tensor& weights, const RoutingPlan& plan,
                               Tensor& d_yp, Tensor& d_weights);
// permute's backward: dx[t] = sum_j d_xp[dest_row(t,j)].
Tensor permute_tokens_backward(const Tensor& d_xp, const RoutingPlan& plan);
// out[i] = in[index[i]] for rows: in [R,H], index I64 [n] on in's device (values in [0, R)).
Tensor gather_rows(const Tensor& in, const Tensor& index);

// ---- Mamba2 (Nemotron-H's mixer). Tokens are [T = batch * S] rows; with `doc_ids` [T] (I64,
// optional) each document of a packed row is its own sequence: the conv window and the scan state
// start afresh at its first token.

// relu(x)^2 (Nemotron-H's experts and MLPs) and its backward.
Tensor relu2(const Tensor& x);
Tensor relu2_backward(const Tensor& x, const Tensor& dy);
// Depthwise causal conv1d over each sequence: y[t, c] = bias[c] + sum_j w[c, j] x[t - (K-1) + j, c]
// (taps before the sequence's start read zeros), then SiLU when `silu`. x [T, C], w [C, K] or
// [C, 1, K], bias [C] (optional). The backward recomputes the pre-activation; dw (and dbias, F32)
// accumulate, dx is written.
Tensor causal_conv1d(const Tensor& x, const Tensor& w, const Tensor* bias, int64_t batch, const Tensor* doc_ids,
                     bool silu);
void causal_conv1d_backward(const Tensor& x, const Tensor& w, const Tensor* bias, int64_t batch, const Tensor* doc_ids,
                            bool silu, const Tensor& dy, Tensor& dx, Tensor& dw, Tensor* dbias);
// The selective scan of Mamba2 per head h (of G groups sharing B and C): dt = max(softplus(dt_raw +
// dt_bias), dt_min), A = -exp(A_log), state_t = exp(dt A) state_{t-1} + dt x_t B_t^T ([P, N]),
// y_t = state_t C_t + D x_t. x [T,H,P], dt_raw [T,H], B and C [T,G,N], dt_bias/A_log/D [H] -> y
// [T,H,P] F32. The backward returns every input's gradient (ops/op_types.h).
Tensor ssm_scan(const Tensor& x, const Tensor& dt_raw, const Tensor& dt_bias, const Tensor& a_log, const Tensor& b,
                const Tensor& c, const Tensor& d, float dt_min, int64_t batch, const Tensor* doc_ids);
void ssm_scan_backward(const Tensor& x, const Tensor& dt_raw, const Tensor& dt_bias, const Tensor& a_log,
                       const Tensor& b, const Tensor& c, const Tensor& d, float dt_min, int64_t batch,
                       const Tensor* doc_ids, const Tensor& dy, SsmScanGrads& grads);
// The same recurrence one token after another from a carried state (generation: a prompt, then one
// token per step): `state` [H, P, N] F32 on x's device (zeros before a sequence's first token) is
// updated in place; x [T,H,P] etc. are one sequence's next T tokens. Returns y [T,H,P] as ssm_scan. Equal to
// ssm_scan over the whole sequence, token for token.
Tensor ssm_step(const Tensor& x, const Tensor& dt_raw, const Tensor& dt_bias, const Tensor& a_log, const Tensor& b,
                const Tensor& c, const Tensor& d, float dt_min, Tensor& state);
// Mamba2's output norm: h = y * silu(z), RMS-normalised over each of `groups` equal column groups
// of a row (eps), times w [I]. y, z [T, I]. The backward writes dy, dz and accumulates dw (F32).
Tensor gated_rms_norm(const Tensor& y, const Tensor& z, const Tensor& w, int64_t groups, float eps);
void gated_rms_norm_backward(const Tensor& y, const Tensor& z, const Tensor& w, int64_t groups, float eps,
                             const Tensor& dout, Tensor& dy, Tensor& dz, Tensor& dw);

// ---- Losses

// Per-row cross-entropy of logits [N,V] against targets [N] (I64); rows whose target equals
// `ignore_index` get 0 and are not counted. Returns the per-row losses [N] F32 and the count.
Tensor cross_entropy_rows(const Tensor& logits, const Tensor& targets, int64_t ignore_index, int64_t* counted);
// Cross-entropy fused with its gradient: dlogits = scale * (softmax - onehot) on counted rows, 0 on
// ignored ones (allocated here unless it is `logits` itself: then in place). Returns the summed loss.
double cross_entropy_backward(const Tensor& logits, const Tensor& targets, int64_t ignore_index, float scale,
                              Tensor& dlogits, int64_t* counted);
// The LM head and cross-entropy fused over chunks of `chunk_rows` tokens: per chunk, logits = h W^T,
// the softmax gradient, d_hidden = dlogits W and dW += dlogits^T h; only one chunk's logits ever
// exist. targets [N] I64 (already shifted); `scale` multiplies the gradient. Returns the summed loss.
// `dw` null: no weight gradient (a frozen LM head); `accumulate_dw` false: dW = the sum (what it
// held is not read).
// `chunk_rows` 0: cross_entropy_chunk_rows's choice for these shapes.
double fused_linear_cross_entropy(const Tensor& hidden, const Tensor& weight, const Tensor& targets,
                                  int64_t ignore_index, float scale, Tensor& d_hidden, Tensor* dw, int64_t* counted,
                                  int64_t chunk_rows = 0, bool accumulate_dw = true);
// The most bytes of logits one chunk holds by default: 1.25 GiB. Fewer chunks are faster (each
// after the first reads and rewrites the head's whole weight gradient, and the GEMMs are larger):
// on q30-L4 (one H100) 2048 rows a chunk ran +1.2-1.5% against 1024, and 4096 (one chunk of a
// 4096-token micro-batch, 1.16 GiB of BF16 logits at 151,936 tokens of vocabulary) +0.7% more for
// +0.41 GiB of peak (docs/perf-notes.md), still far under what the unfused logits would take.
constexpr int64_t kCrossEntropyChunkBytes = int64_t{5} << 28;
// Rows a chunk of the fused LM head + loss: all `tokens` when their logits fit the budget, else
// the fewest equal chunks that do, rounded up to a multiple of 64 rows.
int64_t cross_entropy_chunk_rows(int64_t tokens, int64_t vocab, int64_t element_bytes,
                                 int64_t budget_bytes = kCrossEntropyChunkBytes);

// ---- Optimizer

// Multi-tensor AdamW (ops/adamw_math.h's arithmetic on every element: values, gradients and
// moments F32 or BF16, read into F32); refreshes param_bf16_copy when given (bf16-mixed).
void adamw_multi_tensor(const std::vector<AdamWTensors>& tensors, const AdamWScalars& scalars);
// sqrt of the sum of squares of every gradient (F64 across tensors); and every tensor scaled in place.
// `written_rows`, when given, is one entry per gradient: its row flags (AdamWTensors::
// grad_written_rows; rows flagged 0 count as zeros and are not read) or undefined (all written).
// `partial_squares`: more gradients' sums of squares as partial sums (F32, grouped_linear_weight_grad's
// `squares`), added as they are.
double global_grad_norm(const std::vector<Tensor>& grads, const std::vector<Tensor>& written_rows = {},
                        const std::vector<Tensor>& partial_squares = {});
void scale_inplace(const std::vector<Tensor>& tensors, float factor);

}  // namespace moeforge::ops
