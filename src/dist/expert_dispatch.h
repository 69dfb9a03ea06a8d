// Expert-parallel token flow: the (token, slot) pairs of a MoE layer go to the rank that holds their
// expert (experts split evenly and in order over the expert-parallel group), are grouped there by
// local expert, and come back. The plan is built once per layer and step from the routing; the
// same plan moves activations forward (dispatch, then combine) and gradients backward (the
// backward of dispatch is combine and vice versa). Every rank of the group makes the same two
// collectives per move whatever the routing (empty counts included), so no rank waits on a
// collective another skipped.
#pragma once
#include <cstdint>
#include <vector>

#include "core/tensor.h"
#include "dist/communicator.h"

namespace moeforge::dist {

// This rank's share of a layer's E experts: [first, first + count).
struct ExpertShard {
  int64_t first = 0, count = 0;
  static ExpertShard of(int64_t experts, int rank, int ranks);
};

class ExpertDispatch {
 public:
  // `pair_expert`: the global expert of each pair, in pair order. Exchanges the per-expert counts
  // (one all-to-all) so both directions know their sizes.
  ExpertDispatch(Communicator& ep, const std::vector<int64_t>& pair_expert, int64_t experts);

  // Rows in pair order [pairs, H] -> this rank's rows grouped by local expert [received, H]:
  // local expert 0's rows first (from rank 0, then rank 1, ..., each in its pair order), then
  // local expert 1's, ...
  Tensor dispatch(const Tensor& pair_rows) const;
  // The inverse move: rows grouped by local expert [received, H] -> the source ranks' pair order.
  Tensor combine(const Tensor& expert_rows) const;

  // Where each local expert's rows start in dispatch's output, [count + 1].
  const std::vector<int64_t>& local_offsets() const { return local_offsets_; }
  const ExpertShard& shard() const { return shard_; }
  int64_t received() const { return local_offsets_.back(); }

 private:
  Communicator* ep_;
  ExpertShard shard_;
  int64_t pairs_ = 0;
  std::vector<int64_t> send_order_;      // pair index of each sent row, in send order
  std::vector<int64_t> send_rows_, recv_rows_;  // per peer
  std::vector<int64_t> recv_to_expert_;  // row of the received buffer -> row in local-expert order
  std::vector<int64_t> local_offsets_;
};

}  // namespace moeforge::dist
