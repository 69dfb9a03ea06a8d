// Internal to ops/cuda: one cuBLASLt GEMM (or a strided batch of them) on raw device pointers.
// Row-major semantics as cuda::gemm: C[M,N] (+)= op(A) op(B), A [M,K] ([K,M] when trans_a) with row
// stride lda, B [K,N] ([N,K] when trans_b) with row stride ldb; batch i uses A + i*stride_a etc.
#pragma once
#include <cstdint>

#include "core/dtype.h"

namespace moeforge::cuda {

struct GemmArgs {
  int64_t m = 0, n = 0, k = 0;
  const void* a = nullptr;
  int64_t lda = 0, stride_a = 0;
  bool trans_a = false;
  const void* b = nullptr;
  int64_t ldb = 0, stride_b = 0;
  bool trans_b = false;
  void* c = nullptr;
  int64_t ldc = 0, stride_c = 0;
  DType ta = DType::F32, tb = DType::F32, tc = DType::F32;
  int64_t batch = 1;
  bool accumulate = false;
};

void gemm_raw(const GemmArgs& g);

}  // namespace moeforge::cuda
