// Internal to ops/cuda: turning CUDA and cuBLAS status codes into moeforge errors that name the call.
#pragma once
#include <cublasLt.h>
#include <cuda_runtime.h>

#include "core/error.h"

#define MF_CUDA_CHECK(call)                                                                        \
  do {                                                                                             \
    cudaError_t mf_err_ = (call);                                                                  \
    if (mf_err_ != cudaSuccess) MF_THROW("CUDA error in ", #call, ": ", cudaGetErrorString(mf_err_)); \
  } while (0)

#define MF_CUBLAS_CHECK(call)                                                                      \
  do {                                                                                             \
    cublasStatus_t mf_st_ = (call);                                                                \
    if (mf_st_ != CUBLAS_STATUS_SUCCESS) MF_THROW("cuBLAS error in ", #call, ": status ", static_cast<int>(mf_st_)); \
  } while (0)

// Checks the launch that just happened (asynchronous errors surface at the next synchronising call).
#define MF_CUDA_CHECK_LAUNCH(name)                                                                  \
  do {                                                                                              \
    cudaError_t mf_err_ = cudaGetLastError();                                                       \
    if (mf_err_ != cudaSuccess) MF_THROW("CUDA error launching ", name, ": ", cudaGetErrorString(mf_err_)); \
  } while (0)

namespace moeforge::cuda {
// The stream moeforge's kernels run on (the legacy default stream for now; one per device).
inline cudaStream_t current_stream() { return nullptr; }
}  // namespace moeforge::cuda
