// Backward passes of the CPU reference ops (the norm and rotation backwards sit beside their
// forwards in norm_rope.cpp).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "core/error.h"
#include "ops/cpu/attention_row.h"
#include "ops/cpu/cpu_ops.h"

namespace moeforge::ops::cpu {


void linear_weight_grad(const Tensor& dy, const Tensor& x, Tensor& dw, bool accumulate) {
  const int64_t n = dy.size(-1), k = x.size(-1), m = dy.numel() / std::max<int64_t>(n, 1);
  MF_CHECK(x.numel() == m * k && dw.numel() == n * k, "linear_weight_grad: dy ", shape_str(dy.shape()), " x ",
           shape_str(x.shape()), " -> dw ", shape_str(dw.shape()));
  if (m == 0) {  // no rows: nothing to add, or a zero sum to write
    if (!accumulate) std::fill(dw.f32(), dw.f32() + dw.numel(), 0.f);
    return;
  }
  gemm_f32(true, false, n, k, m, 1.f, dy.f32(), n, x.f32(), k, accumulate ? 1.f : 0.f, dw.f32(), k);
}

Tensor linear_input_grad(const Tensor& dy, const Tensor& weight) {
  const int64_t n = weight.size(0), k = weight.size(1), m = dy.numel() / std::max<int64_t>(n, 1);
  Shape shape = dy.shape();
  shape.back() = k;
  Tensor dx = Tensor::empty(shape, DType::F32);
  Tensor wf = weight.dtype() == DType::F32 ? weight : weight.to(DType::F32);
  gemm_f32(false, false, m, k, n, 1.f, dy.f32(), n, wf.f32(), k, 0.f, dx.f32(), k);
  return dx;
}

void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout, float scale,
                        std::optional<int64_t> window, const Tensor* doc_ids, Tensor& dq, Tensor& dk, Tensor& dv,
                        const Tensor* sinks, Tensor* dsinks) {
  const int64_t b = q.size(0), s = q.size(1), hq = q.size(2), d = q.size(3), hkv = k.size(2), group = hq / hkv,
                vd = v.size(3);
  MF_CHECK(k.size(1) == s && v.size(1) == s, "attention backward: keys and queries must be as many (got ", k.size(1),
           " and ", s, ")");
  dq = Tensor::zeros(q.shape(), DType::F32);
  dk = Tensor::zeros(k.shape(), DType::F32);
  dv = Tensor::zeros(v.shape(), DType::F32);
  const Tensor sinks32 = sinks ? sinks->to(DType::F32) : Tensor();
  // d(sink_h) = -sum over rows of p_sink * sum_j p_j dp_j, per (batch, kv head) task then summed.
  std::vector<double> dsink(static_cast<size_t>(b * hq), 0.0);
  const float *qp = q.f32(), *kp = k.f32(), *vp = v.f32(), *gp = dout.f32();
  float *dqp = dq.f32(), *dkp = dk.f32(), *dvp = dv.f32();
  const int64_t* docs = doc_ids ? doc_ids->i64() : nullptr;
  // One task per (batch, kv head): every write to dk/dv of that head stays in the task.
#pragma omp parallel
  {
    std::vector<float> p(static_cast<size_t>(s)), dp(static_cast<size_t>(s));
#pragma omp for collapse(2) schedule(static)
    for (int64_t bi = 0; bi < b; ++bi)
      for (int64_t kh = 0; kh < hkv; ++kh)
        for (int64_t h = kh * group; h < (kh + 1) * group; ++h)
          for (int64_t i = 0; i < s; ++i) {
            const float* qi = qp + ((bi * s + i) * hq + h) * d;
            const float* gi = gp + ((bi * s + i) * hq + h) * vd;
            float p_sink = 0.f;
            attention_row_probs(qi, kp + (bi * s * hkv + kh) * d, hkv * d, d, i, scale, window,
                                docs ? docs + bi * s : nullptr, p.data(),
                                sinks ? sinks32.f32()[h] : -std::numeric_limits<float>::infinity(), &p_sink);
            double dsum = 0;
            for (int64_t j = 0; j <= i; ++j) {
              if (p[j] == 0.f) {
                dp[j] = 0.f;
                continue;
              }
              const float* vj = vp + ((bi * s + j) * hkv + kh) * vd;
              float* dvj = dvp + ((bi * s + j) * hkv + kh) * vd;
              float dot = 0.f;
              for (int64_t x = 0; x < vd; ++x) {
                dot += gi[x] * vj[x];
                dvj[x] += p[j] * gi[x];
              }
              dp[j] = dot;
              dsum += static_cast<double>(p[j]) * dot;
            }
            dsink[bi * hq + h] -= static_cast<double>(p_sink) * dsum;
            float* dqi = dqp + ((bi * s + i) * hq + h) * d;
            for (int64_t j = 0; j <= i; ++j) {
              if (p[j] == 0.f) continue;
              const float ds = p[j] * (dp[j] - static_cast<float>(dsum)) * scale;
              const float* kj = kp + ((bi * s + j) * hkv + kh) * d;
              float* dkj = dkp + ((bi * s + j) * hkv + kh) * d;
              for (int64_t x = 0; x < d; ++x) {
                dqi[x] += ds * kj[x];
                dkj[x] += ds * qi[x];
              }
            }
          }
  }
  if (dsinks) {
    *dsinks = Tensor::zeros({hq}, DType::F32);
    for (int64_t i = 0; i < b * hq; ++i) dsinks->f32()[i % hq] += static_cast<float>(dsink[i]);
  }
}

Tensor swiglu_backward(const Tensor& gate_up, const Tensor& dout, Tensor* act) {
  const int64_t t = gate_up.size(0), two_i = gate_up.size(1), inter = two_i / 2;
  Tensor dgu = Tensor::empty({t, two_i}, DType::F32);
  if (act) *act = swiglu(gate_up);  // the forward's own arithmetic (F32 on the CPU: no pass to save)
  const float* g = gate_up.f32();
  const float* d = dout.f32();
  float* o = dgu.f32();
#pragma omp parallel for if (t * inter > 65536)
  for (int64_t r = 0; r < t; ++r)
    for (int64_t i = 0; i < inter; ++i) {
      const float a = g[r * two_i + i], u = g[r * two_i + inter + i], dy = d[r * inter + i];
      const float sig = 1.f / (1.f + std::exp(-a));
      const float silu = a * sig;
      o[r * two_i + i] = dy * u * sig * (1.f + a * (1.f - sig));
      o[r * two_i + inter + i] = dy * silu;
    }
  return dgu;
}

void embedding_backward(const Tensor& ids, const Tensor& dx, Tensor& table_grad, int64_t padding_idx,
                        Tensor* written_rows) {
  const int64_t n = ids.numel(), d = table_grad.size(1);
  const int64_t* id = ids.i64();
  float* g = table_grad.f32();
  const float* x = dx.f32();
  if (written_rows) {  // the rows about to be added to start from zero; only they are flagged
    uint8_t* flag = written_rows->data<uint8_t>();
    std::fill(flag, flag + written_rows->numel(), uint8_t{0});
    for (int64_t i = 0; i < n; ++i) {
      if (id[i] == padding_idx || flag[id[i]]) continue;
      flag[id[i]] = 1;
      std::fill(g + id[i] * d, g + (id[i] + 1) * d, 0.f);
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    if (id[i] == padding_idx) continue;
    for (int64_t j = 0; j < d; ++j) g[id[i] * d + j] += x[i * d + j];
  }
}

void zero_unwritten_rows(Tensor& t, const Tensor& written) {
  const int64_t rows = written.numel(), per = t.numel() / rows, esize = static_cast<int64_t>(dtype_size(t.dtype()));
  const uint8_t* flag = written.data<uint8_t>();
  char* base = static_cast<char*>(t.raw());
  for (int64_t r = 0; r < rows; ++r)
    if (!flag[r]) std::memset(base + r * per * esize, 0, static_cast<size_t>(per * esize));
}

Tensor softmax_backward(const Tensor& probs, const Tensor& dprobs) {
  const int64_t d = probs.size(-1), rows = probs.numel() / std::max<int64_t>(d, 1);
  Tensor out = Tensor::empty(probs.shape(), DType::F32);
  const float *p = probs.f32(), *g = dprobs.f32();
  float* o = out.f32();
  for (int64_t r = 0; r < rows; ++r) {
    double dot = 0;
    for (int64_t i = 0; i < d; ++i) dot += static_cast<double>(p[r * d + i]) * g[r * d + i];
    for (int64_t i = 0; i < d; ++i) o[r * d + i] = p[r * d + i] * (g[r * d + i] - static_cast<float>(dot));
  }
  return out;
}

double cross_entropy_backward(const Tensor& logits, const Tensor& targets, int64_t ignore_index, float scale,
                              Tensor& dlogits, int64_t* counted) {
  const int64_t n = logits.size(0), v = logits.size(1);
  dlogits = Tensor::zeros({n, v}, DType::F32);
  const float* lp = logits.f32();
  const int64_t* t = targets.i64();
  float* g = dlogits.f32();
  for (int64_t r = 0; r < n; ++r)
    MF_CHECK(t[r] == ignore_index || (t[r] >= 0 && t[r] < v), "cross_entropy: label ", t[r], " at row ", r,
             " is outside the vocabulary (", v, " tokens)");
  double total = 0;
  int64_t count = 0;
#pragma omp parallel for reduction(+ : total, count) if (n * v > 65536)
  for (int64_t r = 0; r < n; ++r) {
    if (t[r] == ignore_index) continue;
    const float* row = lp + r * v;
    const float mx = *std::max_element(row, row + v);
    double sum = 0;
    for (int64_t i = 0; i < v; ++i) sum += std::exp(static_cast<double>(row[i] - mx));
    total += std::log(sum) + mx - row[t[r]];
    ++count;
    for (int64_t i = 0; i < v; ++i) g[r * v + i] = static_cast<float>(std::exp(row[i] - mx - std::log(sum))) * scale;
    g[r * v + t[r]] -= scale;
  }
  if (counted) *counted = count;
  return total;
}

}  // namespace moeforge::ops::cpu
