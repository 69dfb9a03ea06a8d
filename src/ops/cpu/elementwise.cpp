// Small ops: embedding lookup, SwiGLU, softmax, top-k, residual add.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "core/error.h"
#include "ops/cpu/cpu_ops.h"
#include "ops/dropout_hash.h"

namespace moeforge::ops::cpu {

Tensor embedding(const Tensor& ids, const Tensor& table) {
  const int64_t n = ids.numel(), vocab = table.size(0), d = table.size(1);
  Shape shape = ids.shape();
  shape.push_back(d);
  Tensor out = Tensor::empty(shape, DType::F32);
  const int64_t* id = ids.i64();
  for (int64_t i = 0; i < n; ++i) {
    MF_CHECK(id[i] >= 0 && id[i] < vocab, "token id ", id[i], " at position ", i, " is outside the vocabulary (",
             vocab, " tokens)");
    convert_elements(static_cast<const char*>(table.raw()) + static_cast<size_t>(id[i] * d) * dtype_size(table.dtype()),
                     table.dtype(), out.f32() + i * d, DType::F32, d);
  }
  return out;
}

Tensor swiglu(const Tensor& gate_up) {
  const int64_t t = gate_up.size(0), two_i = gate_up.size(1), inter = two_i / 2;
  MF_CHECK(two_i % 2 == 0, "swiglu: last dimension must be even, got ", two_i);
  Tensor out = Tensor::empty({t, inter}, DType::F32);
  const float* g = gate_up.f32();
  float* o = out.f32();
#pragma omp parallel for if (t * inter > 65536)
  for (int64_t r = 0; r < t; ++r)
    for (int64_t i = 0; i < inter; ++i) {
      const float a = g[r * two_i + i], u = g[r * two_i + inter + i];
      o[r * inter + i] = a / (1.f + std::exp(-a)) * u;
    }
  return out;
}

void softmax_rows_inplace(Tensor& x) {
  const int64_t d = x.size(-1), rows = x.numel() / std::max<int64_t>(d, 1);
  float* p = x.f32();
#pragma omp parallel for if (rows * d > 65536)
  for (int64_t r = 0; r < rows; ++r) {
    float* row = p + r * d;
    const float mx = *std::max_element(row, row + d);
    double sum = 0;
    for (int64_t i = 0; i < d; ++i) {
      row[i] = std::exp(row[i] - mx);
      sum += row[i];
    }
    const float inv = static_cast<float>(1.0 / sum);
    for (int64_t i = 0; i < d; ++i) row[i] *= inv;
  }
}

void topk_rows(const Tensor& x, int64_t k, Tensor& values, Tensor& indices) {
  const int64_t d = x.size(-1), rows = x.numel() / std::max<int64_t>(d, 1);
  MF_CHECK(k >= 1 && k <= d, "topk: k=", k, " for rows of ", d);
  values = Tensor::empty({rows, k}, DType::F32);
  indices = Tensor::empty({rows, k}, DType::I64);
  const float* p = x.f32();
  float* vo = values.f32();
  int64_t* io = indices.i64();
#pragma omp parallel
  {
    std::vector<int64_t> idx(static_cast<size_t>(d));
#pragma omp for
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = p + r * d;
      std::iota(idx.begin(), idx.end(), 0);
      std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int64_t a, int64_t b) {
        return row[a] > row[b] || (row[a] == row[b] && a < b);
      });
      for (int64_t j = 0; j < k; ++j) {
        io[r * k + j] = idx[j];
        vo[r * k + j] = row[idx[j]];
      }
    }
  }
}

void add_inplace(Tensor& x, const Tensor& y) {
  MF_CHECK(x.numel() == y.numel(), "add: ", shape_str(x.shape()), " + ", shape_str(y.shape()));
  float* a = x.f32();
  const float* b = y.f32();
  const int64_t n = x.numel();
#pragma omp parallel for if (n > 65536)
  for (int64_t i = 0; i < n; ++i) a[i] += b[i];
}

Tensor dropout_scaled(const Tensor& x, float p, uint64_t seed) {
  const Tensor f = as_f32(x);
  Tensor y = Tensor::empty(x.shape(), DType::F32);
  const float keep_scale = 1.f / (1.f - p);
  for (int64_t i = 0; i < f.numel(); ++i)
    y.f32()[i] = dropout_keeps(seed, i, p) ? f.f32()[i] * keep_scale : 0.f;
  return y;
}

Tensor cross_entropy_rows(const Tensor& logits, const Tensor& targets, int64_t ignore_index, int64_t* counted) {
  const int64_t n = logits.size(0), v = logits.size(1);
  MF_CHECK(targets.numel() == n, "cross_entropy: ", n, " rows but ", targets.numel(), " targets");
  Tensor loss = Tensor::zeros({n}, DType::F32);
  const float* lp = logits.f32();
  const int64_t* t = targets.i64();
  float* out = loss.f32();
  int64_t count = 0;
  for (int64_t r = 0; r < n; ++r) {
    if (t[r] == ignore_index) continue;
    MF_CHECK(t[r] >= 0 && t[r] < v, "cross_entropy: label ", t[r], " at row ", r, " is outside the vocabulary (", v,
             " tokens)");
    const float* row = lp + r * v;
    const float mx = *std::max_element(row, row + v);
    double sum = 0;
    for (int64_t i = 0; i < v; ++i) sum += std::exp(static_cast<double>(row[i] - mx));
    out[r] = static_cast<float>(std::log(sum) + mx - row[t[r]]);
    ++count;
  }
  if (counted) *counted = count;
  return loss;
}

}  // namespace moeforge::ops::cpu
