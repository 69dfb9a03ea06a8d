// Multi-tensor AdamW, the global gradient norm and scaling on the CPU: the reference for
// ops/cuda/optimizer.cu, element by element the arithmetic of ops/adamw_math.h.
#include <cmath>

#include "core/error.h"
#include "ops/cpu/cpu_ops.h"

namespace moeforge::ops::cpu {

namespace {
// Writes F32 values computed from as_f32(dst) back into dst's own dtype (nothing when they are dst).
void store(const Tensor& f32, const Tensor& dst) {
  if (f32.raw() != dst.raw()) convert_elements(f32.raw(), DType::F32, dst.raw(), dst.dtype(), dst.numel());
}
}  // namespace

void adamw_multi_tensor(const std::vector<AdamWTensors>& tensors, const AdamWScalars& scalars) {
  for (const AdamWTensors& t : tensors) {
    const int64_t n = t.param.numel();
    MF_CHECK(t.grad.numel() == n && t.exp_avg.numel() == n && t.exp_avg_sq.numel() == n,
             "adamw: a parameter of ", n, " values has a gradient or moments of another size");
    Tensor w = as_f32(t.param), g = as_f32(t.grad), m = as_f32(t.exp_avg), v = as_f32(t.exp_avg_sq);
    float* wp = w.f32();
    const float* gp = g.f32();
    float* mp = m.f32();
    float* vp = v.f32();
    // Rows the gradient's sites left unwritten count as zeros (their values are not read; the flags
    // were checked by ops::adamw_multi_tensor).
    const uint8_t* written = t.grad_written_rows.defined() ? t.grad_written_rows.data<uint8_t>() : nullptr;
    const int64_t row = written ? n / t.grad_written_rows.numel() : 1;
    // Clipping's scale, rounded as the gradient's dtype would store the scaled value.
    const float scale = scalars.grad_scale;
    const DType gdt = t.grad.dtype();
    MF_CHECK(scale == 1.f || gdt == DType::F32 || gdt == DType::BF16, "adamw: a clipped gradient must be F32 or BF16");
    const auto read = [&](int64_t i) {
      if (written && !written[i / row]) return 0.f;
      if (scale == 1.f) return gp[i];
      const float g = gp[i] * scale;
      return gdt == DType::BF16 ? bf16_to_f32(f32_to_bf16(g)) : g;
    };
#pragma omp parallel for if (n > 65536)
    for (int64_t i = 0; i < n; ++i) adamw_element(wp[i], read(i), mp[i], vp[i], t.weight_decay_mul, scalars);
    // The reference takes the full update everywhere (the zero-moment flags only say where it
    // changes no moment); a written row may have moments that are no longer zero.
    if (t.zero_moment_rows.defined()) {
      uint8_t* zero = t.zero_moment_rows.data<uint8_t>();
      for (int64_t r = 0; r < t.zero_moment_rows.numel(); ++r)
        if (written[r]) zero[r] = 0;
    }
    store(w, t.param);
    store(m, t.exp_avg);
    store(v, t.exp_avg_sq);
    if (t.param_bf16_copy.defined()) store(w, t.param_bf16_copy);
  }
}

double global_grad_norm(const std::vector<Tensor>& grads, const std::vector<Tensor>& written_rows,
                        const std::vector<Tensor>& partial_squares) {
  double ss = 0;
  for (const Tensor& s : partial_squares)
    for (int64_t i = 0; i < s.numel(); ++i) ss += s.f32()[i];
  for (size_t t = 0; t < grads.size(); ++t) {
    const Tensor f = as_f32(grads[t]);
    const float* p = f.f32();
    const int64_t n = f.numel();
    const bool flagged = t < written_rows.size() && written_rows[t].defined();
    const uint8_t* written = flagged ? written_rows[t].data<uint8_t>() : nullptr;
    const int64_t row = flagged ? n / written_rows[t].numel() : 1;
#pragma omp parallel for reduction(+ : ss) if (n > 65536)
    for (int64_t i = 0; i < n; ++i)
      if (!written || written[i / row]) ss += static_cast<double>(p[i]) * p[i];
  }
  return std::sqrt(ss);
}

void scale_inplace(const std::vector<Tensor>& tensors, float factor) {
  for (const Tensor& t : tensors) {
    Tensor f = as_f32(t);
    float* p = f.f32();
    const int64_t n = f.numel();
#pragma omp parallel for if (n > 65536)
    for (int64_t i = 0; i < n; ++i) p[i] *= factor;
    store(f, t);
  }
}

}  // namespace moeforge::ops::cpu
