// Internal to ops/cuda/cutlass: tiles handed out at run time to the CTAs of a persistent kernel of
// ours. Each CTA's producer warp takes its first tile from blockIdx.x and every later one from a
// global counter (zero at launch), and passes each tile index to the CTA's consumer warp groups
// through a small ring of shared-memory slots guarded by mbarriers; an index past the last tile
// tells the consumers to stop. Taking tiles when a CTA is ready for one balances tiles of unequal
// length (native routing's skewed experts) where a static stride would not.
#pragma once
#include "cutlass/pipeline/pipeline.hpp"

namespace moeforge::cuda::cutlass_grouped {

template <int Stages>
struct TileQueue {
  using Pipeline = cutlass::PipelineAsync<Stages>;
  using State = cutlass::PipelineState<Stages>;
  struct SharedStorage {
    typename Pipeline::SharedStorage barriers;
    int ids[Stages];
  };

  // Every thread of the CTA constructs it (warp 0 initialises the barriers; a __syncthreads must
  // follow before first use): the producer warp publishes, `consumers` threads take.
  static __device__ Pipeline make(SharedStorage& s, bool producer_warp, bool consumer, int consumers) {
    typename Pipeline::Params p;
    p.role = producer_warp ? Pipeline::ThreadCategory::Producer
                           : consumer ? Pipeline::ThreadCategory::Consumer : Pipeline::ThreadCategory::NonParticipant;
    p.producer_arv_count = 1;
    p.consumer_arv_count = static_cast<uint32_t>(consumers);
    return Pipeline(s.barriers, p);
  }

  // Producer warp (all lanes): makes tile `t` the consumers' next.
  static __device__ void publish(Pipeline& q, SharedStorage& s, State& at, int t, int lane) {
    if (lane == 0) {
      q.producer_acquire(at);
      s.ids[at.index()] = t;
      q.producer_commit(at);
    }
    ++at;
  }

  // Producer warp (all lanes): the CTA's next tile from the counter.
  static __device__ int next(int* counter, int lane) {
    int taken = 0;
    if (lane == 0) taken = atomicAdd(counter, 1);
    return __shfl_sync(0xffffffff, taken, 0) + static_cast<int>(gridDim.x);
  }

  // Consumer threads: the next tile published.
  static __device__ int take(Pipeline& q, SharedStorage& s, State& at) {
    q.consumer_wait(at);
    const int t = s.ids[at.index()];
    q.consumer_release(at);
    ++at;
    return t;
  }
};

}  // namespace moeforge::cuda::cutlass_grouped
