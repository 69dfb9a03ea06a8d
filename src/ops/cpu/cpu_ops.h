// The CPU implementations of the ops in ops/ops.h: the numerical reference (fp32 arithmetic, double
// accumulators in norms, softmax sums and the loss, OpenMP over rows, OpenBLAS for GEMMs).
// Activations are F32; weight operands may be F32 or BF16 (widened exactly). Each op's contract is
// written once, in ops/ops.h; only what is particular to the CPU is said here.
#pragma once
#include <optional>
#include <vector>

#include "core/tensor.h"
#include "ops/op_types.h"

namespace moeforge::ops::cpu {

// The tensor itself when F32, else a widened copy (BF16 weights are widened exactly).
inline Tensor as_f32(const Tensor& t) { return t.dtype() == DType::F32 ? t : t.to(DType::F32); }

// Raw fp32 GEMM: C = alpha * op(A) op(B) + beta * C, row-major (OpenBLAS or a blocked fallback).
void gemm_f32(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
              const float* b, int64_t ldb, float beta, float* c, int64_t ldc);
void gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c, bool accumulate);
Tensor linear(const Tensor& x, const Tensor& weight);
void linear_weight_grad(const Tensor& dy, const Tensor& x, Tensor& dw, bool accumulate = true);
Tensor linear_input_grad(const Tensor& dy, const Tensor& weight);

Tensor rms_norm(const Tensor& x, const Tensor& weight, float eps, Tensor* rstd = nullptr);
Tensor add_rms_norm(const Tensor& x, const Tensor& residual, const Tensor& weight, float eps, Tensor& sum, Tensor* rstd);
Tensor rms_norm_backward(const Tensor& x, const Tensor& weight, float eps, const Tensor& dy, Tensor& dw);

Tensor embedding(const Tensor& ids, const Tensor& table);
void embedding_backward(const Tensor& ids, const Tensor& dx, Tensor& table_grad, int64_t padding_idx = -1,
                        Tensor* written_rows = nullptr);
void zero_unwritten_rows(Tensor& t, const Tensor& written);
void rope_inplace(Tensor& x, const Tensor& cos, const Tensor& sin, bool inverse = false);

Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, float scale, std::optional<int64_t> window,
                 const Tensor* doc_ids = nullptr, const Tensor* sinks = nullptr, Tensor* lse = nullptr);
void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout, float scale,
                        std::optional<int64_t> window, const Tensor* doc_ids, Tensor& dq, Tensor& dk, Tensor& dv,
                        const Tensor* sinks = nullptr, Tensor* dsinks = nullptr);

Tensor swiglu(const Tensor& gate_up);
Tensor swiglu_backward(const Tensor& gate_up, const Tensor& dout, Tensor* act = nullptr);
Tensor clamped_swiglu(const Tensor& gate_up, float alpha, float limit);
Tensor clamped_swiglu_backward(const Tensor& gate_up, const Tensor& dout, float alpha, float limit);

void softmax_rows_inplace(Tensor& x);
Tensor softmax_backward(const Tensor& probs, const Tensor& dprobs);
void topk_rows(const Tensor& x, int64_t k, Tensor& values, Tensor& indices);

void router_softmax_topk(const Tensor& logits, int64_t k, bool normalize, Tensor& probs, Tensor& weights,
                         Tensor& indices, const Tensor* forced);
Tensor router_backward(const Tensor& probs, const Tensor& indices, const Tensor& weights, const Tensor& d_weights,
                       bool normalize, const Tensor* dprobs_extra);
void grouped_sigmoid_route(const Tensor& logits, const Tensor& bias, int64_t n_group, int64_t topk_group, int64_t k,
                           bool normalize, float scaling, Tensor& scores, Tensor& weights, Tensor& indices,
                           const Tensor* forced = nullptr);
Tensor grouped_sigmoid_route_backward(const Tensor& scores, const Tensor& indices, const Tensor& d_weights,
                                      bool normalize, float scaling);

void copy_columns(const Tensor& src, int64_t src_width, int64_t src_c0, int64_t src_row_div, Tensor& dst,
                  int64_t dst_width, int64_t dst_c0, int64_t n, bool add = false);
Tensor sum_row_groups(const Tensor& src, int64_t src_width, int64_t src_c0, int64_t n, int64_t group);
Tensor deinterleave_pairs(const Tensor& x, int64_t d);
Tensor interleave_pairs(const Tensor& x, int64_t d);

void add_inplace(Tensor& x, const Tensor& y);
void add_bias_rows(Tensor& y, const Tensor& bias);
void bias_grad(const Tensor& dy, Tensor& db);
void clamp_inplace(Tensor& x, float c);
void clamp_backward_inplace(const Tensor& unclipped, Tensor& dy, float c);
void add_sigmoid_gated(Tensor& out, const Tensor& y, const Tensor& logit);
void sigmoid_gated_backward(const Tensor& dy, const Tensor& y, const Tensor& logit, Tensor& d_y, Tensor& d_logit);

Tensor cross_entropy_rows(const Tensor& logits, const Tensor& targets, int64_t ignore_index, int64_t* counted);
double cross_entropy_backward(const Tensor& logits, const Tensor& targets, int64_t ignore_index, float scale,
                              Tensor& dlogits, int64_t* counted);
double fused_linear_cross_entropy(const Tensor& hidden, const Tensor& weight, const Tensor& targets,
                                  int64_t ignore_index, float scale, Tensor& d_hidden, Tensor* dw, int64_t* counted,
                                  int64_t chunk_rows, bool accumulate_dw = true);

// Expert token flow and grouped GEMMs (ops/cpu/experts.cpp).
void grouped_linear(const Tensor& x, const Tensor& w, const std::vector<int64_t>& offsets, Tensor& y);
void grouped_linear_input_grad(const Tensor& dy, const Tensor& w, const std::vector<int64_t>& offsets, Tensor& dx);
void grouped_linear_weight_grad(const Tensor& dy, const Tensor& x, const std::vector<int64_t>& offsets, Tensor& dw,
                                bool accumulate, Tensor* written_experts = nullptr, Tensor* squares = nullptr);
void grouped_add_bias(Tensor& y, const Tensor& bias, const std::vector<int64_t>& offsets);
void grouped_bias_grad(const Tensor& dy, const std::vector<int64_t>& offsets, Tensor& db);
RoutingPlan plan_routing(const Tensor& expert_indices, int64_t num_experts);
Tensor permute_tokens(const Tensor& x, const RoutingPlan& plan);
Tensor unpermute_tokens(const Tensor& yp, const Tensor& weights, const RoutingPlan& plan);
void unpermute_tokens_backward(const Tensor& dy, const Tensor& yp, const Tensor& weights, const RoutingPlan& plan,
                               Tensor& d_yp, Tensor& d_weights);
Tensor permute_tokens_backward(const Tensor& d_xp, const RoutingPlan& plan);
Tensor gather_rows(const Tensor& in, const Tensor& index);

// Optimizer (ops/cpu/optimizer.cpp).
void adamw_multi_tensor(const std::vector<AdamWTensors>& tensors, const AdamWScalars& scalars);
double global_grad_norm(const std::vector<Tensor>& grads, const std::vector<Tensor>& written_rows = {},
                        const std::vector<Tensor>& partial_squares = {});
void scale_inplace(const std::vector<Tensor>& tensors, float factor);


// Mamba2 (ops/cpu/mamba.cpp).
Tensor relu2(const Tensor& x);
Tensor relu2_backward(const Tensor& x, const Tensor& dy);
Tensor causal_conv1d(const Tensor& x, const Tensor& w, const Tensor* bias, int64_t batch, const Tensor* doc_ids,
                     bool silu);
void causal_conv1d_backward(const Tensor& x, const Tensor& w, const Tensor* bias, int64_t batch, const Tensor* doc_ids,
                            bool silu, const Tensor& dy, Tensor& dx, Tensor& dw, Tensor* dbias);
Tensor ssm_scan(const Tensor& x, const Tensor& dt_raw, const Tensor& dt_bias, const Tensor& a_log, const Tensor& b,
                const Tensor& c, const Tensor& d, float dt_min, int64_t batch, const Tensor* doc_ids);
Tensor ssm_step(const Tensor& x, const Tensor& dt_raw, const Tensor& dt_bias, const Tensor& a_log, const Tensor& b,
                const Tensor& c, const Tensor& d, float dt_min, Tensor& state);
void ssm_scan_backward(const Tensor& x, const Tensor& dt_raw, const Tensor& dt_bias, const Tensor& a_log,
                       const Tensor& b, const Tensor& c, const Tensor& d, float dt_min, int64_t batch,
                       const Tensor* doc_ids, const Tensor& dy, SsmScanGrads& grads);
Tensor gated_rms_norm(const Tensor& y, const Tensor& z, const Tensor& w, int64_t groups, float eps);
void zero_off_diagonal_blocks(Tensor& b, int64_t parts);
Tensor dropout_scaled(const Tensor& x, float p, uint64_t seed);
void gated_rms_norm_backward(const Tensor& y, const Tensor& z, const Tensor& w, int64_t groups, float eps,
                             const Tensor& dout, Tensor& dy, Tensor& dz, Tensor& dw);

}  // namespace moeforge::ops::cpu
