// Bias rows, their gradient, the clip_qkv clamp and the sigmoid gate of a shared expert: the small
// pieces the attention and MLP variants of the model families add around their GEMMs.
#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "ops/cpu/cpu_ops.h"

namespace moeforge::ops::cpu {

void add_bias_rows(Tensor& y, const Tensor& bias) {
  const int64_t n = bias.numel(), rows = y.numel() / std::max<int64_t>(n, 1);
  MF_CHECK(y.numel() == rows * n, "add_bias_rows: ", y.numel(), " values are not rows of ", n);
  const Tensor b = bias.dtype() == DType::F32 ? bias : bias.to(DType::F32);
  float* yp = y.f32();
  const float* bp = b.f32();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < n; ++i) yp[r * n + i] += bp[i];
}

void bias_grad(const Tensor& dy, Tensor& db) {
  const int64_t n = db.numel(), rows = dy.numel() / std::max<int64_t>(n, 1);
  MF_CHECK(dy.numel() == rows * n, "bias_grad: ", dy.numel(), " values are not rows of ", n);
  std::vector<double> sum(static_cast<size_t>(n), 0.0);
  const float* d = dy.f32();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < n; ++i) sum[i] += d[r * n + i];
  for (int64_t i = 0; i < n; ++i) db.f32()[i] += static_cast<float>(sum[i]);
}

void clamp_inplace(Tensor& x, float c) {
  float* p = x.f32();
  for (int64_t i = 0; i < x.numel(); ++i) p[i] = std::min(std::max(p[i], -c), c);
}

void clamp_backward_inplace(const Tensor& unclipped, Tensor& dy, float c) {
  MF_CHECK(unclipped.numel() == dy.numel(), "clamp_backward: sizes differ");
  const float* u = unclipped.f32();
  float* p = dy.f32();
  for (int64_t i = 0; i < dy.numel(); ++i)
    if (u[i] < -c || u[i] > c) p[i] = 0.f;
}

void add_sigmoid_gated(Tensor& out, const Tensor& y, const Tensor& logit) {
  const int64_t t = logit.numel(), h = y.numel() / std::max<int64_t>(t, 1);
  MF_CHECK(out.numel() == y.numel() && y.numel() == t * h, "add_sigmoid_gated: shapes differ");
  for (int64_t r = 0; r < t; ++r) {
    const float g = 1.f / (1.f + std::exp(-logit.f32()[r]));
    for (int64_t i = 0; i < h; ++i) out.f32()[r * h + i] += g * y.f32()[r * h + i];
  }
}

void sigmoid_gated_backward(const Tensor& dy, const Tensor& y, const Tensor& logit, Tensor& d_y, Tensor& d_logit) {
  const int64_t t = logit.numel(), h = y.numel() / std::max<int64_t>(t, 1);
  d_y = Tensor::empty(y.shape(), DType::F32);
  d_logit = Tensor::empty(logit.shape(), DType::F32);
  for (int64_t r = 0; r < t; ++r) {
    const float g = 1.f / (1.f + std::exp(-logit.f32()[r]));
    double dot = 0;
    for (int64_t i = 0; i < h; ++i) {
      d_y.f32()[r * h + i] = g * dy.f32()[r * h + i];
      dot += static_cast<double>(dy.f32()[r * h + i]) * y.f32()[r * h + i];
    }
    d_logit.f32()[r] = static_cast<float>(dot) * g * (1.f - g);  // sigmoid' = g (1 - g)
  }
}

}  // namespace moeforge::ops::cpu
