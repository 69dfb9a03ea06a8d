// Work queued on a second stream beside the main one: the optimizer applied inside backward runs a
// layer's update there while the main stream goes on with the next layer's backward (the update is
// memory-bound, most of backward is tensor-core GEMMs).
#pragma once
#include <functional>
#include <memory>
#include <vector>

#include "core/tensor.h"

namespace moeforge::cuda {

class SideStream {
 public:
  SideStream();
  ~SideStream();
  SideStream(const SideStream&) = delete;
  SideStream& operator=(const SideStream&) = delete;

  // Runs fn with its launches on the side stream, ordered after everything queued so far on the
  // main stream. `keep` (what fn's kernels read, e.g. gradients about to be freed) stays allocated
  // until they have run. At most `max_pending` runs are in flight: the main stream waits for the
  // oldest before a newer one starts (bounding the memory kept).
  void run(const std::function<void()>& fn, std::vector<Tensor> keep, int max_pending = 1);
  // The main stream waits for every run queued (call before anything reads what the runs wrote).
  void join();

 private:
  struct State;
  std::unique_ptr<State> s_;
};

}  // namespace moeforge::cuda
