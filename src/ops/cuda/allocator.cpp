// A stream-ordered caching allocator. Freed blocks go back to a pool of their stream and are handed
// out again without synchronising (work queued later on that stream runs after the earlier use), so
// a training step in steady state calls neither cudaMalloc nor cudaFree. Sizes are rounded (512 B
// under 1 MiB, 2 MiB above) so blocks of neighbouring sizes are shared; the smallest cached block
// that fits is used, if it wastes at most half of itself. When cudaMalloc fails the cache is emptied
// and the call retried; a second failure is one error with the request, the numbers and a hint.
#include <map>
#include <mutex>
#include <sstream>
#include <unordered_map>

#include "ops/cuda/check.h"
#include "ops/cuda/ops_cuda.h"
#include "ops/cuda/runtime.h"

namespace moeforge::cuda {

namespace {

struct Block {
  void* ptr = nullptr;
  size_t size = 0;
  cudaStream_t stream = nullptr;
};

class CachingAllocator {
 public:
  void* allocate(size_t bytes, cudaStream_t stream, const char* what) {
    const size_t size = round_size(bytes);
    std::lock_guard<std::mutex> lock(mu_);
    auto& pool = pools_[stream];
    auto it = pool.lower_bound(size);
    if (it != pool.end() && it->first <= 2 * size + (2u << 20)) {
      Block b = it->second;
      pool.erase(it);
      return hand_out(b);
    }
    void* ptr = nullptr;
    cudaError_t err = cudaMalloc(&ptr, size);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      release_cached_locked();
      err = cudaMalloc(&ptr, size);
    }
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      size_t free_b = 0, total_b = 0;
      cudaMemGetInfo(&free_b, &total_b);
      std::ostringstream os;
      os << "out of GPU memory allocating " << gib(size) << " GiB for " << what << " (allocator: "
         << gib(stats_.allocated_bytes) << " GiB in use, " << gib(stats_.reserved_bytes) << " GiB reserved, peak "
         << gib(stats_.peak_allocated_bytes) << " GiB; device: " << gib(static_cast<int64_t>(free_b)) << " GiB free of "
         << gib(static_cast<int64_t>(total_b))
         << " GiB). Try activation_checkpointing: true, a smaller micro_batch or a shorter seq_len";
      throw Error(os.str());
    }
    ++stats_.cuda_malloc_calls;
    stats_.reserved_bytes += static_cast<int64_t>(size);
    stats_.peak_reserved_bytes = std::max(stats_.peak_reserved_bytes, stats_.reserved_bytes);
    return hand_out({ptr, size, stream});
  }

  void free(void* ptr) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = live_.find(ptr);
    if (it == live_.end()) return;
    Block b = it->second;
    live_.erase(it);
    stats_.allocated_bytes -= static_cast<int64_t>(b.size);
    pools_[b.stream].emplace(b.size, b);
  }

  void empty_cache() {
    std::lock_guard<std::mutex> lock(mu_);
    release_cached_locked();
  }

  AllocatorStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return stats_;
  }
  void reset_peak() {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.peak_allocated_bytes = stats_.allocated_bytes;
    stats_.peak_reserved_bytes = stats_.reserved_bytes;
  }

 private:
  static size_t round_size(size_t bytes) {
    if (bytes == 0) bytes = 1;
    const size_t q = bytes < (1u << 20) ? 512 : (2u << 20);
    return (bytes + q - 1) / q * q;
  }
  static double gib(int64_t b) { return static_cast<double>(b) / (1024.0 * 1024.0 * 1024.0); }

  void* hand_out(const Block& b) {
    live_.emplace(b.ptr, b);
    stats_.allocated_bytes += static_cast<int64_t>(b.size);
    stats_.peak_allocated_bytes = std::max(stats_.peak_allocated_bytes, stats_.allocated_bytes);
    return b.ptr;
  }

  void release_cached_locked() {
    cudaDeviceSynchronize();
    for (auto& [stream, pool] : pools_) {
      for (auto& [size, b] : pool) {
        cudaFree(b.ptr);
        ++stats_.cuda_free_calls;
        stats_.reserved_bytes -= static_cast<int64_t>(b.size);
      }
      pool.clear();
    }
  }

  std::mutex mu_;
  std::unordered_map<cudaStream_t, std::multimap<size_t, Block>> pools_;
  std::unordered_map<void*, Block> live_;
  AllocatorStats stats_;
};

CachingAllocator& allocator() {
  static CachingAllocator* a = new CachingAllocator();  // never destroyed: tensors may outlive main
  return *a;
}

}  // namespace

bool available() {
  static const bool ok = [] {
    int n = 0;
    const cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      return false;
    }
    return n > 0;
  }();
  return ok;
}

std::string device_name() {
  if (!available()) return "";
  int dev = 0;
  MF_CUDA_CHECK(cudaGetDevice(&dev));
  cudaDeviceProp p{};
  MF_CUDA_CHECK(cudaGetDeviceProperties(&p, dev));
  return p.name;
}

int sm_count() {
  static const int n = [] {
    int dev = 0, count = 0;
    MF_CUDA_CHECK(cudaGetDevice(&dev));
    MF_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev));
    return count;
  }();
  return n;
}

int resident_grid(const void* kernel, int threads, size_t dynamic_smem) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, size_t>, int> cache;
  const auto key = std::make_tuple(kernel, threads, dynamic_smem);
  std::lock_guard<std::mutex> lock(mu);
  if (auto it = cache.find(key); it != cache.end()) return it->second;
  int per_sm = 0;
  MF_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, dynamic_smem));
  const int grid = std::max(per_sm, 1) * sm_count();
  cache.emplace(key, grid);
  return grid;
}

int device_count() {
  if (!available()) return 0;
  int n = 0;
  MF_CUDA_CHECK(cudaGetDeviceCount(&n));
  return n;
}

void set_device(int index) {
  const int n = device_count();
  MF_CHECK(index >= 0 && index < n, "CUDA device ", index, " does not exist (this process sees ", n,
           " device(s); check LOCAL_RANK and CUDA_VISIBLE_DEVICES)");
  MF_CUDA_CHECK(cudaSetDevice(index));
}

AllocatorStats allocator_stats() { return allocator().stats(); }

int64_t device_used_bytes() {
  size_t free_b = 0, total_b = 0;
  MF_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  return static_cast<int64_t>(total_b - free_b);
}

void reset_peak_stats() { allocator().reset_peak(); }
void empty_cache() { allocator().empty_cache(); }

Tensor empty(const Shape& shape, DType dtype, const char* what) {
  MF_CHECK(available(), "no CUDA device is available (", what, ")");
  const size_t bytes = static_cast<size_t>(shape_numel(shape)) * dtype_size(dtype);
  void* ptr = allocator().allocate(bytes, current_stream(), what);
  std::shared_ptr<void> owner(ptr, [](void* p) { allocator().free(p); });
  auto storage = Storage::wrap(ptr, bytes, owner, Device::cuda(0));  // index unused: one device per process
  return Tensor(storage, 0, shape, dtype);
}

Tensor to_device(const Tensor& host, DType dtype) {
  MF_CHECK(host.device().is_cpu(), "to_device: tensor is already on ", host.device().str());
  Tensor converted = host.dtype() == dtype ? host : host.to(dtype);
  Tensor d = empty(host.shape(), dtype, "a host-to-device copy");
  MF_CUDA_CHECK(cudaMemcpyAsync(d.raw(), converted.raw(), d.nbytes(), cudaMemcpyHostToDevice, current_stream()));
  MF_CUDA_CHECK(cudaStreamSynchronize(current_stream()));  // `converted` may be a temporary
  return d;
}

Tensor to_host_f32(const Tensor& d) {
  Tensor h = Tensor::empty(d.shape(), d.dtype());
  MF_CUDA_CHECK(cudaMemcpyAsync(h.raw(), d.raw(), d.nbytes(), cudaMemcpyDeviceToHost, current_stream()));
  MF_CUDA_CHECK(cudaStreamSynchronize(current_stream()));
  return h.dtype() == DType::F32 || h.dtype() == DType::I64 ? h : h.to(DType::F32);
}

void poison(Tensor& d) { MF_CUDA_CHECK(cudaMemsetAsync(d.raw(), 0xFF, d.nbytes(), current_stream())); }

void synchronize() { MF_CUDA_CHECK(cudaStreamSynchronize(current_stream())); }

}  // namespace moeforge::cuda
