// GEMMs through cuBLASLt. Row-major C = op(A) op(B) is computed as the column-major product
// C^T = op(B)^T op(A)^T, so no copy transposes anything. F32 accumulation (CUBLAS_COMPUTE_32F, no
// TF32), a 32 MiB workspace from the caching allocator, and the library's first heuristic choice.
#include <map>
#include <mutex>
#include <tuple>

#include "ops/cuda/gemm_raw.h"

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

namespace {

// The heuristic's choice per problem, so a step's repeated shapes query cuBLASLt once (a query
// costs tens of microseconds of host time; per-expert loops issue hundreds of GEMMs per layer).
struct AlgoKey {
  int64_t m, n, k, lda, ldb, ldc, sa, sb, sc, batch;
  int ta, tb, dta, dtb, dtc;
  bool operator<(const AlgoKey& o) const {
    return std::tie(m, n, k, lda, ldb, ldc, sa, sb, sc, batch, ta, tb, dta, dtb, dtc) <
           std::tie(o.m, o.n, o.k, o.lda, o.ldb, o.ldc, o.sa, o.sb, o.sc, o.batch, o.ta, o.tb, o.dta, o.dtb, o.dtc);
  }
};

void set_batch(cublasLtMatrixLayout_t l, int64_t batch, int64_t stride) {
  if (batch <= 1) return;
  const int32_t b = static_cast<int32_t>(batch);
  MF_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &b, sizeof b));
  MF_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof stride));
}

}  // namespace

void gemm_raw(const GemmArgs& g) {
  if (g.m == 0 || g.n == 0 || g.batch == 0) return;
  Lt& L = lt();
  Desc d;
  // Row-major C = op(A) op(B) as column-major C^T = op(B)^T op(A)^T: cuBLAS's first operand is B.
  const cublasOperation_t op_first = g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_second = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  MF_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.a, cuda_type(g.tb), g.trans_b ? g.k : g.n, g.trans_b ? g.n : g.k, g.ldb));
  MF_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.b, cuda_type(g.ta), g.trans_a ? g.m : g.k, g.trans_a ? g.k : g.m, g.lda));
  MF_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.c, cuda_type(g.tc), g.n, g.m, g.ldc));
  set_batch(d.a, g.batch, g.stride_b);
  set_batch(d.b, g.batch, g.stride_a);
  set_batch(d.c, g.batch, g.stride_c);
  MF_CUBLAS_CHECK(cublasLtMatmulDescCreate(&d.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  MF_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSA, &op_first, sizeof op_first));
  MF_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSB, &op_second, sizeof op_second));
  const size_t ws = L.workspace.nbytes();
  const AlgoKey key{g.m, g.n, g.k, g.lda, g.ldb, g.ldc, g.stride_a, g.stride_b, g.stride_c, g.batch, g.trans_a, g.trans_b,
                    static_cast<int>(g.ta), static_cast<int>(g.tb), static_cast<int>(g.tc)};
  static std::mutex mu;
  static std::map<AlgoKey, cublasLtMatmulAlgo_t> cache;
  cublasLtMatmulAlgo_t algo;
  bool have = false;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it != cache.end()) {
      algo = it->second;
      have = true;
    }
  }
  if (!have) {
    MF_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&d.pref));
    MF_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
    cublasLtMatmulHeuristicResult_t heur{};
    int found = 0;
    MF_CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(L.handle, d.op, d.a, d.b, d.c, d.c, d.pref, 1, &heur, &found));
    MF_CHECK(found > 0, "gemm: cuBLASLt has no algorithm for ", g.m, "x", g.n, "x", g.k, " batch ", g.batch, " (",
             dtype_name(g.ta), " x ", dtype_name(g.tb), " -> ", dtype_name(g.tc), ")");
    algo = heur.algo;
    std::lock_guard<std::mutex> lock(mu);
    if (cache.size() > 65536) cache.clear();  // bounded: native routing varies row counts
    cache.emplace(key, algo);
  }
  const float alpha = 1.f, beta = g.accumulate ? 1.f : 0.f;
  MF_CUBLAS_CHECK(cublasLtMatmul(L.handle, d.op, &alpha, g.b, d.a, g.a, d.b, &beta, g.c, d.c, g.c, d.c, &algo,
                                 L.workspace.raw(), ws, current_stream()));
}

void gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c, bool accumulate) {
  MF_CHECK(a.dim() == 2 && b.dim() == 2 && c.dim() == 2, "gemm: operands must be 2-D, got ", shape_str(a.shape()), ", ",
           shape_str(b.shape()), ", ", shape_str(c.shape()));
  const int64_t m = trans_a ? a.shape()[1] : a.shape()[0];
  const int64_t k = trans_a ? a.shape()[0] : a.shape()[1];
  const int64_t kb = trans_b ? b.shape()[1] : b.shape()[0];
  const int64_t n = trans_b ? b.shape()[0] : b.shape()[1];
  MF_CHECK(k == kb && c.shape()[0] == m && c.shape()[1] == n, "gemm: shapes do not match: A ", shape_str(a.shape()),
           trans_a ? "^T" : "", " B ", shape_str(b.shape()), trans_b ? "^T" : "", " C ", shape_str(c.shape()));
  if (k == 0) {  // an empty sum: C is kept (accumulating) or zero
    if (!accumulate) zero(c);
    return;
  }
  GemmArgs g;
  g.m = m;
  g.n = n;
  g.k = k;
  g.a = a.raw();
  g.lda = a.shape()[1];
  g.trans_a = trans_a;
  g.b = b.raw();
  g.ldb = b.shape()[1];
  g.trans_b = trans_b;
  g.c = c.raw();
  g.ldc = n;
  g.ta = a.dtype();
  g.tb = b.dtype();
  g.tc = c.dtype();
  g.accumulate = accumulate;
  gemm_raw(g);
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
