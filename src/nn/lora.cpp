#include "nn/lora.h"

#include "ops/ops.h"

namespace moeforge::nn {

void LoraAdapter::init(ParamStore& ps, const std::string& module, int64_t in, int64_t out, int64_t rank, float scale_) {
  a = ps.add(module + ".lora_A.weight", {rank, in});
  b = ps.add(module + ".lora_B.weight", {out, rank});
  for (size_t i : {a, b}) ps.all()[i].lora = true;
  scale = scale_;
}

void LoraAdapter::forward_add(const ParamAccess& ps, const Tensor& x, Tensor& y) const {
  Tensor h = ops::linear(x, ps.value(a));  // [T, r]
  ops::scale_inplace({h}, scale);
  ops::gemm(h, false, ps.value(b), true, y, /*accumulate=*/true);
}

void LoraAdapter::backward(ParamAccess& ps, const Tensor& x, const Tensor& dy, Tensor& dx) const {
  // h = scale x A^T is recomputed (T x r, cheap) rather than kept.
  Tensor h = ops::linear(x, ps.value(a));
  ops::scale_inplace({h}, scale);
  ops::linear_weight_grad(dy, h, ps.grad(b));          // dB += dy^T h
  Tensor dh = ops::linear_input_grad(dy, ps.value(b));  // dy B [T, r]
  ops::scale_inplace({dh}, scale);
  ops::linear_weight_grad(dh, x, ps.grad(a));           // dA += scale (dy B)^T x
  ops::gemm(dh, false, ps.value(a), false, dx, /*accumulate=*/true);
}

}  // namespace moeforge::nn
