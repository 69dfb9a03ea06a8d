// The CUDA entry points in a build without the CUDA backend: nothing is available, and asking for
// device memory is an error that says how to get a CUDA build.
#include "core/error.h"
#include "ops/cuda/runtime.h"

namespace moeforge::cuda {

namespace {
[[noreturn]] void unavailable() {
  MF_THROW("this moeforge was built without the CUDA backend (no nvcc at configure time; configure with "
           "-DMOEFORGE_CUDA=ON on a machine with the CUDA toolkit)");
}
}  // namespace

bool available() { return false; }
std::string device_name() { return ""; }
int device_count() { return 0; }
void set_device(int) { unavailable(); }
AllocatorStats allocator_stats() { return {}; }
int64_t device_used_bytes() { return 0; }
void reset_peak_stats() {}
void empty_cache() {}
Tensor empty(const Shape&, DType, const char*) { unavailable(); }
Tensor to_device(const Tensor&, DType) { unavailable(); }
Tensor to_host_f32(const Tensor&) { unavailable(); }
void poison(Tensor&) { unavailable(); }
void synchronize() {}

}  // namespace moeforge::cuda
