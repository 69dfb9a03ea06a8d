#include "nn/lora.h"

#include "core/fnv.h"
#include "ops/ops.h"

namespace moeforge::nn {

namespace {

thread_local std::optional<uint64_t> step_dropout_seed;

}  // namespace

LoraDropoutScope::LoraDropoutScope(std::optional<uint64_t> seed) : saved_(step_dropout_seed) { step_dropout_seed = seed; }
LoraDropoutScope::~LoraDropoutScope() { step_dropout_seed = saved_; }
std::optional<uint64_t> lora_dropout_seed() { return step_dropout_seed; }

void LoraAdapter::init(ParamStore& ps, const std::string& module, int64_t in, int64_t out, int64_t rank, float scale_,
                       float dropout_) {
  a = ps.add(module + ".lora_A.weight", {rank, in});
  b = ps.add(module + ".lora_B.weight", {out, rank});
  for (size_t i : {a, b}) ps.all()[i].lora = true;
  scale = scale_;
  dropout = dropout_;
  salt = fnv1a(module);  // a stable per-module stream: the same masks on every run and rank
}

Tensor LoraAdapter::dropped(const Tensor& x) const {
  const std::optional<uint64_t> seed = lora_dropout_seed();
  return dropout > 0.f && seed ? ops::dropout_scaled(x, dropout, *seed ^ salt) : x;
}

void LoraAdapter::forward_add(const ParamAccess& ps, const Tensor& x_in, Tensor& y) const {
  const Tensor x = dropped(x_in);
  Tensor h = ops::linear(x, ps.value(a));  // [T, r]
  ops::scale_inplace({h}, scale);
  ops::gemm(h, false, ps.value(b), true, y, /*accumulate=*/true);
}

void LoraAdapter::backward(ParamAccess& ps, const Tensor& x_in, const Tensor& dy, Tensor& dx) const {
  // h = scale x A^T is recomputed (T x r, cheap) rather than kept; so is the dropout mask.
  const Tensor x = dropped(x_in);
  Tensor h = ops::linear(x, ps.value(a));
  ops::scale_inplace({h}, scale);
  ops::linear_weight_grad(dy, h, ps.grad(b));          // dB += dy^T h
  Tensor dh = ops::linear_input_grad(dy, ps.value(b));  // dy B [T, r]
  ops::scale_inplace({dh}, scale);
  ops::linear_weight_grad(dh, x, ps.grad(a));           // dA += scale (dy B)^T x
  if (dropout > 0.f && lora_dropout_seed()) {
    ops::add_inplace(dx, dropped(ops::linear_input_grad(dh, ps.value(a))));  // the mask again, on d(x)
  } else {
    ops::gemm(dh, false, ps.value(a), false, dx, /*accumulate=*/true);
  }
}

namespace {

// out += scale * grouped(grouped(x, A), B), per expert's rows.
void lowrank_forward(const ParamAccess& ps, size_t a, size_t b, float scale, const Tensor& x,
                     const std::vector<int64_t>& off, Tensor& out) {
  const int64_t rows = x.size(0);
  Tensor t = ops::empty({rows, ps.value(a).size(1)}, x.dtype(), x.device(), "expert LoRA inner");
  ops::grouped_linear(x, ps.value(a), off, t);
  ops::scale_inplace({t}, scale);
  Tensor u = ops::empty(out.shape(), out.dtype(), out.device(), "expert LoRA output");
  ops::grouped_linear(t, ps.value(b), off, u);
  ops::add_inplace(out, u);
}

void lowrank_backward(ParamAccess& ps, size_t a, size_t b, float scale, int64_t blocks, const Tensor& x,
                      const std::vector<int64_t>& off, const Tensor& dy, Tensor& dx) {
  const int64_t rows = x.size(0);
  Tensor t = ops::empty({rows, ps.value(a).size(1)}, x.dtype(), x.device(), "expert LoRA inner");
  ops::grouped_linear(x, ps.value(a), off, t);  // recomputed, [rows, R]
  ops::scale_inplace({t}, scale);
  ops::grouped_linear_weight_grad(dy, t, off, ps.grad(b), /*accumulate=*/true);
  if (blocks > 1) ops::zero_off_diagonal_blocks(ps.grad(b), blocks);
  Tensor dt = ops::empty(t.shape(), dy.dtype(), dy.device(), "expert LoRA inner gradient");
  ops::grouped_linear_input_grad(dy, ps.value(b), off, dt);
  ops::scale_inplace({dt}, scale);
  ops::grouped_linear_weight_grad(dt, x, off, ps.grad(a), true);
  Tensor d = ops::empty(dx.shape(), dx.dtype(), dx.device(), "expert LoRA input gradient");
  ops::grouped_linear_input_grad(dt, ps.value(a), off, d);
  ops::add_inplace(dx, d);
}

}  // namespace

void ExpertLora::init(ParamStore& ps, const std::string& gate_up_name, const std::string& down_name, int64_t experts,
                      int64_t width, int64_t inter, int64_t gate_up_rows, int64_t blocks_, int64_t rank, float scale_) {
  blocks = blocks_;
  scale = scale_;
  gate_up_a = ps.add(gate_up_name + ".lora_A.weight", {experts, blocks * rank, width});
  gate_up_b = ps.add(gate_up_name + ".lora_B.weight", {experts, gate_up_rows, blocks * rank});
  down_a = ps.add(down_name + ".lora_A.weight", {experts, rank, inter});
  down_b = ps.add(down_name + ".lora_B.weight", {experts, width, rank});
  for (size_t i : {gate_up_a, gate_up_b, down_a, down_b}) ps.all()[i].lora = true;
}

void ExpertLora::gate_up_forward(const ParamAccess& ps, const Tensor& xs, const std::vector<int64_t>& off,
                                 Tensor& h) const {
  lowrank_forward(ps, gate_up_a, gate_up_b, scale, xs, off, h);
}

void ExpertLora::down_forward(const ParamAccess& ps, const Tensor& act, const std::vector<int64_t>& off,
                              Tensor& y) const {
  lowrank_forward(ps, down_a, down_b, scale, act, off, y);
}

void ExpertLora::gate_up_backward(ParamAccess& ps, const Tensor& xs, const std::vector<int64_t>& off,
                                  const Tensor& d_h, Tensor& d_xs) const {
  lowrank_backward(ps, gate_up_a, gate_up_b, scale, blocks, xs, off, d_h, d_xs);
}

void ExpertLora::down_backward(ParamAccess& ps, const Tensor& act, const std::vector<int64_t>& off, const Tensor& d_y,
                               Tensor& d_act) const {
  lowrank_backward(ps, down_a, down_b, scale, 1, act, off, d_y, d_act);
}

}  // namespace moeforge::nn
