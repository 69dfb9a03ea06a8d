// GEMMs on the CPU: OpenBLAS when the build found it (MOEFORGE_HAVE_BLAS), else a blocked,
// OpenMP-parallel fp32 kernel. BF16 weight operands are widened to fp32 first (exact).
#include <algorithm>
#include <vector>

#include "core/error.h"
#include "ops/cpu/cpu_ops.h"

#ifdef MOEFORGE_HAVE_BLAS
#include <cblas.h>
#endif

namespace moeforge::ops::cpu {

namespace {

#ifndef MOEFORGE_HAVE_BLAS
// Blocked C = alpha*op(A)op(B) + beta*C. Packs a panel of op(B) transposed so the inner loop
// runs over contiguous memory in both operands.
void gemm_fallback(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                   const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  constexpr int64_t NB = 64;
  for (int64_t j0 = 0; j0 < n; j0 += NB) {
    const int64_t nb = std::min(NB, n - j0);
    std::vector<float> bt(static_cast<size_t>(nb * k));  // bt[j][p] = op(B)[p][j0 + j]
    for (int64_t j = 0; j < nb; ++j)
      for (int64_t p = 0; p < k; ++p) bt[j * k + p] = tb ? b[(j0 + j) * ldb + p] : b[p * ldb + j0 + j];
#pragma omp parallel
    {
      std::vector<float> arow(static_cast<size_t>(k));
#pragma omp for schedule(static)
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t p = 0; p < k; ++p) arow[p] = ta ? a[p * lda + i] : a[i * lda + p];
        for (int64_t j = 0; j < nb; ++j) {
          const float* bj = &bt[j * k];
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t p = 0; p < k; ++p) s += arow[p] * bj[p];
          float& out = c[i * ldc + j0 + j];
          out = alpha * s + (beta == 0.f ? 0.f : beta * out);
        }
      }
    }
  }
}
#endif

}  // namespace

void gemm_f32(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
              const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.f ? 0.f : beta * c[i * ldc + j];
    return;
  }
#ifdef MOEFORGE_HAVE_BLAS
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
              static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), alpha, a, static_cast<int>(lda), b,
              static_cast<int>(ldb), beta, c, static_cast<int>(ldc));
#else
  gemm_fallback(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
#endif
}

void gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c, bool accumulate) {
  MF_CHECK(a.dim() == 2 && b.dim() == 2 && c.dim() == 2, "gemm: expected 2-D operands");
  const int64_t m = trans_a ? a.size(1) : a.size(0), k = trans_a ? a.size(0) : a.size(1);
  const int64_t n = trans_b ? b.size(0) : b.size(1);
  MF_CHECK((trans_b ? b.size(1) : b.size(0)) == k && c.size(0) == m && c.size(1) == n, "gemm: ",
           shape_str(a.shape()), (trans_a ? "^T" : ""), " x ", shape_str(b.shape()), (trans_b ? "^T" : ""), " -> ",
           shape_str(c.shape()), " do not agree");
  const Tensor af = as_f32(a), bf = as_f32(b);
  gemm_f32(trans_a, trans_b, m, n, k, 1.f, af.f32(), a.size(1), bf.f32(), b.size(1), accumulate ? 1.f : 0.f, c.f32(), n);
}

Tensor linear(const Tensor& x, const Tensor& weight) {
  const int64_t k = x.size(-1);
  Shape out_shape = x.shape();
  out_shape.back() = weight.size(0);
  Tensor out = Tensor::empty(out_shape, DType::F32);
  Tensor x2 = x.view({-1, k});
  Tensor o2 = out.view({-1, weight.size(0)});
  gemm(x2, false, weight, true, o2, /*accumulate=*/false);
  return out;
}

}  // namespace moeforge::ops::cpu
