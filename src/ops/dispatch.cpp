// ops/ops.h's one API: each op checks that its tensors share a device and runs the CPU reference
// (ops::cpu) or the CUDA kernels (cuda::) for it. A build without the CUDA backend can hold no
// device tensor (cuda::empty refuses), so only the CPU branch is compiled there.
#include "ops/ops.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "core/error.h"
#include "ops/cpu/cpu_ops.h"
#include "ops/cuda/runtime.h"
#ifdef MOEFORGE_HAVE_CUDA
#include "ops/cuda/ops_cuda.h"
#endif

namespace moeforge::ops {

namespace {

bool on_device(const Tensor& t) { return !t.device().is_cpu(); }

// Every defined tensor an op is given lives where the first one does (a host tensor handed to a
// kernel, or a device pointer read on the host, would fail far from the call).
template <typename... Ts>
bool same_device(const char* op, const Tensor& first, const Ts&... rest) {
  const Device d = first.device();
  [[maybe_unused]] auto check = [&](const Tensor& t) {  // unused when the op has one tensor
    MF_CHECK(!t.defined() || t.device() == d, op, ": its tensors are on ", d.str(), " and ", t.device().str());
  };
  (check(rest), ...);
  return on_device(first);
}

// A gradient's row flags (AdamWTensors::grad_written_rows), when given: U8 beside it, one per row
// of a whole number of its elements.
void check_row_flags(const char* op, const Tensor& grad, const Tensor& flags) {
  if (!flags.defined()) return;
  same_device(op, grad, flags);
  MF_CHECK(flags.dtype() == DType::U8 && flags.numel() > 0 && grad.numel() % flags.numel() == 0, op,
           ": row flags must be U8 and their count divide the gradient's ", grad.numel(), " values, got ",
           shape_str(flags.shape()), " ", dtype_name(flags.dtype()));
}

}  // namespace

#ifdef MOEFORGE_HAVE_CUDA
// `return` the CUDA call when the op's tensors are on the device, else fall through to the CPU.
#define MF_ON_CUDA(op, tensors, call) \
  if (same_device(op, tensors)) return call
#else
#define MF_ON_CUDA(op, tensors, call) same_device(op, tensors)
#endif
// Several tensors as one macro argument.
#define MF_T(...) __VA_ARGS__
// An op whose CUDA and CPU implementations take the same call: `call` is written once and made
// in namespace cuda:: or cpu:: by the tensors' device (returning its result, if any).
#define MF_DISPATCH(op, tensors, call) \
  MF_ON_CUDA(op, MF_T(tensors), cuda::call); \
  return cpu::call

Tensor empty(const Shape& shape, DType dtype, Device device, const char* what) {
  return device.is_cpu() ? Tensor::empty(shape, dtype) : cuda::empty(shape, dtype, what);
}

Tensor to_device(const Tensor& t, Device device, DType dtype) {
  if (device.is_cpu()) {
    if (t.device().is_cpu()) return t.to(dtype);
    const Tensor host = cuda::to_host_f32(t);  // F32 (I64 stays I64)
    return host.dtype() == dtype ? host : host.to(dtype);
  }
  if (t.device().is_cpu()) return cuda::to_device(t, dtype);
#ifdef MOEFORGE_HAVE_CUDA
  if (t.dtype() == dtype) return cuda::copy(t);
  Tensor out = cuda::empty(t.shape(), dtype, "converted tensor");
  cuda::convert(t, out);
  return out;
#else
  MF_THROW("this moeforge was built without the CUDA backend");
#endif
}

void gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c, bool accumulate) {
  MF_DISPATCH("gemm", MF_T(a, b, c), gemm(a, trans_a, b, trans_b, c, accumulate));
}

Tensor linear(const Tensor& x, const Tensor& weight) {
  MF_DISPATCH("linear", MF_T(x, weight), linear(x, weight));
}

void linear_weight_grad(const Tensor& dy, const Tensor& x, Tensor& dw, bool accumulate) {
#ifdef MOEFORGE_HAVE_CUDA
  if (same_device("linear_weight_grad", dy, x, dw)) {
    const int64_t n = dy.size(-1), k = x.size(-1);
    Tensor dw2 = dw.view({n, k});
    return cuda::gemm(dy.view({-1, n}), true, x.view({-1, k}), false, dw2, accumulate);
  }
#endif
  cpu::linear_weight_grad(dy, x, dw, accumulate);
}

Tensor linear_input_grad(const Tensor& dy, const Tensor& weight) {
#ifdef MOEFORGE_HAVE_CUDA
  if (same_device("linear_input_grad", dy, weight)) {
    const int64_t n = weight.size(0), k = weight.size(1);
    Shape shape = dy.shape();
    shape.back() = k;
    Tensor dx = cuda::empty(shape, dy.dtype(), "linear input gradient");
    Tensor dx2 = dx.view({-1, k});
    cuda::gemm(dy.view({-1, n}), false, weight, false, dx2);
    return dx;
  }
#endif
  return cpu::linear_input_grad(dy, weight);
}

Tensor rms_norm(const Tensor& x, const Tensor& weight, float eps, Tensor* rstd) {
  MF_DISPATCH("rms_norm", MF_T(x, weight), rms_norm(x, weight, eps, rstd));
}

Tensor add_rms_norm(const Tensor& x, const Tensor& residual, const Tensor& weight, float eps, Tensor& sum,
                    Tensor* rstd) {
  MF_DISPATCH("add_rms_norm", MF_T(x, residual, weight), add_rms_norm(x, residual, weight, eps, sum, rstd));
}

Tensor rms_norm_backward(const Tensor& x, const Tensor& weight, float eps, const Tensor& dy, Tensor& dw,
                         const Tensor* rstd, const Tensor* residual_grad) {
#ifdef MOEFORGE_HAVE_CUDA
  if (same_device("rms_norm_backward", x, weight, dy, dw, residual_grad ? *residual_grad : Tensor())) {
    Tensor own;
    if (!rstd) cuda::rms_norm(x, weight, eps, &own);  // the statistics the kernel takes
    return cuda::rms_norm_backward(x, weight, rstd ? *rstd : own, dy, dw, residual_grad);
  }
#endif
  Tensor dx = cpu::rms_norm_backward(x, weight, eps, dy, dw);
  if (residual_grad) add_inplace(dx, *residual_grad);
  return dx;
}

Tensor embedding(const Tensor& ids, const Tensor& table) {
  MF_DISPATCH("embedding", MF_T(ids, table), embedding(ids, table));
}

void embedding_backward(const Tensor& ids, const Tensor& dx, Tensor& table_grad, int64_t padding_idx,
                        Tensor* written_rows) {
  if (written_rows)
    MF_CHECK(written_rows->dtype() == DType::U8 && written_rows->numel() == table_grad.size(0) &&
                 written_rows->device() == table_grad.device(),
             "embedding_backward: the written-rows flags must be U8 [", table_grad.size(0), "] beside the gradient");
  MF_DISPATCH("embedding_backward", MF_T(ids, dx, table_grad),
              embedding_backward(ids, dx, table_grad, padding_idx, written_rows));
}

void zero_unwritten_rows(Tensor& t, const Tensor& written) {
  MF_CHECK(written.defined(), "zero_unwritten_rows: no row flags");
  check_row_flags("zero_unwritten_rows", t, written);
  MF_DISPATCH("zero_unwritten_rows", MF_T(t, written), zero_unwritten_rows(t, written));
}

void rope_inplace(Tensor& x, const Tensor& cos, const Tensor& sin, bool inverse) {
  MF_DISPATCH("rope", MF_T(x, cos, sin), rope_inplace(x, cos, sin, inverse));
}

Tensor rms_norm_rope(const Tensor& x, const Tensor& weight, float eps, const Tensor& cos, const Tensor& sin, Tensor* rstd) {
#ifdef MOEFORGE_HAVE_CUDA
  if (same_device("rms_norm_rope", x, weight, cos, sin)) return cuda::rms_norm_rope(x, weight, eps, cos, sin, rstd);
#endif
  MF_CHECK(x.dim() == 3, "rms_norm_rope: expected [T, H, D], got ", shape_str(x.shape()));
  Tensor y = cpu::rms_norm(x.view({-1, x.shape()[2]}), weight, eps, rstd).view(x.shape());
  cpu::rope_inplace(y, cos, sin);
  return y;
}

Tensor rms_norm_rope_backward(const Tensor& x, const Tensor& weight, float eps, Tensor& dy, const Tensor& cos,
                              const Tensor& sin, Tensor& dw, const Tensor* rstd) {
  MF_CHECK(x.dim() == 3 && dy.shape() == x.shape(), "rms_norm_rope_backward: dy ", shape_str(dy.shape()), " must match x ",
           shape_str(x.shape()));
  const int64_t d = x.shape()[2];
#ifdef MOEFORGE_HAVE_CUDA
  if (same_device("rms_norm_rope_backward", x, weight, dy, dw, cos, sin)) {
    Tensor own;
    if (!rstd) cuda::rms_norm(x.view({-1, d}), weight, eps, &own);  // the statistics the kernel takes
    return cuda::rms_norm_rope_backward(x, weight, rstd ? *rstd : own, dy, cos, sin, dw);
  }
#endif
  cpu::rope_inplace(dy, cos, sin, /*inverse=*/true);
  return cpu::rms_norm_backward(x.view({-1, d}), weight, eps, dy.view({-1, d}), dw).view(x.shape());
}

Tensor copy(const Tensor& x) { return to_device(x, x.device(), x.dtype()); }

Tensor zeros(const Shape& shape, DType dtype, Device device, const char* what) {
  Tensor t = empty(shape, dtype, device, what);
  zero(t);
  return t;
}

void zero(Tensor& x) {
  MF_ON_CUDA("zero", x, cuda::zero(x));
  if (x.nbytes() > 0) std::memset(x.raw(), 0, x.nbytes());
}

void synchronize(Device device) {
  if (!device.is_cpu()) cuda::synchronize();
}

#ifdef MOEFORGE_HAVE_CUDA
namespace {

// The fused (cuDNN) attention takes one head dim for q, k and v: a narrower v (latent attention:
// 128 columns against q/k's 192) is zero-padded to q's width, which leaves the output's first DV
// columns exact and the rest zero (PV over 192 columns costs less than the CUDA-core kernels'
// several times slower exact-width path).
bool pad_values(const Tensor& q, const Tensor& v, std::optional<int64_t> window, const Tensor* doc_ids) {
  return v.size(3) < q.size(3) && std::string(cuda::attention_backend(q, window.value_or(0), doc_ids)) == "cudnn";
}

// x [B,S,H,D] with its heads' columns widened to `width` (zeros) or narrowed to it.
Tensor head_columns(const Tensor& x, int64_t width) {
  const int64_t d = x.size(3);
  Tensor out = cuda::empty({x.size(0), x.size(1), x.size(2), width}, x.dtype(), "attention head columns");
  if (width > d) cuda::zero(out);
  cuda::copy_columns(x, d, 0, 1, out, width, 0, std::min(d, width));
  return out;
}

}  // namespace
#endif

Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, float scale, std::optional<int64_t> window,
                 const Tensor* doc_ids, const Tensor* sinks, Tensor* lse) {
#ifdef MOEFORGE_HAVE_CUDA
  if (same_device("attention", q, k, v, doc_ids ? *doc_ids : Tensor(), sinks ? *sinks : Tensor())) {
    if (k.size(1) == q.size(1) && pad_values(q, v, window, doc_ids))  // (generation steps run natively)
      return head_columns(cuda::attention(q, k, head_columns(v, q.size(3)), scale, window.value_or(0), doc_ids, lse, sinks),
                          v.size(3));
    return cuda::attention(q, k, v, scale, window.value_or(0), doc_ids, lse, sinks);
  }
#endif
  return cpu::attention(q, k, v, scale, window, doc_ids, sinks, lse);
}

void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout, float scale,
                        std::optional<int64_t> window, const Tensor* doc_ids, Tensor& dq, Tensor& dk, Tensor& dv,
                        const Tensor* sinks, Tensor* dsinks, const Tensor* out, const Tensor* lse) {
#ifdef MOEFORGE_HAVE_CUDA
  if (same_device("attention_backward", q, k, v, dout)) {
    if (pad_values(q, v, window, doc_ids)) {  // as the forward: run at q's width, keep v's columns
      const int64_t w = q.size(3);
      const Tensor vp = head_columns(v, w);
      Tensor out_p, dvp;
      if (out) out_p = head_columns(*out, w);
      attention_backward(q, k, vp, head_columns(dout, w), scale, window, doc_ids, dq, dk, dvp, sinks, dsinks,
                         out ? &out_p : nullptr, lse);
      dv = head_columns(dvp, v.size(3));
      return;
    }
    Tensor own_out, own_lse;
    if (!out || !lse) {  // the kernels start from the forward's output and log-sum-exp
      own_out = cuda::attention(q, k, v, scale, window.value_or(0), doc_ids, &own_lse, sinks);
      out = &own_out;
      lse = &own_lse;
    }
    return cuda::attention_backward(q, k, v, *out, *lse, dout, scale, window.value_or(0), doc_ids, dq, dk, dv, sinks,
                                    dsinks);
  }
#endif
  cpu::attention_backward(q, k, v, dout, scale, window, doc_ids, dq, dk, dv, sinks, dsinks);
}

Tensor swiglu(const Tensor& gate_up) {
  MF_DISPATCH("swiglu", gate_up, swiglu(gate_up));
}

Tensor swiglu_backward(const Tensor& gate_up, const Tensor& dout, Tensor* act) {
  MF_DISPATCH("swiglu_backward", MF_T(gate_up, dout), swiglu_backward(gate_up, dout, act));
}

Tensor clamped_swiglu(const Tensor& gate_up, float alpha, float limit) {
  MF_DISPATCH("clamped_swiglu", gate_up, clamped_swiglu(gate_up, alpha, limit));
}

Tensor clamped_swiglu_backward(const Tensor& gate_up, const Tensor& dout, float alpha, float limit) {
  MF_DISPATCH("clamped_swiglu_backward", MF_T(gate_up, dout), clamped_swiglu_backward(gate_up, dout, alpha, limit));
}

void add_inplace(Tensor& x, const Tensor& y) {
  MF_DISPATCH("add_inplace", MF_T(x, y), add_inplace(x, y));
}

void add_bias_rows(Tensor& y, const Tensor& bias) {
  MF_DISPATCH("add_bias_rows", MF_T(y, bias), add_bias_rows(y, bias));
}

void bias_grad(const Tensor& dy, Tensor& db) {
  MF_DISPATCH("bias_grad", MF_T(dy, db), bias_grad(dy, db));
}

void clamp_inplace(Tensor& x, float c) {
  MF_DISPATCH("clamp_inplace", x, clamp_inplace(x, c));
}

void clamp_backward_inplace(const Tensor& unclipped, Tensor& dy, float c) {
  MF_DISPATCH("clamp_backward_inplace", MF_T(unclipped, dy), clamp_backward_inplace(unclipped, dy, c));
}

void add_sigmoid_gated(Tensor& out, const Tensor& y, const Tensor& logit) {
  MF_DISPATCH("add_sigmoid_gated", MF_T(out, y, logit), add_sigmoid_gated(out, y, logit));
}

void sigmoid_gated_backward(const Tensor& dy, const Tensor& y, const Tensor& logit, Tensor& d_y, Tensor& d_logit) {
  MF_DISPATCH("sigmoid_gated_backward", MF_T(dy, y, logit), sigmoid_gated_backward(dy, y, logit, d_y, d_logit));
}

void copy_columns(const Tensor& src, int64_t src_width, int64_t src_c0, int64_t src_row_div, Tensor& dst,
                  int64_t dst_width, int64_t dst_c0, int64_t n, bool add) {
  MF_DISPATCH("copy_columns", MF_T(src, dst),
              copy_columns(src, src_width, src_c0, src_row_div, dst, dst_width, dst_c0, n, add));
}

Tensor sum_row_groups(const Tensor& src, int64_t src_width, int64_t src_c0, int64_t n, int64_t group) {
  MF_DISPATCH("sum_row_groups", src, sum_row_groups(src, src_width, src_c0, n, group));
}

Tensor deinterleave_pairs(const Tensor& x, int64_t d) {
  MF_DISPATCH("deinterleave_pairs", x, deinterleave_pairs(x, d));
}

Tensor interleave_pairs(const Tensor& x, int64_t d) {
  MF_DISPATCH("interleave_pairs", x, interleave_pairs(x, d));
}

void router_softmax_topk(const Tensor& logits, int64_t k, bool normalize, Tensor& probs, Tensor& weights,
                         Tensor& indices, const Tensor* forced) {
  MF_DISPATCH("router_softmax_topk", MF_T(logits, forced ? *forced : Tensor()),
              router_softmax_topk(logits, k, normalize, probs, weights, indices, forced));
}

Tensor router_backward(const Tensor& probs, const Tensor& indices, const Tensor& weights, const Tensor& d_weights,
                       bool normalize, const Tensor* dprobs_extra, DType dtype) {
  MF_ON_CUDA("router_backward", MF_T(probs, indices, weights, d_weights, dprobs_extra ? *dprobs_extra : Tensor()),
             cuda::router_backward(probs, indices, weights, d_weights, normalize, dtype, dprobs_extra));
  Tensor d = cpu::router_backward(probs, indices, weights, d_weights, normalize, dprobs_extra);
  return dtype == DType::F32 ? d : d.to(dtype);
}

void grouped_sigmoid_route(const Tensor& logits, const Tensor& bias, int64_t n_group, int64_t topk_group, int64_t k,
                           bool normalize, float scaling, Tensor& scores, Tensor& weights, Tensor& indices,
                           const Tensor* forced) {
  MF_DISPATCH("grouped_sigmoid_route", MF_T(logits, bias, forced ? *forced : Tensor()),
              grouped_sigmoid_route(logits, bias, n_group, topk_group, k, normalize, scaling, scores, weights, indices, forced));
}

Tensor grouped_sigmoid_route_backward(const Tensor& scores, const Tensor& indices, const Tensor& d_weights,
                                      bool normalize, float scaling, DType dtype) {
  MF_ON_CUDA("grouped_sigmoid_route_backward", MF_T(scores, indices, d_weights),
             cuda::grouped_sigmoid_route_backward(scores, indices, d_weights, normalize, scaling, dtype));
  Tensor d = cpu::grouped_sigmoid_route_backward(scores, indices, d_weights, normalize, scaling);
  return dtype == DType::F32 ? d : d.to(dtype);
}

void grouped_linear(const Tensor& x, const Tensor& w, const std::vector<int64_t>& offsets, Tensor& y) {
  MF_DISPATCH("grouped_linear", MF_T(x, w, y), grouped_linear(x, w, offsets, y));
}

void grouped_linear_input_grad(const Tensor& dy, const Tensor& w, const std::vector<int64_t>& offsets, Tensor& dx) {
  MF_DISPATCH("grouped_linear_input_grad", MF_T(dy, w, dx), grouped_linear_input_grad(dy, w, offsets, dx));
}

void grouped_linear_weight_grad(const Tensor& dy, const Tensor& x, const std::vector<int64_t>& offsets, Tensor& dw,
                                bool accumulate, Tensor* written_experts, Tensor* squares) {
  MF_CHECK(!squares || !accumulate, "grouped_linear_weight_grad: partial squares only of a gradient written, not accumulated");
  if (squares) *squares = Tensor();
  if (written_experts)
    MF_CHECK(!accumulate && written_experts->dtype() == DType::U8 && dw.dim() == 3 &&
                 written_experts->numel() == dw.size(0) && written_experts->device() == dw.device(),
             "grouped_linear_weight_grad: the written-experts flags must be U8 [E] beside dW, and only when it is "
             "written, not accumulated");
  MF_DISPATCH("grouped_linear_weight_grad", MF_T(dy, x, dw),
              grouped_linear_weight_grad(dy, x, offsets, dw, accumulate, written_experts, squares));
}

void grouped_add_bias(Tensor& y, const Tensor& bias, const std::vector<int64_t>& offsets) {
  MF_DISPATCH("grouped_add_bias", MF_T(y, bias), grouped_add_bias(y, bias, offsets));
}

void grouped_bias_grad(const Tensor& dy, const std::vector<int64_t>& offsets, Tensor& db) {
  MF_DISPATCH("grouped_bias_grad", MF_T(dy, db), grouped_bias_grad(dy, offsets, db));
}

RoutingPlan plan_routing(const Tensor& expert_indices, int64_t num_experts) {
  MF_DISPATCH("plan_routing", expert_indices, plan_routing(expert_indices, num_experts));
}

RoutingPlan plan_routing_started(const Tensor& expert_indices, int64_t num_experts) {
  MF_ON_CUDA("plan_routing", expert_indices, cuda::plan_routing_started(expert_indices, num_experts));
  return cpu::plan_routing(expert_indices, num_experts);  // complete: nothing to overlap on the CPU
}

void finish_plan(RoutingPlan& plan) { plan.finish(); }

Tensor permute_tokens(const Tensor& x, const RoutingPlan& plan) {
  MF_DISPATCH("permute_tokens", MF_T(x, plan.dest_row), permute_tokens(x, plan));
}

Tensor unpermute_tokens(const Tensor& yp, const Tensor& weights, const RoutingPlan& plan) {
  MF_DISPATCH("unpermute_tokens", MF_T(yp, weights, plan.dest_row), unpermute_tokens(yp, weights, plan));
}

void unpermute_tokens_backward(const Tensor& dy, const Tensor& yp, const Tensor& weights, const RoutingPlan& plan,
                               Tensor& d_yp, Tensor& d_weights) {
  MF_DISPATCH("unpermute_tokens_backward", MF_T(dy, yp, weights, plan.dest_row),
              unpermute_tokens_backward(dy, yp, weights, plan, d_yp, d_weights));
}

Tensor permute_tokens_backward(const Tensor& d_xp, const RoutingPlan& plan) {
  MF_DISPATCH("permute_tokens_backward", MF_T(d_xp, plan.dest_row), permute_tokens_backward(d_xp, plan));
}

Tensor gather_rows(const Tensor& in, const Tensor& index) {
  MF_DISPATCH("gather_rows", MF_T(in, index), gather_rows(in, index));
}

Tensor relu2(const Tensor& x) { MF_DISPATCH("relu2", x, relu2(x)); }

Tensor relu2_backward(const Tensor& x, const Tensor& dy) {
  MF_DISPATCH("relu2_backward", MF_T(x, dy), relu2_backward(x, dy));
}

Tensor causal_conv1d(const Tensor& x, const Tensor& w, const Tensor* bias, int64_t batch, const Tensor* doc_ids,
                     bool silu) {
  MF_DISPATCH("causal_conv1d", MF_T(x, w, bias ? *bias : Tensor(), doc_ids ? *doc_ids : Tensor()),
              causal_conv1d(x, w, bias, batch, doc_ids, silu));
}

void causal_conv1d_backward(const Tensor& x, const Tensor& w, const Tensor* bias, int64_t batch, const Tensor* doc_ids,
                            bool silu, const Tensor& dy, Tensor& dx, Tensor& dw, Tensor* dbias) {
  MF_DISPATCH("causal_conv1d_backward", MF_T(x, w, dy, dw, doc_ids ? *doc_ids : Tensor()),
              causal_conv1d_backward(x, w, bias, batch, doc_ids, silu, dy, dx, dw, dbias));
}

Tensor ssm_scan(const Tensor& x, const Tensor& dt_raw, const Tensor& dt_bias, const Tensor& a_log, const Tensor& b,
                const Tensor& c, const Tensor& d, float dt_min, int64_t batch, const Tensor* doc_ids) {
  MF_DISPATCH("ssm_scan", MF_T(x, dt_raw, dt_bias, a_log, b, c, d, doc_ids ? *doc_ids : Tensor()),
              ssm_scan(x, dt_raw, dt_bias, a_log, b, c, d, dt_min, batch, doc_ids));
}

Tensor ssm_step(const Tensor& x, const Tensor& dt_raw, const Tensor& dt_bias, const Tensor& a_log, const Tensor& b,
                const Tensor& c, const Tensor& d, float dt_min, Tensor& state) {
  MF_DISPATCH("ssm_step", MF_T(x, dt_raw, dt_bias, a_log, b, c, d, state),
              ssm_step(x, dt_raw, dt_bias, a_log, b, c, d, dt_min, state));
}

void ssm_scan_backward(const Tensor& x, const Tensor& dt_raw, const Tensor& dt_bias, const Tensor& a_log,
                       const Tensor& b, const Tensor& c, const Tensor& d, float dt_min, int64_t batch,
                       const Tensor* doc_ids, const Tensor& dy, SsmScanGrads& grads) {
  MF_DISPATCH("ssm_scan_backward", MF_T(x, dt_raw, dt_bias, a_log, b, c, d, dy, doc_ids ? *doc_ids : Tensor()),
              ssm_scan_backward(x, dt_raw, dt_bias, a_log, b, c, d, dt_min, batch, doc_ids, dy, grads));
}

Tensor gated_rms_norm(const Tensor& y, const Tensor& z, const Tensor& w, int64_t groups, float eps) {
  MF_DISPATCH("gated_rms_norm", MF_T(y, z, w), gated_rms_norm(y, z, w, groups, eps));
}

void gated_rms_norm_backward(const Tensor& y, const Tensor& z, const Tensor& w, int64_t groups, float eps,
                             const Tensor& dout, Tensor& dy, Tensor& dz, Tensor& dw) {
  MF_DISPATCH("gated_rms_norm_backward", MF_T(y, z, w, dout, dw),
              gated_rms_norm_backward(y, z, w, groups, eps, dout, dy, dz, dw));
}

Tensor cross_entropy_rows(const Tensor& logits, const Tensor& targets, int64_t ignore_index, int64_t* counted) {
  MF_DISPATCH("cross_entropy_rows", MF_T(logits, targets), cross_entropy_rows(logits, targets, ignore_index, counted));
}

double cross_entropy_backward(const Tensor& logits, const Tensor& targets, int64_t ignore_index, float scale,
                              Tensor& dlogits, int64_t* counted) {
  MF_DISPATCH("cross_entropy_backward", MF_T(logits, targets),
              cross_entropy_backward(logits, targets, ignore_index, scale, dlogits, counted));
}

int64_t cross_entropy_chunk_rows(int64_t tokens, int64_t vocab, int64_t element_bytes, int64_t budget_bytes) {
  MF_CHECK(tokens >= 0 && vocab > 0 && element_bytes > 0 && budget_bytes > 0,
           "cross_entropy_chunk_rows: bad shape or budget");
  if (tokens == 0) return 1;
  const int64_t row_bytes = vocab * element_bytes;
  const int64_t rows_in_budget = std::max<int64_t>(1, budget_bytes / row_bytes);
  if (tokens <= rows_in_budget) return tokens;
  const int64_t chunks = (tokens + rows_in_budget - 1) / rows_in_budget;
  const int64_t rows = (tokens + chunks - 1) / chunks;
  return std::min(tokens, (rows + 63) / 64 * 64);
}

double fused_linear_cross_entropy(const Tensor& hidden, const Tensor& weight, const Tensor& targets,
                                  int64_t ignore_index, float scale, Tensor& d_hidden, Tensor* dw, int64_t* counted,
                                  int64_t chunk_rows, bool accumulate_dw) {
  if (chunk_rows == 0 && hidden.dim() == 2 && weight.dim() == 2)
    chunk_rows = cross_entropy_chunk_rows(hidden.shape()[0], weight.shape()[0], static_cast<int64_t>(dtype_size(hidden.dtype())));
  MF_DISPATCH("fused_linear_cross_entropy", MF_T(hidden, weight, targets, dw ? *dw : Tensor()),
              fused_linear_cross_entropy(hidden, weight, targets, ignore_index, scale, d_hidden, dw, counted, chunk_rows,
                                         accumulate_dw));
}

namespace {
// Whether a list of tensors lives on the device (all where the first is; an empty list: the host).
bool list_on_device(const char* op, const std::vector<Tensor>& ts) {
  for (const Tensor& t : ts) same_device(op, ts.front(), t);
  return !ts.empty() && on_device(ts.front());
}
}  // namespace

void adamw_multi_tensor(const std::vector<AdamWTensors>& tensors, const AdamWScalars& scalars) {
  [[maybe_unused]] bool dev = false;
  for (const AdamWTensors& t : tensors) {
    dev = same_device("adamw", tensors.front().param, t.param, t.grad, t.exp_avg, t.exp_avg_sq, t.param_bf16_copy);
    check_row_flags("adamw", t.grad, t.grad_written_rows);
    if (t.zero_moment_rows.defined()) {
      MF_CHECK(t.grad_written_rows.defined() && t.zero_moment_rows.numel() == t.grad_written_rows.numel(),
               "adamw: zero-moment row flags need the gradient's written-row flags, one per row");
      check_row_flags("adamw", t.grad, t.zero_moment_rows);
    }
  }
#ifdef MOEFORGE_HAVE_CUDA
  if (dev) return cuda::adamw_multi_tensor(tensors, scalars);
#endif
  cpu::adamw_multi_tensor(tensors, scalars);
}

double global_grad_norm(const std::vector<Tensor>& grads, const std::vector<Tensor>& written_rows,
                        const std::vector<Tensor>& partial_squares) {
  std::vector<Tensor> every = grads;
  every.insert(every.end(), partial_squares.begin(), partial_squares.end());
  [[maybe_unused]] const bool dev = list_on_device("global_grad_norm", every);
  MF_CHECK(written_rows.empty() || written_rows.size() == grads.size(), "global_grad_norm: ", written_rows.size(),
           " row-flag entries for ", grads.size(), " gradients");
  for (size_t i = 0; i < written_rows.size(); ++i) check_row_flags("global_grad_norm", grads[i], written_rows[i]);
  for (const Tensor& s : partial_squares)
    MF_CHECK(s.dtype() == DType::F32, "global_grad_norm: partial squares must be F32, got ", dtype_name(s.dtype()));
#ifdef MOEFORGE_HAVE_CUDA
  if (dev) return cuda::global_grad_norm(grads, written_rows, partial_squares);
#endif
  return cpu::global_grad_norm(grads, written_rows, partial_squares);
}

void scale_inplace(const std::vector<Tensor>& tensors, float factor) {
  [[maybe_unused]] const bool dev = list_on_device("scale_inplace", tensors);
#ifdef MOEFORGE_HAVE_CUDA
  if (dev) return cuda::scale_inplace(tensors, factor);
#endif
  cpu::scale_inplace(tensors, factor);
}

void zero_off_diagonal_blocks(Tensor& b, int64_t parts) {
  MF_CHECK(b.dim() == 3 && parts > 0 && b.size(1) % parts == 0 && b.size(2) % parts == 0,
           "zero_off_diagonal_blocks: b [E, parts*N, parts*R] ", shape_str(b.shape()), " for ", parts, " parts");
  MF_DISPATCH("zero_off_diagonal_blocks", b, zero_off_diagonal_blocks(b, parts));
}

Tensor dropout_scaled(const Tensor& x, float p, uint64_t seed) {
  MF_CHECK(p >= 0.f && p < 1.f, "dropout_scaled: p must be in [0, 1), got ", p);
  MF_DISPATCH("dropout_scaled", x, dropout_scaled(x, p, seed));
}

}  // namespace moeforge::ops
