// Internal to ops/cuda: one expert's product in a grouped GEMM, as the grouped-GEMM paths
// (cuBLAS in grouped_gemm.cpp, CUTLASS in cutlass/) take it.
#pragma once
#include <cstdint>

namespace moeforge::cuda {

// Row-major C (m x n) = op(A) op(B), each operand given by its pointer and row stride; op is a
// transpose when trans_* is set (A stored k x m, B stored n x k).
struct GroupedProduct {
  const void* a;
  int64_t lda;
  bool trans_a;
  const void* b;
  int64_t ldb;
  bool trans_b;
  void* c;
  int64_t ldc;
  int64_t m, n, k;
};

}  // namespace moeforge::cuda
