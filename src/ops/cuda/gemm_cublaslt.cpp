// GEMMs through cuBLASLt. Row-major C = op(A) op(B) is computed as the column-major product
// C^T = op(B)^T op(A)^T, so no copy transposes anything. F32 accumulation (CUBLAS_COMPUTE_32F, no
// TF32), a 32 MiB workspace from the caching allocator, and the library's first heuristic choice.
#include <mutex>

#include "ops/cuda/check.h"
#include "ops/cuda/ops_cuda.h"
#include "ops/cuda/runtime.h"

namespace moeforge::cuda {

namespace {

cudaDataType_t cuda_type(DType t) {
  switch (t) {
    case DType::F32: return CUDA_R_32F;
    case DType::BF16: return CUDA_R_16BF;
    case DType::F16: return CUDA_R_16F;
    default: MF_THROW("gemm: dtype ", dtype_name(t), " is not supported on the GPU");
  }
}

struct Lt {
  cublasLtHandle_t handle = nullptr;
  Tensor workspace;
};

Lt& lt() {
  static Lt* l = [] {
    auto* x = new Lt();
    MF_CUBLAS_CHECK(cublasLtCreate(&x->handle));
    x->workspace = empty({32 << 20}, DType::U8, "the cuBLASLt workspace");
    return x;
  }();
  return *l;
}

struct Desc {
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~Desc() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (op) cublasLtMatmulDescDestroy(op);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (c) cublasLtMatrixLayoutDestroy(c);
  }
};

}  // namespace

void gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c, bool accumulate) {
  MF_CHECK(a.dim() == 2 && b.dim() == 2 && c.dim() == 2, "gemm: operands must be 2-D, got ", shape_str(a.shape()), ", ",
           shape_str(b.shape()), ", ", shape_str(c.shape()));
  const int64_t m = trans_a ? a.shape()[1] : a.shape()[0];
  const int64_t k = trans_a ? a.shape()[0] : a.shape()[1];
  const int64_t kb = trans_b ? b.shape()[1] : b.shape()[0];
  const int64_t n = trans_b ? b.shape()[0] : b.shape()[1];
  MF_CHECK(k == kb && c.shape()[0] == m && c.shape()[1] == n, "gemm: shapes do not match: A ", shape_str(a.shape()),
           trans_a ? "^T" : "", " B ", shape_str(b.shape()), trans_b ? "^T" : "", " C ", shape_str(c.shape()));
  if (m == 0 || n == 0) return;
  Lt& L = lt();
  Desc d;
  // First cuBLAS operand: B stored row-major = column-major with swapped dims.
  const cublasOperation_t op_first = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_second = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  MF_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.a, cuda_type(b.dtype()), trans_b ? k : n, trans_b ? n : k, trans_b ? k : n));
  MF_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.b, cuda_type(a.dtype()), trans_a ? m : k, trans_a ? k : m, trans_a ? m : k));
  MF_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.c, cuda_type(c.dtype()), n, m, n));
  MF_CUBLAS_CHECK(cublasLtMatmulDescCreate(&d.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  MF_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSA, &op_first, sizeof op_first));
  MF_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSB, &op_second, sizeof op_second));
  MF_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&d.pref));
  const size_t ws = L.workspace.nbytes();
  MF_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
  cublasLtMatmulHeuristicResult_t heur{};
  int found = 0;
  MF_CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(L.handle, d.op, d.a, d.b, d.c, d.c, d.pref, 1, &heur, &found));
  MF_CHECK(found > 0, "gemm: cuBLASLt has no algorithm for ", m, "x", n, "x", k, " (", dtype_name(a.dtype()), " x ",
           dtype_name(b.dtype()), " -> ", dtype_name(c.dtype()), ")");
  const float alpha = 1.f, beta = accumulate ? 1.f : 0.f;
  MF_CUBLAS_CHECK(cublasLtMatmul(L.handle, d.op, &alpha, b.raw(), d.a, a.raw(), d.b, &beta, c.raw(), d.c, c.raw(), d.c,
                                 &heur.algo, L.workspace.raw(), ws, current_stream()));
}

Tensor linear(const Tensor& x, const Tensor& weight) {
  const int64_t k = x.shape().back();
  const int64_t rows = x.numel() / k;
  Tensor x2 = x.view({rows, k});
  Shape out_shape = x.shape();
  out_shape.back() = weight.shape()[0];
  Tensor y = empty({rows, weight.shape()[0]}, x.dtype(), "a linear layer's output");
  gemm(x2, false, weight, true, y);
  return y.view(out_shape);
}

}  // namespace moeforge::cuda
