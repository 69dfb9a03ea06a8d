// SideStream (side_stream.h). The side stream is non-blocking: the legacy default stream, which the
// main work runs on, would otherwise wait for it at every launch. Ordering is by events only: a run
// waits for an event recorded on the main stream, and the main stream waits for a run's event before
// the memory that run read goes back to the allocator (whose blocks are reused in the order of the
// stream that freed them).
#include "ops/cuda/side_stream.h"

#include <cuda_runtime.h>

#include <deque>

#include "ops/cuda/check.h"

namespace moeforge::cuda {

struct SideStream::State {
  cudaStream_t stream = nullptr;
  struct Pending {
    cudaEvent_t done = nullptr;
    std::vector<Tensor> keep;
  };
  std::deque<Pending> pending;
  std::vector<cudaEvent_t> spare;

  cudaEvent_t event() {
    cudaEvent_t e = nullptr;
    if (!spare.empty()) {
      e = spare.back();
      spare.pop_back();
    } else {
      MF_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    }
    return e;
  }
  // The main stream waits for the oldest run; its kept tensors are freed in the main stream's order.
  void retire_oldest() {
    Pending& p = pending.front();
    MF_CUDA_CHECK(cudaStreamWaitEvent(nullptr, p.done, 0));
    spare.push_back(p.done);
    pending.pop_front();
  }
};

SideStream::SideStream() : s_(std::make_unique<State>()) {
  MF_CUDA_CHECK(cudaStreamCreateWithFlags(&s_->stream, cudaStreamNonBlocking));
}

SideStream::~SideStream() {
  if (!s_) return;
  join();
  for (cudaEvent_t e : s_->spare) cudaEventDestroy(e);
  cudaStreamDestroy(s_->stream);
}

void SideStream::run(const std::function<void()>& fn, std::vector<Tensor> keep, int max_pending) {
  // Runs that have finished free what they kept now; beyond max_pending the main stream waits.
  while (!s_->pending.empty() && cudaEventQuery(s_->pending.front().done) == cudaSuccess) s_->retire_oldest();
  while (static_cast<int>(s_->pending.size()) >= std::max(max_pending, 1)) s_->retire_oldest();
  cudaEvent_t ready = s_->event();
  MF_CUDA_CHECK(cudaEventRecord(ready, nullptr));
  MF_CUDA_CHECK(cudaStreamWaitEvent(s_->stream, ready, 0));
  s_->spare.push_back(ready);  // a recorded event may be recorded again once waited on
  cudaStream_t& slot = current_stream_slot();
  const cudaStream_t before = slot;
  slot = s_->stream;
  try {
    fn();
  } catch (...) {
    slot = before;
    throw;
  }
  slot = before;
  State::Pending p;
  p.done = s_->event();
  MF_CUDA_CHECK(cudaEventRecord(p.done, s_->stream));
  p.keep = std::move(keep);
  s_->pending.push_back(std::move(p));
}

void SideStream::join() {
  while (!s_->pending.empty()) s_->retire_oldest();
}

}  // namespace moeforge::cuda
