// MF_HOST_DEVICE: a small function compiled for both the host and CUDA kernels (inline on the
// host), for the arithmetic the CPU reference and the CUDA kernels must share exactly.
#pragma once

#if defined(__CUDACC__)
#define MF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MF_HOST_DEVICE inline
#endif
