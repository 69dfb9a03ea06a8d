// Expert parallelism on the GPU: moves a MoE layer's permuted rows (grouped by global expert, as
// cuda::plan_routing lays them out) to the ranks that hold those experts and back, over a device
// Communicator (NCCL). Experts are split evenly and in order over the expert-parallel group, so
// the permuted buffer is already grouped by destination rank and is sent as it is; what arrives
// is ordered (source rank, local expert) and is reordered on the device to (local expert, source
// rank), the layout the grouped GEMMs want. The same exchange moves activations forward
// (dispatch, then combine) and gradients backward (combine's backward is dispatch and vice
// versa). Every rank makes the same collectives whatever the routing (empty counts included).
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "core/tensor.h"
#include "dist/communicator.h"
#include "dist/expert_dispatch.h"

namespace moeforge::gpu {

class ExpertExchange {
 public:
  // `offsets`: the global routing plan's [E+1] row offsets (host). Exchanges the per-expert counts
  // (one small all-to-all) so both directions know their sizes.
  ExpertExchange(dist::Communicator& ep, const std::vector<int64_t>& offsets);

  // Dispatch: [pairs, H] in global-expert order -> [received, H] grouped by local expert; combine:
  // [received, H] grouped by local expert -> [pairs, H] in this rank's global-expert order. Each in
  // two halves, so that device work enqueued between start and finish runs while the rows travel
  // (the all-to-all is on the group's own stream).
  struct InFlight {
    Tensor sent, buffer;  // kept alive until finished
    std::unique_ptr<dist::Communicator::Pending> op;
  };
  InFlight start_dispatch(const Tensor& permuted) const;
  Tensor finish_dispatch(InFlight& f) const;
  InFlight start_combine(const Tensor& local) const;
  Tensor finish_combine(InFlight& f) const;

  // Where each local expert's rows start in dispatch's output, [count + 1] (host).
  const std::vector<int64_t>& local_offsets() const { return local_offsets_; }
  const dist::ExpertShard& shard() const { return shard_; }

 private:
  dist::Communicator* ep_;
  dist::ExpertShard shard_;
  int64_t pairs_ = 0;
  std::vector<int64_t> send_rows_, recv_rows_;  // per peer
  std::vector<int64_t> local_offsets_;
  Tensor to_local_, to_peer_;  // device I64 row indices: received -> local order, and back
};

}  // namespace moeforge::gpu
