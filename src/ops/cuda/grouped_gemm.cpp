// Grouped expert GEMMs. Weight gradients that are written (not accumulated) of ragged BF16 experts
// on Hopper take one ragged-K kernel (cutlass/ragged_weight_grad_kernel.cuh). Otherwise four paths:
// experts of equal size at constant strides (balanced routing) as one strided-batched cuBLASLt GEMM;
// ragged BF16 experts as one CUTLASS grouped GEMM on Hopper (cutlass/, when the build has it);
// otherwise ragged experts through cublasGemmGroupedBatchedEx, one call for every expert's product
// (each a group of one with its own row count); and, when the operand dtypes differ and CUTLASS
// cannot take them, one cuBLASLt GEMM per expert. Row-major products are issued as their
// column-major transposes, as in gemm_cublaslt.cpp. Experts without rows are left out (cuBLAS
// requires m, n, k > 0): an empty expert's weight gradient is zeroed, left as it is when
// accumulating, or left unwritten and flagged 0 when the caller keeps row flags.
#include <cublas_v2.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include "ops/cuda/check.h"
#include "ops/cuda/cutlass/grouped_gemm_cutlass.h"
#include "ops/cuda/gemm_raw.h"
#include "ops/cuda/grouped_product.h"
#include "ops/cuda/ops_cuda.h"
#include "ops/cuda/runtime.h"

namespace moeforge::cuda {

namespace {

cublasHandle_t handle() {
  static cublasHandle_t h = [] {
    cublasHandle_t x = nullptr;
    MF_CUBLAS_CHECK(cublasCreate(&x));
    static Tensor ws = empty({32 << 20}, DType::U8, "the cuBLAS workspace");
    MF_CUBLAS_CHECK(cublasSetWorkspace(x, ws.raw(), ws.nbytes()));
    return x;
  }();
  MF_CUBLAS_CHECK(cublasSetStream(h, current_stream()));
  return h;
}

cudaDataType_t dtype_of(const Tensor& t) {
  if (t.dtype() == DType::F32) return CUDA_R_32F;
  if (t.dtype() == DType::BF16) return CUDA_R_16BF;
  MF_THROW("grouped gemm: dtype ", dtype_name(t.dtype()), " is not supported");
}

using Product = GroupedProduct;

const char* g_last_path = "none";

const std::string& forced_mode() {
  static const std::string forced = [] {
    const char* v = std::getenv("MOEFORGE_GROUPED_GEMM");
    return std::string(v ? v : "");
  }();
  return forced;
}

// One cuBLASLt GEMM per expert instead of the grouped call when the dtypes are mixed (the grouped
// call takes one dtype for A, B and C; BF16 inputs with an F32 weight gradient are not).
// MOEFORGE_GROUPED_GEMM=loop|grouped|cutlass forces one path (cublas: never CUTLASS). An earlier rule also looped when the mean
// expert was large (>= 3 GFLOP): right for equal experts, but under native routing's skew (a few
// experts with thousands of rows, many empty) it made the q30-L4 forward's gate_up 37 ms against
// 3 ms for the grouped call (docs/perf-notes.md); equal experts now take the strided batch.
bool use_loop(cudaDataType_t ta, cudaDataType_t tb, cudaDataType_t tc) {
  if (ta != tc || tb != tc) return true;
  return forced_mode() == "loop";
}

DType dtype_from(cudaDataType_t t) { return t == CUDA_R_32F ? DType::F32 : DType::BF16; }

GemmArgs args_of(const Product& p, cudaDataType_t ta, cudaDataType_t tb, cudaDataType_t tc, float beta) {
  GemmArgs g;
  g.m = p.m;
  g.n = p.n;
  g.k = p.k;
  g.a = p.a;
  g.lda = p.lda;
  g.trans_a = p.trans_a;
  g.b = p.b;
  g.ldb = p.ldb;
  g.trans_b = p.trans_b;
  g.c = p.c;
  g.ldc = p.ldc;
  g.ta = dtype_from(ta);
  g.tb = dtype_from(tb);
  g.tc = dtype_from(tc);
  g.accumulate = beta != 0.f;
  return g;
}

void run_loop(const std::vector<Product>& ps, cudaDataType_t ta, cudaDataType_t tb, cudaDataType_t tc, float beta) {
  g_last_path = "loop";
  for (const Product& p : ps) gemm_raw(args_of(p, ta, tb, tc, beta));
}

// Equal-sized experts laid out at constant strides (balanced routing: every expert the same row
// count) are one strided-batched GEMM, which cuBLASLt runs at dense-GEMM speed.
bool run_if_uniform(const std::vector<Product>& ps, cudaDataType_t ta, cudaDataType_t tb, cudaDataType_t tc, float beta) {
  if (ps.size() < 2) return false;
  const Product& p0 = ps[0];
  const auto diff = [](const void* x, const void* y) { return static_cast<const char*>(x) - static_cast<const char*>(y); };
  const int64_t da = diff(ps[1].a, p0.a), db = diff(ps[1].b, p0.b), dc = diff(ps[1].c, p0.c);
  for (size_t i = 0; i < ps.size(); ++i) {
    const Product& p = ps[i];
    const int64_t ii = static_cast<int64_t>(i);
    if (p.m != p0.m || p.n != p0.n || p.k != p0.k || p.lda != p0.lda || p.ldb != p0.ldb || p.ldc != p0.ldc ||
        p.trans_a != p0.trans_a || p.trans_b != p0.trans_b || diff(p.a, p0.a) != ii * da || diff(p.b, p0.b) != ii * db ||
        diff(p.c, p0.c) != ii * dc)
      return false;
  }
  const int64_t ea = static_cast<int64_t>(dtype_size(dtype_from(ta))), eb = static_cast<int64_t>(dtype_size(dtype_from(tb))),
                ec = static_cast<int64_t>(dtype_size(dtype_from(tc)));
  if (da % ea || db % eb || dc % ec || da < 0 || db < 0 || dc < 0) return false;
  GemmArgs g = args_of(p0, ta, tb, tc, beta);
  g.batch = static_cast<int64_t>(ps.size());
  g.stride_a = da / ea;
  g.stride_b = db / eb;
  g.stride_c = dc / ec;
  g_last_path = "strided";
  gemm_raw(g);
  return true;
}

void run_grouped_call(const std::vector<Product>& ps, cudaDataType_t ta, cudaDataType_t tb, cudaDataType_t tc, float beta);

// `split_large_k`: products with a reduction of at least kLargeK rows run as single GEMMs and the
// rest as one grouped call. For weight gradients under native routing's skew the grouped call
// reached 137 TFLOP/s (cuda_ops_bench, skewed case) against ~550 for a dense GEMM of that size.
constexpr int64_t kLargeK = 1024;

void run_grouped(const std::vector<Product>& ps, cudaDataType_t ta, cudaDataType_t tb, cudaDataType_t tc, float beta,
                 bool split_large_k = false) {
  if (ps.empty()) return;
  if (forced_mode().empty() && run_if_uniform(ps, ta, tb, tc, beta)) return;
  if (cutlass_grouped::usable(ps, dtype_from(ta), dtype_from(tc)) && ta == tb) {
    g_last_path = "cutlass";
    return cutlass_grouped::run(ps, dtype_from(ta), dtype_from(tc), beta);
  }
  if (use_loop(ta, tb, tc)) return run_loop(ps, ta, tb, tc, beta);
  if (split_large_k && forced_mode().empty()) {
    std::vector<Product> large, rest;
    for (const Product& p : ps) (p.k >= kLargeK ? large : rest).push_back(p);
    if (!large.empty()) {
      run_loop(large, ta, tb, tc, beta);
      if (!rest.empty()) run_grouped_call(rest, ta, tb, tc, beta);
      g_last_path = "split";
      return;
    }
  }
  run_grouped_call(ps, ta, tb, tc, beta);
}

void run_grouped_call(const std::vector<Product>& ps, cudaDataType_t ta, cudaDataType_t tb, cudaDataType_t tc, float beta) {
  g_last_path = "cublas-grouped";
  const size_t g = ps.size();
  std::vector<cublasOperation_t> opa(g), opb(g);
  std::vector<int64_t> m(g), n(g), k(g), lda(g), ldb(g), ldc(g), sizes(g, 1);
  std::vector<float> alpha(g, 1.f), betas(g, beta);
  std::vector<const void*> pa(g), pb(g);
  std::vector<void*> pc(g);
  for (size_t i = 0; i < g; ++i) {
    const Product& p = ps[i];
    // Column-major C^T (N x M) = op(B)^T op(A)^T: cuBLAS's first operand is B, its second A.
    opa[i] = p.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    opb[i] = p.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    m[i] = p.n;
    n[i] = p.m;
    k[i] = p.k;
    pa[i] = p.b;
    lda[i] = p.ldb;
    pb[i] = p.a;
    ldb[i] = p.lda;
    pc[i] = p.c;
    ldc[i] = p.ldc;
  }
  // The pointer arrays live in device memory.
  Tensor dev_ptrs = empty({static_cast<int64_t>(3 * g * sizeof(void*))}, DType::U8, "grouped gemm pointer arrays");
  std::vector<const void*> all(3 * g);
  for (size_t i = 0; i < g; ++i) {
    all[i] = pa[i];
    all[g + i] = pb[i];
    all[2 * g + i] = pc[i];
  }
  MF_CUDA_CHECK(cudaMemcpyAsync(dev_ptrs.raw(), all.data(), all.size() * sizeof(void*), cudaMemcpyHostToDevice, current_stream()));
  auto** base = static_cast<const void**>(dev_ptrs.raw());
  auto* const* c_ptrs = static_cast<void* const*>(static_cast<void*>(static_cast<char*>(dev_ptrs.raw()) + 2 * g * sizeof(void*)));
  MF_CUBLAS_CHECK(cublasGemmGroupedBatchedEx_64(handle(), opa.data(), opb.data(), m.data(), n.data(), k.data(), alpha.data(),
                                                base, ta, lda.data(), base + g, tb, ldb.data(), betas.data(),
                                                c_ptrs, tc, ldc.data(),
                                                static_cast<int64_t>(g), sizes.data(), CUBLAS_COMPUTE_32F));
}

void check_offsets(const std::vector<int64_t>& offsets, int64_t experts, int64_t rows, const char* op) {
  MF_CHECK(static_cast<int64_t>(offsets.size()) == experts + 1 && offsets.front() == 0 && offsets.back() == rows, op,
           ": offsets must have E+1 entries from 0 to the row count (", rows, ")");
  for (size_t e = 0; e + 1 < offsets.size(); ++e) MF_CHECK(offsets[e] <= offsets[e + 1], op, ": offsets must not decrease");
}

// Every expert has the same, non-zero row count (balanced routing; no empty expert).
bool equal_experts(const std::vector<int64_t>& offsets) {
  const int64_t first = offsets.size() > 1 ? offsets[1] - offsets[0] : 0;
  for (size_t i = 1; i < offsets.size(); ++i)
    if (offsets[i] - offsets[i - 1] != first) return false;
  return first > 0;
}

const char* at(const Tensor& t, int64_t elem) { return static_cast<const char*>(t.raw()) + elem * dtype_size(t.dtype()); }
char* at(Tensor& t, int64_t elem) { return static_cast<char*>(t.raw()) + elem * dtype_size(t.dtype()); }

}  // namespace

const char* last_grouped_gemm_path() { return g_last_path; }

void grouped_linear(const Tensor& x, const Tensor& w, const std::vector<int64_t>& offsets, Tensor& y) {
  const int64_t e = w.shape()[0], n = w.shape()[1], k = w.shape()[2], rows = x.shape()[0];
  check_offsets(offsets, e, rows, "grouped_linear");
  MF_CHECK(x.shape()[1] == k && y.shape()[0] == rows && y.shape()[1] == n, "grouped_linear: x ", shape_str(x.shape()),
           " W ", shape_str(w.shape()), " y ", shape_str(y.shape()));
  std::vector<Product> ps;
  for (int64_t i = 0; i < e; ++i) {
    const int64_t r = offsets[i + 1] - offsets[i];
    if (r == 0) continue;
    ps.push_back({at(x, offsets[i] * k), k, false, at(w, i * n * k), k, true, at(y, offsets[i] * n), n, r, n, k});
  }
  run_grouped(ps, dtype_of(x), dtype_of(w), dtype_of(y), 0.f);
}

void grouped_linear_input_grad(const Tensor& dy, const Tensor& w, const std::vector<int64_t>& offsets, Tensor& dx) {
  const int64_t e = w.shape()[0], n = w.shape()[1], k = w.shape()[2], rows = dy.shape()[0];
  check_offsets(offsets, e, rows, "grouped_linear_input_grad");
  MF_CHECK(dy.shape()[1] == n && dx.shape()[0] == rows && dx.shape()[1] == k, "grouped_linear_input_grad: shapes");
  std::vector<Product> ps;
  for (int64_t i = 0; i < e; ++i) {
    const int64_t r = offsets[i + 1] - offsets[i];
    if (r == 0) continue;
    ps.push_back({at(dy, offsets[i] * n), n, false, at(w, i * n * k), k, false, at(dx, offsets[i] * k), k, r, k, n});
  }
  run_grouped(ps, dtype_of(dy), dtype_of(w), dtype_of(dx), 0.f);
}

void grouped_linear_weight_grad(const Tensor& dy, const Tensor& x, const std::vector<int64_t>& offsets, Tensor& dw,
                                bool accumulate, Tensor* written_experts, Tensor* squares) {
  if (squares) *squares = Tensor();  // set below only where the ragged kernel computes them
  const int64_t e = dw.shape()[0], n = dw.shape()[1], k = dw.shape()[2], rows = dy.shape()[0];
  check_offsets(offsets, e, rows, "grouped_linear_weight_grad");
  MF_CHECK(dy.shape()[1] == n && x.shape()[0] == rows && x.shape()[1] == k, "grouped_linear_weight_grad: shapes");
  std::vector<Product> ps;
  std::vector<int32_t> empty_experts;  // their gradient is zeros (when not accumulating)
  for (int64_t i = 0; i < e; ++i) {
    const int64_t r = offsets[i + 1] - offsets[i];
    if (r == 0) {
      if (!accumulate) empty_experts.push_back(static_cast<int32_t>(i));
      continue;
    }
    ps.push_back({at(dy, offsets[i] * n), n, true, at(x, offsets[i] * k), k, false, at(dw, i * n * k), k, n, k, r});
  }
  if (written_experts) {
    // The empty experts are left unwritten, flagged for whoever reads dW (the optimizer reads no
    // gradient there: docs/perf-notes.md, session 21).
    std::vector<uint8_t> flags(static_cast<size_t>(e), 1);
    for (int32_t i : empty_experts) flags[static_cast<size_t>(i)] = 0;
    MF_CUDA_CHECK(cudaMemcpyAsync(written_experts->raw(), flags.data(), flags.size(), cudaMemcpyHostToDevice,
                                  current_stream()));
  } else {
    zero_blocks(dw.raw(), n * k * static_cast<int64_t>(dtype_size(dw.dtype())), empty_experts);
  }
  // Written gradients of ragged BF16 experts on Hopper: one ragged-K launch over all experts' rows
  // (docs/perf-notes.md, session 20). Equal experts keep cuBLAS's strided batch, 5% faster there,
  // unless the caller wants the partial squares, which only the ragged kernel leaves (the norm's
  // read of dW it saves is ~10x those 5%: session 27).
  if (!accumulate && forced_mode().empty() && !(equal_experts(offsets) && ps.size() >= 2 && !squares)) {
    cutlass_grouped::RaggedWeightGradArgs ragged{dy.raw(), n, x.raw(), k, dw.raw(), rows, n, k, offsets};
    // The kernel reads dy and x in one dtype (F32 stands for "mixed": not taken).
    const DType operands = dy.dtype() == x.dtype() ? dy.dtype() : DType::F32;
    if (cutlass_grouped::ragged_weight_grad_usable(ragged, operands, dw.dtype())) {
      g_last_path = "cutlass-ragged";
      if (squares) {
        // Every tile writes its slots; no rows at all leaves one zero.
        const int64_t slots = cutlass_grouped::ragged_weight_grad_square_slots(ragged);
        *squares = empty({std::max<int64_t>(slots, 1)}, DType::F32, "a weight gradient's partial squares");
        if (slots == 0) zero(*squares);
        ragged.squares = squares->data<float>();
      }
      return cutlass_grouped::ragged_weight_grad(ragged, dw.dtype());
    }
  }
  run_grouped(ps, dtype_of(dy), dtype_of(x), dtype_of(dw), accumulate ? 1.f : 0.f, /*split_large_k=*/true);
}

}  // namespace moeforge::cuda
