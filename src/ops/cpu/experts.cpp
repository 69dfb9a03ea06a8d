// The expert token flow on the CPU: routing plans, permute/unpermute and their backward, and the
// grouped (per-expert) GEMMs and biases. The reference for ops/cuda's routing.cu and
// grouped_gemm.cpp: the same row order (by expert, token order inside an expert) and sums taken in
// slot order, so a CPU run and a GPU run see the same permuted buffers.
#include <cstring>

#include "core/error.h"
#include "ops/cpu/cpu_ops.h"

namespace moeforge::ops::cpu {

namespace {

// Checks `offsets` ([E+1], from 0 to `rows`, not decreasing) and calls fn(e, first_row, rows_of_e)
// for every expert that has rows.
template <typename Fn>
void for_each_expert(const std::vector<int64_t>& offsets, int64_t experts, int64_t rows, const char* op, Fn fn) {
  MF_CHECK(static_cast<int64_t>(offsets.size()) == experts + 1 && offsets.front() == 0 && offsets.back() == rows, op,
           ": ", offsets.size(), " offsets for ", experts, " experts and ", rows, " rows");
  for (int64_t e = 0; e < experts; ++e)
    MF_CHECK(offsets[e] <= offsets[e + 1], op, ": offsets decrease at expert ", e);
  for (int64_t e = 0; e < experts; ++e)
    if (offsets[e + 1] > offsets[e]) fn(e, offsets[e], offsets[e + 1] - offsets[e]);
}

// Expert e's [N, K] matrix of a [E, N, K] tensor (a view).
Tensor expert_matrix(const Tensor& w, int64_t e) { return w.slice0(e, 1).view({w.size(1), w.size(2)}); }

void check_plan(const RoutingPlan& p, int64_t tokens, const char* op) {
  MF_CHECK(p.dest_row.dtype() == DType::I64 && p.dest_row.numel() == tokens * p.top_k, op, ": the routing plan has ",
           p.dest_row.numel(), " pairs for ", tokens, " tokens of top-", p.top_k);
}

}  // namespace

void grouped_linear(const Tensor& x, const Tensor& w, const std::vector<int64_t>& offsets, Tensor& y) {
  MF_CHECK(x.dim() == 2 && w.dim() == 3 && y.dim() == 2, "grouped_linear: expected x [R,K], w [E,N,K], y [R,N]");
  MF_CHECK(x.size(1) == w.size(2) && y.size(0) == x.size(0) && y.size(1) == w.size(1), "grouped_linear: x ",
           shape_str(x.shape()), ", w ", shape_str(w.shape()), " and y ", shape_str(y.shape()), " do not agree");
  for_each_expert(offsets, w.size(0), x.size(0), "grouped_linear", [&](int64_t e, int64_t r0, int64_t r) {
    Tensor ye = y.slice0(r0, r);
    gemm(x.slice0(r0, r), false, expert_matrix(w, e), true, ye, false);
  });
}

void grouped_linear_input_grad(const Tensor& dy, const Tensor& w, const std::vector<int64_t>& offsets, Tensor& dx) {
  MF_CHECK(dy.dim() == 2 && w.dim() == 3 && dx.dim() == 2, "grouped_linear_input_grad: expected dy [R,N], w [E,N,K]");
  MF_CHECK(dy.size(1) == w.size(1) && dx.size(0) == dy.size(0) && dx.size(1) == w.size(2),
           "grouped_linear_input_grad: shapes");
  for_each_expert(offsets, w.size(0), dy.size(0), "grouped_linear_input_grad", [&](int64_t e, int64_t r0, int64_t r) {
    Tensor dxe = dx.slice0(r0, r);
    gemm(dy.slice0(r0, r), false, expert_matrix(w, e), false, dxe, false);
  });
}

namespace {

// Per expert, the sum of squares of dW[e] as stored (experts without rows are zeros: 0).
Tensor expert_squares(const Tensor& dw) {
  const Tensor stored = as_f32(dw);
  const int64_t experts = dw.size(0), per = dw.size(1) * dw.size(2);
  Tensor out = Tensor::empty({experts}, DType::F32);
  for (int64_t e = 0; e < experts; ++e) {
    const float* p = stored.f32() + e * per;
    double ss = 0;
    for (int64_t i = 0; i < per; ++i) ss += static_cast<double>(p[i]) * p[i];
    out.f32()[e] = static_cast<float>(ss);
  }
  return out;
}

}  // namespace

void grouped_linear_weight_grad(const Tensor& dy, const Tensor& x, const std::vector<int64_t>& offsets, Tensor& dw,
                                bool accumulate, Tensor* written_experts, Tensor* squares) {
  MF_CHECK(dy.dim() == 2 && x.dim() == 2 && dw.dim() == 3, "grouped_linear_weight_grad: expected dW [E,N,K]");
  MF_CHECK(dy.size(1) == dw.size(1) && x.size(0) == dy.size(0) && x.size(1) == dw.size(2),
           "grouped_linear_weight_grad: shapes");
  // Summed in F32 whatever dW's dtype (BF16 gradients are rounded once, after the sum); without
  // `accumulate` every expert starts from zero, so experts without rows end with a zero gradient.
  Tensor acc = accumulate ? as_f32(dw) : Tensor::zeros(dw.shape(), DType::F32);
  for_each_expert(offsets, dw.size(0), dy.size(0), "grouped_linear_weight_grad", [&](int64_t e, int64_t r0, int64_t r) {
    Tensor de = expert_matrix(acc, e);
    gemm(dy.slice0(r0, r), true, x.slice0(r0, r), false, de, true);
  });
  if (written_experts) {  // only the experts with rows are stored; the others keep what dW held
    const int64_t per = dw.size(1) * dw.size(2);
    uint8_t* flag = written_experts->data<uint8_t>();
    for (int64_t e = 0; e < dw.size(0); ++e) {
      flag[e] = offsets[e + 1] > offsets[e] ? 1 : 0;
      if (flag[e])
        convert_elements(acc.f32() + e * per, DType::F32, static_cast<char*>(dw.raw()) + e * per * dtype_size(dw.dtype()),
                         dw.dtype(), per);
    }
  } else if (acc.raw() != dw.raw()) {
    convert_elements(acc.raw(), DType::F32, dw.raw(), dw.dtype(), dw.numel());
  }
  if (squares) {
    // Unwritten experts' rows count as zeros, whatever dW holds there.
    Tensor sq = expert_squares(dw);
    for (int64_t e = 0; e < dw.size(0); ++e)
      if (offsets[e + 1] == offsets[e]) sq.f32()[e] = 0.f;
    *squares = sq;
  }
}

void grouped_add_bias(Tensor& y, const Tensor& bias, const std::vector<int64_t>& offsets) {
  MF_CHECK(y.dim() == 2 && bias.dim() == 2 && y.size(1) == bias.size(1), "grouped_add_bias: y ", shape_str(y.shape()),
           " for a bias ", shape_str(bias.shape()));
  for_each_expert(offsets, bias.size(0), y.size(0), "grouped_add_bias", [&](int64_t e, int64_t r0, int64_t r) {
    Tensor rows = y.slice0(r0, r);
    add_bias_rows(rows, bias.slice0(e, 1).view({bias.size(1)}));
  });
}

void grouped_bias_grad(const Tensor& dy, const std::vector<int64_t>& offsets, Tensor& db) {
  MF_CHECK(dy.dim() == 2 && db.dim() == 2 && dy.size(1) == db.size(1), "grouped_bias_grad: dy ", shape_str(dy.shape()),
           " for db ", shape_str(db.shape()));
  for_each_expert(offsets, db.size(0), dy.size(0), "grouped_bias_grad", [&](int64_t e, int64_t r0, int64_t r) {
    Tensor g = db.slice0(e, 1).view({db.size(1)});
    bias_grad(dy.slice0(r0, r), g);
  });
}

void zero_off_diagonal_blocks(Tensor& b, int64_t parts) {
  const int64_t e = b.size(0), rows = b.size(1), cols = b.size(2), n = rows / parts, r = cols / parts;
  for (int64_t x = 0; x < e; ++x)
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j)
        if (i / n != j / r) {
          const int64_t at = (x * rows + i) * cols + j;
          if (b.dtype() == DType::F32) b.f32()[at] = 0.f;
          else std::memset(static_cast<char*>(b.raw()) + at * dtype_size(b.dtype()), 0, dtype_size(b.dtype()));
        }
}

RoutingPlan plan_routing(const Tensor& expert_indices, int64_t num_experts) {
  MF_CHECK(expert_indices.dtype() == DType::I64 && expert_indices.dim() == 2, "plan_routing: indices must be I64 [T,k]");
  const int64_t t = expert_indices.size(0), k = expert_indices.size(1);
  const int64_t* idx = expert_indices.i64();
  RoutingPlan p;
  p.num_experts = num_experts;
  p.top_k = k;
  p.offsets.assign(static_cast<size_t>(num_experts + 1), 0);
  for (int64_t i = 0; i < t * k; ++i) {
    MF_CHECK(idx[i] >= 0 && idx[i] < num_experts, "plan_routing: expert index ", idx[i], " outside [0, ", num_experts,
             ")");
    ++p.offsets[idx[i] + 1];
  }
  for (int64_t e = 0; e < num_experts; ++e) p.offsets[e + 1] += p.offsets[e];
  std::vector<int64_t> next(p.offsets.begin(), p.offsets.end() - 1);
  p.dest_row = Tensor::empty({t, k}, DType::I64);
  for (int64_t i = 0; i < t * k; ++i) p.dest_row.i64()[i] = next[idx[i]]++;  // pair order = token order
  return p;
}

Tensor permute_tokens(const Tensor& x, const RoutingPlan& p) {
  const int64_t t = x.size(0), h = x.size(1);
  check_plan(p, t, "permute_tokens");
  Tensor xp = Tensor::empty({t * p.top_k, h}, DType::F32);
  const int64_t* dest = p.dest_row.i64();
  for (int64_t i = 0; i < t * p.top_k; ++i)
    std::memcpy(xp.f32() + dest[i] * h, x.f32() + (i / p.top_k) * h, static_cast<size_t>(h) * sizeof(float));
  return xp;
}

Tensor unpermute_tokens(const Tensor& yp, const Tensor& weights, const RoutingPlan& p) {
  const int64_t h = yp.size(1), t = weights.size(0), k = p.top_k;
  check_plan(p, t, "unpermute_tokens");
  MF_CHECK(yp.size(0) == t * k, "unpermute_tokens: ", yp.size(0), " rows for ", t * k, " pairs");
  Tensor y = Tensor::zeros({t, h}, DType::F32);
  const int64_t* dest = p.dest_row.i64();
  const float* w = weights.f32();
#pragma omp parallel for if (t * h > 65536)
  for (int64_t r = 0; r < t; ++r) {
    float* o = y.f32() + r * h;
    for (int64_t j = 0; j < k; ++j) {  // slot order, as the CUDA kernel sums
      const float wj = w[r * k + j];
      const float* src = yp.f32() + dest[r * k + j] * h;
      for (int64_t d = 0; d < h; ++d) o[d] += wj * src[d];
    }
  }
  return y;
}

void unpermute_tokens_backward(const Tensor& dy, const Tensor& yp, const Tensor& weights, const RoutingPlan& p,
                               Tensor& d_yp, Tensor& d_weights) {
  const int64_t h = dy.size(1), t = dy.size(0), k = p.top_k;
  check_plan(p, t, "unpermute_tokens_backward");
  d_yp = Tensor::empty(yp.shape(), DType::F32);
  d_weights = Tensor::empty({t, k}, DType::F32);
  const int64_t* dest = p.dest_row.i64();
  const float* w = weights.f32();
#pragma omp parallel for if (t * h > 65536)
  for (int64_t i = 0; i < t * k; ++i) {
    const float* g = dy.f32() + (i / k) * h;
    const float* y = yp.f32() + dest[i] * h;
    float* dst = d_yp.f32() + dest[i] * h;
    double dot = 0;
    for (int64_t d = 0; d < h; ++d) {
      dot += static_cast<double>(g[d]) * y[d];
      dst[d] = w[i] * g[d];
    }
    d_weights.f32()[i] = static_cast<float>(dot);
  }
}

Tensor permute_tokens_backward(const Tensor& d_xp, const RoutingPlan& p) {
  const int64_t h = d_xp.size(1), k = p.top_k, t = k ? d_xp.size(0) / k : 0;
  check_plan(p, t, "permute_tokens_backward");
  Tensor dx = Tensor::zeros({t, h}, DType::F32);
  const int64_t* dest = p.dest_row.i64();
#pragma omp parallel for if (t * h > 65536)
  for (int64_t r = 0; r < t; ++r) {
    float* o = dx.f32() + r * h;
    for (int64_t j = 0; j < k; ++j) {
      const float* g = d_xp.f32() + dest[r * k + j] * h;
      for (int64_t d = 0; d < h; ++d) o[d] += g[d];
    }
  }
  return dx;
}

Tensor gather_rows(const Tensor& in, const Tensor& index) {
  MF_CHECK(in.dim() == 2 && index.dtype() == DType::I64, "gather_rows: expected in [R,H] and I64 indices");
  const int64_t rows = in.size(0), h = in.size(1), n = index.numel();
  const size_t row_bytes = static_cast<size_t>(h) * dtype_size(in.dtype());
  Tensor out = Tensor::empty({n, h}, in.dtype());
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = index.i64()[i];
    MF_CHECK(r >= 0 && r < rows, "gather_rows: row ", r, " outside [0, ", rows, ")");
    std::memcpy(static_cast<char*>(out.raw()) + i * row_bytes, static_cast<const char*>(in.raw()) + r * row_bytes,
                row_bytes);
  }
  return out;
}

}  // namespace moeforge::ops::cpu
