// The CUDA backend's public face, usable from code built with or without CUDA: whether a device is
// usable here, moving tensors to and from it, and the caching allocator's numbers.
#pragma once
#include <cstdint>
#include <string>

#include "core/tensor.h"

namespace moeforge::cuda {

// True when this build has the CUDA backend and a device answers (false on a machine without a GPU
// or driver, never an error).
bool available();
std::string device_name();  // "" when unavailable (else the current device's)
// How many devices this process sees (0 without CUDA), and choosing the one every later call uses:
// each rank of a multi-GPU run takes the device of its LOCAL_RANK before allocating anything.
int device_count();
void set_device(int index);

struct AllocatorStats {
  int64_t allocated_bytes = 0;       // handed out now
  int64_t reserved_bytes = 0;        // held from cudaMalloc (allocated + cached)
  int64_t peak_allocated_bytes = 0;  // high-water mark of allocated_bytes
  int64_t peak_reserved_bytes = 0;
  int64_t cuda_malloc_calls = 0;     // steady state: stops growing after the first step
  int64_t cuda_free_calls = 0;
};
AllocatorStats allocator_stats();
// Memory in use on the device by every client (what nvidia-smi shows): total - free.
int64_t device_used_bytes();
void reset_peak_stats();
// Returns every cached block to the driver (after synchronising).
void empty_cache();

// A device tensor of `dtype` with uninitialised contents, from the caching allocator. `what` names
// the allocation in the out-of-memory error.
Tensor empty(const Shape& shape, DType dtype, const char* what = "tensor");
// Copies of host tensors on the device (converted to `dtype`) and back to the host as F32.
Tensor to_device(const Tensor& host, DType dtype);
Tensor to_host_f32(const Tensor& device);
// Fills a device tensor's bytes with 0xFF (NaN in every float format): tests poison outputs so a
// kernel that skips an element cannot pass by accident.
void poison(Tensor& device);
void synchronize();

}  // namespace moeforge::cuda
