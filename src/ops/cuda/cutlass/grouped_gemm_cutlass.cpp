// Chooses the CUTLASS grouped-GEMM instantiation for a list of expert products (or says none fits).
#include "ops/cuda/cutlass/grouped_gemm_cutlass.h"

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "ops/cuda/check.h"
#include "ops/cuda/cutlass/grouped_gemm_instances.h"

namespace moeforge::cuda::cutlass_grouped {

namespace {

// The kernels are built for sm_90a only; anything else keeps the cuBLAS path.
bool device_is_sm90() {
  static const bool yes = [] {
    int dev = 0, major = 0, minor = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return false;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    return major == 9 && minor == 0;
  }();
  return yes;
}

bool disabled_by_env() {
  static const bool off = [] {
    const char* v = std::getenv("MOEFORGE_GROUPED_GEMM");
    return v && (std::strcmp(v, "cublas") == 0 || std::strcmp(v, "loop") == 0 || std::strcmp(v, "grouped") == 0);
  }();
  return off;
}

enum class Product { Forward, InputGrad, WeightGrad, Other };

Product kind_of(const std::vector<GroupedProduct>& ps) {
  const bool ta = ps.front().trans_a, tb = ps.front().trans_b;
  for (const GroupedProduct& p : ps)
    if (p.trans_a != ta || p.trans_b != tb) return Product::Other;
  if (!ta && tb) return Product::Forward;
  if (!ta && !tb) return Product::InputGrad;
  if (ta && !tb) return Product::WeightGrad;
  return Product::Other;
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

bool ragged_disabled_by_env() {
  static const bool off = [] {
    const char* v = std::getenv("MOEFORGE_RAGGED_WGRAD");
    return v && std::strcmp(v, "0") == 0;
  }();
  return off;
}

}  // namespace

bool usable(const std::vector<GroupedProduct>& ps, DType ab, DType c) {
  if (ps.empty() || ab != DType::BF16 || disabled_by_env() || !device_is_sm90()) return false;
  const Product kind = kind_of(ps);
  if (kind == Product::Other) return false;
  if (c != DType::BF16 && !(c == DType::F32 && kind == Product::WeightGrad)) return false;
  const int64_t esize_c = c == DType::F32 ? 4 : 2;
  for (const GroupedProduct& p : ps) {
    // The kernel's problem shapes are 32-bit.
    if (p.m <= 0 || p.n <= 0 || p.k <= 0 || p.m > INT32_MAX || p.n > INT32_MAX || p.k > INT32_MAX) return false;
    if (!aligned16(p.a) || !aligned16(p.b) || !aligned16(p.c)) return false;
    if ((p.lda * 2) % 16 || (p.ldb * 2) % 16 || (p.ldc * esize_c) % 16) return false;
  }
  return true;
}

bool ragged_weight_grad_usable(const RaggedWeightGradArgs& a, DType ab, DType dw) {
  if (ab != DType::BF16 || (dw != DType::BF16 && dw != DType::F32)) return false;
  if (disabled_by_env() || ragged_disabled_by_env() || !device_is_sm90()) return false;
  if (a.offsets.size() < 2 || a.rows < 1 || a.rows > INT32_MAX || a.n < 1 || a.n > INT32_MAX || a.k < 1 || a.k > INT32_MAX)
    return false;
  // One launch's tiles (128 x 256 per expert's dW) are counted in 32 bits.
  const int64_t tiles = (a.n + kRaggedTileM - 1) / kRaggedTileM * ((a.k + kRaggedTileN - 1) / kRaggedTileN) *
                        static_cast<int64_t>(a.offsets.size() - 1);
  if (tiles > INT32_MAX) return false;
  const int64_t esize_dw = dw == DType::F32 ? 4 : 2;
  if (!aligned16(a.dy) || !aligned16(a.x) || !aligned16(a.dw)) return false;
  return (a.ld_dy * 2) % 16 == 0 && (a.ld_x * 2) % 16 == 0 && (a.k * esize_dw) % 16 == 0 && (a.n * 2) % 16 == 0 &&
         (a.k * 2) % 16 == 0;
}

int64_t ragged_weight_grad_square_slots(const RaggedWeightGradArgs& a) {
  int64_t experts_with_rows = 0;
  for (size_t e = 0; e + 1 < a.offsets.size(); ++e) experts_with_rows += a.offsets[e + 1] > a.offsets[e];
  return (a.n + kRaggedTileM - 1) / kRaggedTileM * ((a.k + kRaggedTileN - 1) / kRaggedTileN) * experts_with_rows *
         kRaggedSquaresPerTile;
}

void ragged_weight_grad(const RaggedWeightGradArgs& a, DType dw) {
  MF_CHECK(ragged_weight_grad_usable(a, DType::BF16, dw), "ragged weight gradient: not supported here (check usable first)");
  if (dw == DType::F32)
    run_ragged_weight_grad_f32(a);
  else
    run_ragged_weight_grad_bf16(a);
}

void run(const std::vector<GroupedProduct>& ps, DType ab, DType c, float beta) {
  MF_CHECK(usable(ps, ab, c), "CUTLASS grouped GEMM: these products are not supported (check usable() first)");
  switch (kind_of(ps)) {
    case Product::Forward: return run_forward_bf16(ps, beta);
    case Product::InputGrad: return run_input_grad_bf16(ps, beta);
    case Product::WeightGrad: return c == DType::F32 ? run_weight_grad_f32(ps, beta) : run_weight_grad_bf16(ps, beta);
    case Product::Other: break;
  }
  MF_THROW("CUTLASS grouped GEMM: unsupported transposes");
}

}  // namespace moeforge::cuda::cutlass_grouped
