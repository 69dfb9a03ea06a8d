#include "nn/rotary.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace moeforge::nn {

namespace {
double yarn_mscale(double scale, double mscale) { return scale <= 1.0 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0; }
}  // namespace

std::vector<double> RotaryEmbedding::compute_inv_freq(double base) const {
  std::vector<double> f(static_cast<size_t>(dim_ / 2));
  for (int64_t i = 0; i < dim_ / 2; ++i) {
    // Transformers computes base ** (arange(0, dim, 2) / dim) in float32; round the same way.
    const float expo = static_cast<float>(2 * i) / static_cast<float>(dim_);
    f[i] = 1.0 / static_cast<double>(std::pow(static_cast<float>(base), expo));
  }
  return f;
}

RotaryEmbedding::RotaryEmbedding(const hf::RopeConfig& rope, int64_t head_dim, int64_t max_pos)
    : rope_(rope), max_pos_(max_pos) {
  dim_ = static_cast<int64_t>(static_cast<double>(head_dim) * rope.partial_rotary_factor);
  MF_CHECK(dim_ > 0 && dim_ % 2 == 0 && dim_ <= head_dim, "rotary dimension ", dim_, " (head_dim ", head_dim,
           " x partial_rotary_factor ", rope.partial_rotary_factor, ") must be even and at most head_dim");
  inv_freq_ = compute_inv_freq(rope.theta);
  const std::string& t = rope.type;
  if (t == "linear") {
    for (auto& f : inv_freq_) f /= rope.factor;
  } else if (t == "yarn") {
    // As Transformers 5: the explicit factor is used (it only warns when it differs from
    // max_position_embeddings / original_max_position_embeddings); the original context defaults to
    // max_position_embeddings.
    const double factor = rope.factor;
    const int64_t orig = rope.original_max_position_embeddings.value_or(max_pos);
    if (rope.attention_factor) {
      attention_scaling_ = static_cast<float>(*rope.attention_factor);
    } else if (rope.mscale && rope.mscale_all_dim && *rope.mscale != 0 && *rope.mscale_all_dim != 0) {
      attention_scaling_ = static_cast<float>(yarn_mscale(factor, *rope.mscale) / yarn_mscale(factor, *rope.mscale_all_dim));
    } else {
      attention_scaling_ = static_cast<float>(yarn_mscale(factor, 1.0));
    }
    const double beta_fast = rope.beta_fast.value_or(32.0), beta_slow = rope.beta_slow.value_or(1.0);
    const double base = rope.theta, d = static_cast<double>(dim_);
    auto correction_dim = [&](double rotations) {
      return d * std::log(static_cast<double>(orig) / (rotations * 2 * M_PI)) / (2 * std::log(base));
    };
    double low = correction_dim(beta_fast), high = correction_dim(beta_slow);
    if (rope.truncate) {
      low = std::floor(low);
      high = std::ceil(high);
    }
    low = std::max(low, 0.0);
    high = std::min(high, d - 1);
    if (low == high) high += 0.001;
    for (int64_t i = 0; i < dim_ / 2; ++i) {
      const double extrapolation = inv_freq_[i];
      const double interpolation = inv_freq_[i] / factor;
      const double ramp = std::clamp((static_cast<double>(i) - low) / (high - low), 0.0, 1.0);
      const double extra_weight = 1.0 - ramp;
      inv_freq_[i] = interpolation * (1 - extra_weight) + extrapolation * extra_weight;
    }
  } else if (t == "llama3") {
    const double factor = rope.factor, lo = rope.low_freq_factor, hi = rope.high_freq_factor;
    const double old_ctx = static_cast<double>(*rope.original_max_position_embeddings);
    const double low_wavelen = old_ctx / lo, high_wavelen = old_ctx / hi;
    for (auto& f : inv_freq_) {
      const double wavelen = 2 * M_PI / f;
      if (wavelen > low_wavelen) {
        f = f / factor;
      } else if (wavelen >= high_wavelen) {
        const double smooth = (old_ctx / wavelen - lo) / (hi - lo);
        f = (1 - smooth) * f / factor + smooth * f;
      }
    }
  }
  // "default" and "dynamic" start from the plain frequencies; dynamic rescales per call.
}

void RotaryEmbedding::tables(const Tensor& positions, Tensor& cos, Tensor& sin) const {
  const int64_t n = positions.numel();
  const int64_t* pos = positions.i64();
  std::vector<double> inv = inv_freq_;
  if (rope_.type == "dynamic") {
    // Dynamic NTK: when the sequence outgrows the trained context, raise the base (Transformers'
    // dynamic_rope_update, which looks at the largest position in the batch).
    int64_t seq = 0;
    for (int64_t i = 0; i < n; ++i) seq = std::max(seq, pos[i] + 1);
    const int64_t orig = rope_.original_max_position_embeddings.value_or(max_pos_);
    if (seq > orig) {
      const double d = static_cast<double>(dim_);
      const double base = rope_.theta * std::pow(rope_.factor * seq / orig - (rope_.factor - 1), d / (d - 2));
      inv = compute_inv_freq(base);
    }
  }
  cos = Tensor::empty({n, dim_}, DType::F32);
  sin = Tensor::empty({n, dim_}, DType::F32);
  float* c = cos.f32();
  float* s = sin.f32();
  const int64_t half = dim_ / 2;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < half; ++j) {
      // fp32 product as in Transformers' (inv_freq @ position_ids) in float32.
      const float angle = static_cast<float>(inv[j]) * static_cast<float>(pos[i]);
      const float cv = std::cos(angle) * attention_scaling_, sv = std::sin(angle) * attention_scaling_;
      c[i * dim_ + j] = c[i * dim_ + j + half] = cv;
      s[i * dim_ + j] = s[i * dim_ + j + half] = sv;
    }
}

}  // namespace moeforge::nn
