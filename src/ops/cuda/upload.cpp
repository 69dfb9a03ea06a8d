// Small host-to-device uploads (problem tables of the grouped GEMMs, the optimizer's tensor tables,
// index vectors) through a pinned staging ring. cudaMemcpyAsync from pageable memory stages the
// bytes through the driver's own buffers and can hold the host until the stream has caught up with
// the copies queued before it: every grouped GEMM of a training step made the host wait for the GPU
// and then left the GPU waiting for the host's next launches. From pinned memory the copy is one
// queued DMA and the call returns at once.
//
// The ring is filled front to back and wraps; each copy records an event, and a region is written
// again only after the copies that used it have run (their events waited on, oldest first: in a
// ring the regions a new copy overlaps are always the oldest still pending).
#include <cuda_runtime.h>

#include <cstring>
#include <deque>
#include <mutex>
#include <vector>

#include "ops/cuda/check.h"
#include "ops/cuda/runtime.h"
#include "ops/cuda/upload.h"

namespace moeforge::cuda {

namespace {

class StagingRing {
 public:
  static constexpr size_t kCapacity = 16u << 20;  // a step's tables are ~1 MB; larger copies go direct
  static constexpr size_t kAlign = 256;

  // The ring's region for `bytes` (copied from `src`), its copy into `dst` queued; false when the
  // copy is too large for the ring.
  bool copy(void* dst, const void* src, size_t bytes) {
    if (bytes > kCapacity / 4) return false;
    std::lock_guard<std::mutex> lock(mu_);
    if (!base_) MF_CUDA_CHECK(cudaHostAlloc(&base_, kCapacity, cudaHostAllocDefault));
    const size_t size = (bytes + kAlign - 1) / kAlign * kAlign;
    if (head_ + size > kCapacity) head_ = 0;  // wrap: the tail end is left unused this lap
    const size_t start = head_, end = head_ + size;
    while (!pending_.empty() && overlaps(pending_.front(), start, end)) {
      MF_CUDA_CHECK(cudaEventSynchronize(pending_.front().done));
      free_events_.push_back(pending_.front().done);
      pending_.pop_front();
    }
    std::memcpy(static_cast<char*>(base_) + start, src, bytes);
    MF_CUDA_CHECK(cudaMemcpyAsync(dst, static_cast<char*>(base_) + start, bytes, cudaMemcpyHostToDevice, current_stream()));
    cudaEvent_t ev = nullptr;
    if (free_events_.empty()) {
      MF_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    } else {
      ev = free_events_.back();
      free_events_.pop_back();
    }
    MF_CUDA_CHECK(cudaEventRecord(ev, current_stream()));
    pending_.push_back({start, end, ev});
    head_ = end;
    return true;
  }

 private:
  struct Region {
    size_t start, end;
    cudaEvent_t done;
  };
  static bool overlaps(const Region& r, size_t start, size_t end) { return r.start < end && start < r.end; }

  std::mutex mu_;
  void* base_ = nullptr;  // pinned; lives as long as the process (freed by the driver at exit)
  size_t head_ = 0;
  std::deque<Region> pending_;
  std::vector<cudaEvent_t> free_events_;
};

StagingRing& ring() {
  static StagingRing* r = new StagingRing();  // never destroyed: uploads may run during static teardown
  return *r;
}

}  // namespace

Tensor upload_bytes(const void* host, size_t bytes, const char* what) {
  Tensor d = empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, DType::U8, what);
  if (bytes == 0) return d;
  if (!ring().copy(d.raw(), host, bytes)) {  // large: a pageable copy, waited for (the source may be temporary)
    MF_CUDA_CHECK(cudaMemcpyAsync(d.raw(), host, bytes, cudaMemcpyHostToDevice, current_stream()));
    MF_CUDA_CHECK(cudaStreamSynchronize(current_stream()));
  }
  return d;
}

}  // namespace moeforge::cuda
