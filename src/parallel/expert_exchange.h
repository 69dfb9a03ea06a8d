// Expert parallelism, on either device: moves a MoE layer's permuted rows (grouped by global expert,
// as ops::plan_routing lays them out) to the ranks that hold those experts and back, over the
// expert-parallel Communicator (NCCL for device rows, gloo for host rows; a one-rank group moves
// nothing). Experts are split evenly and in order over the expert-parallel group, so
// the permuted buffer is already grouped by destination rank and is sent as it is; what arrives
// is ordered (source rank, local expert) and is reordered (ops::gather_rows) to (local expert, source
// rank), the layout the grouped GEMMs want. The same exchange moves activations forward
// (dispatch, then combine) and gradients backward (combine's backward is dispatch and vice
// versa). Every rank makes the same collectives whatever the routing (empty counts included).
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "core/tensor.h"
#include "parallel/communicator.h"

namespace moeforge::parallel {

// This rank's share of a layer's E experts: [first, first + count), split evenly and in order.
struct ExpertShard {
  int64_t first = 0, count = 0;
  static ExpertShard of(int64_t experts, int rank, int ranks);
};

class ExpertExchange {
 public:
  // `offsets`: the global routing plan's [E+1] row offsets (host); `device`: where the rows live.
  // Exchanges the per-expert counts (one small all-to-all) so both directions know their sizes.
  ExpertExchange(Communicator& ep, const std::vector<int64_t>& offsets, Device device);

  // Dispatch: [pairs, H] in global-expert order -> [received, H] grouped by local expert; combine:
  // [received, H] grouped by local expert -> [pairs, H] in this rank's global-expert order. Each in
  // two halves, so that device work enqueued between start and finish runs while the rows travel
  // (the all-to-all is on the group's own stream).
  struct InFlight {
    Tensor sent, buffer;  // kept alive until finished
    std::unique_ptr<Communicator::Pending> op;
  };
  InFlight start_dispatch(const Tensor& permuted) const;
  Tensor finish_dispatch(InFlight& f) const;
  InFlight start_combine(const Tensor& local) const;
  Tensor finish_combine(InFlight& f) const;
  // Both halves at once.
  Tensor dispatch(const Tensor& permuted) const;
  Tensor combine(const Tensor& local) const;

  // Where each local expert's rows start in dispatch's output, [count + 1] (host).
  const std::vector<int64_t>& local_offsets() const { return local_offsets_; }
  const ExpertShard& shard() const { return shard_; }
  int64_t received() const { return local_offsets_.back(); }
  // Whether rows travel to other ranks (an expert-parallel group of more than one).
  bool crosses_ranks() const { return ep_->size() > 1; }

 private:
  Communicator* ep_;
  ExpertShard shard_;
  int64_t pairs_ = 0;
  std::vector<int64_t> send_rows_, recv_rows_;  // per peer
  std::vector<int64_t> local_offsets_;
  Tensor to_local_, to_peer_;  // I64 row indices on the rows' device: received -> local order, and back
};

}  // namespace moeforge::parallel
