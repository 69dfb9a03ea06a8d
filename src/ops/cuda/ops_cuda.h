// The CUDA implementations of the ops in ops/ops.h, on device tensors (cuda::empty / to_device).
// Each op's contract is written once, in ops/ops.h; only what is particular to CUDA is said here.
// Activations are BF16 or F32 (an output takes its input's dtype), arithmetic is F32; every op is
// compared with its CPU reference on fresh random inputs (tests/unit/test_backend_ops.cpp).
#pragma once
#include <cstdint>
#include <vector>

#include "core/tensor.h"
#include "ops/op_types.h"

namespace moeforge::cuda {

using AdamWTensors = ops::AdamWTensors;
using RoutingPlan = ops::RoutingPlan;

// The current device's multiprocessors (read once): launch sizes of persistent kernels.
int sm_count();
// How many blocks of `kernel` at this size are resident on the whole device at once (its
// occupancy times the SMs, at least the SM count; cached per kernel and size): the grid of a
// grid-stride kernel, which any more blocks would leave a partial wave behind.
int resident_grid(const void* kernel, int threads, size_t dynamic_smem);

// cuBLASLt with F32 accumulation; C may be F32 with BF16 inputs.
void gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c, bool accumulate = false);
Tensor linear(const Tensor& x, const Tensor& weight);

// Random initialisation on the device: N(mean, std) from a counter-based generator (the same
// values for the same seed on any GPU), or a constant.
void fill_normal(Tensor& x, float mean, float std, uint64_t seed);
void fill(Tensor& x, float value);
// dst = src converted elementwise (F32 / BF16 / F16, same element count); y += x; a device copy;
// zero bytes.
void convert(const Tensor& src, Tensor& dst);
void add_inplace(Tensor& y, const Tensor& x);
Tensor copy(const Tensor& x, const char* what = "copy");
void zero(Tensor& x);
// Zeroes the blocks base + b * block_bytes for every b in `blocks` in one launch (the weight
// gradients of experts that got no rows: one memset each cost a few microseconds of device time).
void zero_blocks(void* base, int64_t block_bytes, const std::vector<int32_t>& blocks);

Tensor rms_norm(const Tensor& x, const Tensor& weight, float eps, Tensor* rstd = nullptr);
// sum = residual + x (a new tensor), then rms_norm(sum) (ops::add_rms_norm).
Tensor add_rms_norm(const Tensor& x, const Tensor& residual, const Tensor& weight, float eps, Tensor& sum,
                    Tensor* rstd = nullptr);
// Takes the forward's statistics (the dispatch computes them when the caller has none). With
// `plus`, dx + *plus in the same pass (ops::rms_norm_backward's residual gradient).
Tensor rms_norm_backward(const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& dy, Tensor& dw,
                         const Tensor* plus = nullptr);

void add_bias_rows(Tensor& y, const Tensor& bias);
void bias_grad(const Tensor& dy, Tensor& db);
void clamp_inplace(Tensor& x, float c);
void clamp_backward_inplace(const Tensor& unclipped, Tensor& dy, float c);
void add_sigmoid_gated(Tensor& out, const Tensor& y, const Tensor& logit);
void sigmoid_gated_backward(const Tensor& dy, const Tensor& y, const Tensor& logit, Tensor& d_y, Tensor& d_logit);
void copy_columns(const Tensor& src, int64_t src_width, int64_t src_c0, int64_t src_row_div, Tensor& dst,
                  int64_t dst_width, int64_t dst_c0, int64_t n, bool add = false);
Tensor sum_row_groups(const Tensor& src, int64_t src_width, int64_t src_c0, int64_t n, int64_t group);
Tensor deinterleave_pairs(const Tensor& x, int64_t d);
Tensor interleave_pairs(const Tensor& x, int64_t d);
Tensor swiglu(const Tensor& gate_up);
Tensor swiglu_backward(const Tensor& gate_up, const Tensor& dout, Tensor* act = nullptr);
Tensor clamped_swiglu(const Tensor& gate_up, float alpha, float limit);
Tensor clamped_swiglu_backward(const Tensor& gate_up, const Tensor& dout, float alpha, float limit);
void rope_inplace(Tensor& x, const Tensor& cos, const Tensor& sin, bool inverse = false);
// Per-head RMSNorm then RoPE in one pass (rows that fit its kernel; others take the two kernels):
// ops::rms_norm_rope. The backward takes the forward's rstd.
Tensor rms_norm_rope(const Tensor& x, const Tensor& weight, float eps, const Tensor& cos, const Tensor& sin,
                     Tensor* rstd = nullptr);
Tensor rms_norm_rope_backward(const Tensor& x, const Tensor& weight, const Tensor& rstd, Tensor& dy, const Tensor& cos,
                              const Tensor& sin, Tensor& dw);

// Ids are checked on the device: one out of range sets an error flag that is reported here.
Tensor embedding(const Tensor& ids, const Tensor& table);
void embedding_backward(const Tensor& ids, const Tensor& dx, Tensor& table_grad, int64_t padding_idx = -1,
                        Tensor* written_rows = nullptr);
void zero_unwritten_rows(Tensor& t, const Tensor& written);

// Routers. E <= 1024 and k <= 64 for DeepSeek's grouped routing.
void router_softmax_topk(const Tensor& logits, int64_t k, bool normalize, Tensor& probs, Tensor& weights,
                         Tensor& indices, const Tensor* forced = nullptr);
// Tests: the most experts router_softmax_topk routes a warp per token (1,024 by default; below that
// a block per token), so both kernels can be compared on one input. Returns the previous limit.
int64_t set_router_warp_max_experts(int64_t experts);
Tensor router_backward(const Tensor& probs, const Tensor& indices, const Tensor& weights, const Tensor& d_weights,
                       bool normalize, DType dtype, const Tensor* dprobs_extra = nullptr);
void grouped_sigmoid_route(const Tensor& logits, const Tensor& bias, int64_t n_group, int64_t topk_group, int64_t k,
                           bool normalize, float scaling, Tensor& scores, Tensor& weights, Tensor& indices,
                           const Tensor* forced = nullptr);
Tensor grouped_sigmoid_route_backward(const Tensor& scores, const Tensor& indices, const Tensor& d_weights,
                                      bool normalize, float scaling, DType dtype);

// Losses. Passing `dlogits` = `logits` computes the gradient in place (no second logits-sized
// buffer). The fused LM head computes each chunk's logits in h's dtype, as Transformers rounds them
// before upcasting; one chunk's logits exist at a time (chunk_rows x V instead of N x V: 0.3 GB
// instead of 1.2 GB at 4096 tokens and a 151936 vocabulary in BF16).
double cross_entropy_backward(const Tensor& logits, const Tensor& targets, int64_t ignore_index, float scale,
                              Tensor& dlogits, int64_t* counted);
// The same without waiting for the device: the row losses (NaN for ignored rows) into `losses`
// (F32 [rows]); sum_row_losses copies them back once (one synchronisation for many chunks).
void cross_entropy_backward_rows(const Tensor& logits, const Tensor& targets, int64_t ignore_index, float scale,
                                 Tensor& dlogits, Tensor& losses);
double sum_row_losses(const Tensor& losses, int64_t* counted);
Tensor cross_entropy_rows(const Tensor& logits, const Tensor& targets, int64_t ignore_index, int64_t* counted);
double fused_linear_cross_entropy(const Tensor& hidden, const Tensor& weight, const Tensor& targets, int64_t ignore_index,
                                  float scale, Tensor& d_hidden, Tensor* dw, int64_t* counted, int64_t chunk_rows = 2048,
                                  bool accumulate_dw = true);

// Multi-tensor AdamW: one launch for every parameter. BF16 moments are the `bf16` policy (torch
// AdamW on a BF16 model); F32 masters with a BF16 working copy refreshed in the same pass are
// `bf16-mixed`. The grad norm accumulates in F32 per block and F64 across blocks.
void adamw_multi_tensor(const std::vector<AdamWTensors>& tensors, const ops::AdamWScalars& scalars);
double global_grad_norm(const std::vector<Tensor>& grads, const std::vector<Tensor>& written_rows = {},
                        const std::vector<Tensor>& partial_squares = {});
void scale_inplace(const std::vector<Tensor>& tensors, float factor);

// Mixture-of-experts token flow: a deterministic plan (rows grouped by expert, in token order
// inside an expert), no atomics in the sums.
void grouped_linear(const Tensor& x, const Tensor& w, const std::vector<int64_t>& offsets, Tensor& y);
void grouped_linear_input_grad(const Tensor& dy, const Tensor& w, const std::vector<int64_t>& offsets, Tensor& dx);
void grouped_linear_weight_grad(const Tensor& dy, const Tensor& x, const std::vector<int64_t>& offsets, Tensor& dw,
                                bool accumulate, Tensor* written_experts = nullptr, Tensor* squares = nullptr);
void grouped_add_bias(Tensor& y, const Tensor& bias, const std::vector<int64_t>& offsets);
void grouped_bias_grad(const Tensor& dy, const std::vector<int64_t>& offsets, Tensor& db);
// Which path the last grouped GEMM took: "strided" (equal experts), "cutlass" (ragged BF16 on
// Hopper), "cublas-grouped", "split" (large weight gradients alone, the rest grouped) or "loop".
const char* last_grouped_gemm_path();
RoutingPlan plan_routing(const Tensor& expert_indices, int64_t num_experts);
RoutingPlan plan_routing_started(const Tensor& expert_indices, int64_t num_experts);
Tensor permute_tokens(const Tensor& x, const RoutingPlan& plan);
Tensor unpermute_tokens(const Tensor& yp, const Tensor& weights, const RoutingPlan& plan);
void unpermute_tokens_backward(const Tensor& dy, const Tensor& yp, const Tensor& weights, const RoutingPlan& plan,
                               Tensor& d_yp, Tensor& d_weights);
Tensor permute_tokens_backward(const Tensor& d_xp, const RoutingPlan& plan);
Tensor gather_rows(const Tensor& in, const Tensor& index);

// Attention: flash-style CUDA-core kernels in F32 (the correctness reference; D = DV in {8, 16, 32,
// 64, 96, 128}, or MLA's D 192 with DV 128), and cuDNN's fused attention for BF16 calls with D = DV
// and without document ids when the build has it. window <= 0: no sliding window. Sinks are
// applied to the finished attention (the output rescaled by the keys' share, the log-sum-exp
// extended), so either backend takes them. The backward recomputes the probabilities from `out`
// and `lse`, with no atomics (dk/dv accumulate per key row over the query heads of its group).
Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, float scale, int64_t window, const Tensor* doc_ids,
                 Tensor* lse, const Tensor* sinks = nullptr);
void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                        const Tensor& dout, float scale, int64_t window, const Tensor* doc_ids, Tensor& dq, Tensor& dk,
                        Tensor& dv, const Tensor* sinks = nullptr, Tensor* dsinks = nullptr);
// "cudnn" or "native" (forced with MOEFORGE_ATTENTION=native) for these arguments.
const char* attention_backend(const Tensor& q, int64_t window, const Tensor* doc_ids);

// Mamba2 (mamba.cu; the scan in ssd_scan.cu, chunked state-space-duality form): outputs in x's
// dtype (the scan's gradients F32); doc_ids on the device.
void zero_off_diagonal_blocks(Tensor& b, int64_t parts);
Tensor dropout_scaled(const Tensor& x, float p, uint64_t seed);
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
                       const Tensor* doc_ids, const Tensor& dy, ops::SsmScanGrads& grads);
Tensor gated_rms_norm(const Tensor& y, const Tensor& z, const Tensor& w, int64_t groups, float eps);
void gated_rms_norm_backward(const Tensor& y, const Tensor& z, const Tensor& w, int64_t groups, float eps,
                             const Tensor& dout, Tensor& dy, Tensor& dz, Tensor& dw);

}  // namespace moeforge::cuda
