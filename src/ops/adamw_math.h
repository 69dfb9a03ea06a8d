// AdamW's per-element update, shared by the CPU optimizer and the CUDA kernel so both do exactly
// torch.optim.AdamW's arithmetic in the same order (decoupled decay first, lerp for the first
// moment, eps added after dividing the root by sqrt(bias correction 2)).
#pragma once
#include <cmath>

#include "core/host_device.h"

namespace moeforge::ops {

struct AdamWScalars {
  float one_minus_beta1, beta2, one_minus_beta2;
  float bias_correction2_sqrt, eps, step_size;  // step_size = lr / bias_correction1
  // Gradient clipping's coefficient (torch.nn.utils.clip_grad_norm_), applied by the optimizer to
  // each gradient as it reads it, rounded to the gradient's dtype as the in-place scaling would
  // store it: the same update without a pass that reads and rewrites every gradient. 1: none.
  float grad_scale = 1.f;
};

MF_HOST_DEVICE void adamw_element(float& w, float g, float& m, float& v, float wd_mul, const AdamWScalars& s) {
  w *= wd_mul;
  m += (g - m) * s.one_minus_beta1;  // exp_avg.lerp_(grad, 1 - beta1)
  v = v * s.beta2 + s.one_minus_beta2 * g * g;
  const float denom = sqrtf(v) / s.bias_correction2_sqrt + s.eps;
  w += -s.step_size * (m / denom);
}

}  // namespace moeforge::ops
