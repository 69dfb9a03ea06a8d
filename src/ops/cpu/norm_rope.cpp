// RMSNorm and rotary position embedding.
#include <cmath>
#include <vector>

#include "core/error.h"
#include "ops/cpu/cpu_ops.h"

namespace moeforge::ops::cpu {

Tensor rms_norm(const Tensor& x, const Tensor& weight, float eps, Tensor* rstd) {
  const int64_t d = x.size(-1);
  MF_CHECK(weight.numel() == d, "rms_norm: weight has ", weight.numel(), " elements for rows of ", d);
  Tensor wf = weight.dtype() == DType::F32 ? weight : weight.to(DType::F32);
  Tensor out = Tensor::empty(x.shape(), DType::F32);
  const float* xp = x.f32();
  const float* w = wf.f32();
  float* o = out.f32();
  const int64_t rows = d ? x.numel() / d : 0;
  if (rstd) *rstd = Tensor::empty({rows}, DType::F32);
  float* rs = rstd ? rstd->f32() : nullptr;
#pragma omp parallel for if (rows > 64)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xp + r * d;
    double ss = 0;
    for (int64_t i = 0; i < d; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    const float inv = 1.0f / std::sqrt(static_cast<float>(ss / d) + eps);
    for (int64_t i = 0; i < d; ++i) o[r * d + i] = w[i] * (xr[i] * inv);
    if (rs) rs[r] = inv;
  }
  return out;
}

Tensor add_rms_norm(const Tensor& x, const Tensor& residual, const Tensor& weight, float eps, Tensor& sum, Tensor* rstd) {
  MF_CHECK(residual.shape() == x.shape(), "add_rms_norm: residual ", shape_str(residual.shape()), " must match x ",
           shape_str(x.shape()));
  sum = residual.clone();
  add_inplace(sum, x);
  return rms_norm(sum, weight, eps, rstd);
}

void rope_inplace(Tensor& x, const Tensor& cos, const Tensor& sin, bool inverse) {
  MF_CHECK(x.dim() == 3, "rope: expected [T, H, D], got ", shape_str(x.shape()));
  const int64_t t = x.size(0), h = x.size(1), d = x.size(2), rot = cos.size(-1);
  MF_CHECK(cos.size(0) == t && sin.shape() == cos.shape() && rot <= d && rot % 2 == 0, "rope: cos/sin ",
           shape_str(cos.shape()), " do not fit x ", shape_str(x.shape()));
  float* xp = x.f32();
  const float* c = cos.f32();
  const float* s = sin.f32();
  const int64_t half = rot / 2;
  const float sign = inverse ? -1.f : 1.f;
#pragma omp parallel for if (t * h > 256)
  for (int64_t i = 0; i < t * h; ++i) {
    float* v = xp + i * d;
    const float* ci = c + (i / h) * rot;
    const float* si = s + (i / h) * rot;
    for (int64_t j = 0; j < half; ++j) {
      const float a = v[j], b = v[j + half];
      v[j] = a * ci[j] - sign * b * si[j];
      v[j + half] = b * ci[j + half] + sign * a * si[j + half];
    }
  }
}

Tensor rms_norm_backward(const Tensor& x, const Tensor& weight, float eps, const Tensor& dy, Tensor& dw) {
  const int64_t d = x.size(-1), rows = d ? x.numel() / d : 0;
  Tensor wf = weight.dtype() == DType::F32 ? weight : weight.to(DType::F32);
  Tensor dx = Tensor::empty(x.shape(), DType::F32);
  const float* xp = x.f32();
  const float* w = wf.f32();
  const float* g = dy.f32();
  float* o = dx.f32();
  std::vector<double> dw_acc(static_cast<size_t>(d), 0.0);
#pragma omp parallel
  {
    std::vector<double> local(static_cast<size_t>(d), 0.0);
#pragma omp for
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = xp + r * d;
      const float* gr = g + r * d;
      double ss = 0, dot = 0;
      for (int64_t i = 0; i < d; ++i) ss += static_cast<double>(xr[i]) * xr[i];
      const double inv = 1.0 / std::sqrt(static_cast<double>(static_cast<float>(ss / d) + eps));
      for (int64_t i = 0; i < d; ++i) {
        dot += static_cast<double>(w[i]) * gr[i] * xr[i];
        local[i] += static_cast<double>(gr[i]) * xr[i] * inv;
      }
      const double c = inv * inv * inv * dot / d;
      for (int64_t i = 0; i < d; ++i) o[r * d + i] = static_cast<float>(inv * w[i] * gr[i] - c * xr[i]);
    }
#pragma omp critical
    for (int64_t i = 0; i < d; ++i) dw_acc[i] += local[i];
  }
  float* dwp = dw.f32();
  for (int64_t i = 0; i < d; ++i) dwp[i] += static_cast<float>(dw_acc[i]);
  return dx;
}

}  // namespace moeforge::ops::cpu
