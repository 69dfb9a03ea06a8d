// GPT-OSS's expert activation on gate_up [T, 2I] with gate and up interleaved (columns 2j, 2j+1):
//   g = min(gate, limit), u = clamp(up, -limit, limit), out = (u + 1) * g * sigmoid(alpha * g)
// and its backward (torch's clamp passes the gradient on the boundary and stops it beyond).
#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "ops/cpu/cpu_ops.h"

namespace moeforge::ops::cpu {

Tensor clamped_swiglu(const Tensor& gate_up, float alpha, float limit) {
  const int64_t t = gate_up.size(0), inter = gate_up.size(1) / 2;
  MF_CHECK(gate_up.size(1) % 2 == 0, "clamped_swiglu: last dimension must be even, got ", gate_up.size(1));
  Tensor out = Tensor::empty({t, inter}, DType::F32);
  const float* h = gate_up.f32();
  float* o = out.f32();
  for (int64_t r = 0; r < t; ++r)
    for (int64_t j = 0; j < inter; ++j) {
      const float g = std::min(h[r * 2 * inter + 2 * j], limit);
      const float u = std::min(std::max(h[r * 2 * inter + 2 * j + 1], -limit), limit);
      const float glu = g / (1.f + std::exp(-alpha * g));
      o[r * inter + j] = (u + 1.f) * glu;
    }
  return out;
}

Tensor clamped_swiglu_backward(const Tensor& gate_up, const Tensor& dout, float alpha, float limit) {
  const int64_t t = gate_up.size(0), inter = gate_up.size(1) / 2;
  Tensor dgu = Tensor::empty({t, 2 * inter}, DType::F32);
  const float* h = gate_up.f32();
  const float* d = dout.f32();
  float* o = dgu.f32();
  for (int64_t r = 0; r < t; ++r)
    for (int64_t j = 0; j < inter; ++j) {
      const float g_raw = h[r * 2 * inter + 2 * j], u_raw = h[r * 2 * inter + 2 * j + 1];
      const float g = std::min(g_raw, limit), u = std::min(std::max(u_raw, -limit), limit);
      const float sig = 1.f / (1.f + std::exp(-alpha * g));
      const float dy = d[r * inter + j];
      const float dglu = dy * (u + 1.f);
      const float dg = dglu * (sig + alpha * g * sig * (1.f - sig));
      o[r * 2 * inter + 2 * j] = g_raw <= limit ? dg : 0.f;
      o[r * 2 * inter + 2 * j + 1] = (u_raw >= -limit && u_raw <= limit) ? dy * g * sig : 0.f;
    }
  return dgu;
}

}  // namespace moeforge::ops::cpu
