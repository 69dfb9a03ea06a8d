#include "parallel/expert_exchange.h"

#include "core/error.h"
#include "ops/ops.h"

namespace moeforge::parallel {

ExpertShard ExpertShard::of(int64_t experts, int rank, int ranks) {
  MF_CHECK(ranks >= 1 && experts % ranks == 0, "expert parallelism: ", experts, " experts cannot be split evenly over ",
           ranks, " ranks (ep_size must divide the expert count)");
  const int64_t per = experts / ranks;
  return {rank * per, per};
}

ExpertExchange::ExpertExchange(Communicator& ep, const std::vector<int64_t>& offsets, Device device)
    : ep_(&ep),
      shard_(ExpertShard::of(static_cast<int64_t>(offsets.size()) - 1, ep.rank(), ep.size())),
      pairs_(offsets.back()) {
  const int n = ep.size();
  const int64_t experts = static_cast<int64_t>(offsets.size()) - 1, per = shard_.count;
  std::vector<int64_t> send_counts(static_cast<size_t>(experts));
  send_rows_.assign(n, 0);
  for (int64_t e = 0; e < experts; ++e) {
    send_counts[e] = offsets[e + 1] - offsets[e];
    send_rows_[e / per] += send_counts[e];
  }
  // recv_counts[p * per + j]: the rows rank p sends for my local expert j.
  if (n == 1) {  // one rank: nothing travels, the local order is the global order (no host work per layer)
    recv_rows_ = send_rows_;
    local_offsets_ = offsets;
    return;
  }
  const std::vector<int64_t> per_peer(n, per);
  Tensor sc = ops::to_device(Tensor::from_i64(send_counts, {experts, 1}), device, DType::I64);
  Tensor rc = ops::empty({experts, 1}, DType::I64, device, "expert counts received");
  ep.all_to_all(sc, per_peer, rc, per_peer);
  const Tensor host = ops::to_device(rc, Device::cpu(), DType::I64);
  const int64_t* recv_counts = host.i64();
  recv_rows_.assign(n, 0);
  std::vector<int64_t> recv_start(static_cast<size_t>(experts));  // row of (p, j) in the received buffer
  int64_t at = 0;
  for (int p = 0; p < n; ++p)
    for (int64_t j = 0; j < per; ++j) {
      recv_start[p * per + j] = at;
      at += recv_counts[p * per + j];
      recv_rows_[p] += recv_counts[p * per + j];
    }
  local_offsets_.assign(per + 1, 0);
  std::vector<int64_t> to_local, to_peer(static_cast<size_t>(at));
  to_local.reserve(static_cast<size_t>(at));
  for (int64_t j = 0; j < per; ++j) {
    for (int p = 0; p < n; ++p)
      for (int64_t r = 0; r < recv_counts[p * per + j]; ++r) {
        to_peer[recv_start[p * per + j] + r] = static_cast<int64_t>(to_local.size());
        to_local.push_back(recv_start[p * per + j] + r);
      }
    local_offsets_[j + 1] = static_cast<int64_t>(to_local.size());
  }
  // One upload for both index vectors.
  to_local.insert(to_local.end(), to_peer.begin(), to_peer.end());
  Tensor both = ops::to_device(Tensor::from_i64(to_local, {2 * at}), device, DType::I64);
  to_local_ = both.slice0(0, at);
  to_peer_ = both.slice0(at, at);
}

ExpertExchange::InFlight ExpertExchange::start_dispatch(const Tensor& permuted) const {
  MF_CHECK(permuted.dim() == 2 && permuted.size(0) == pairs_, "expert dispatch: expected [", pairs_, ", H] rows, got ",
           shape_str(permuted.shape()));
  InFlight f;
  f.sent = permuted;
  if (ep_->size() == 1) {  // one rank: local order is global order
    f.buffer = permuted;
    return f;
  }
  f.buffer = ops::empty({local_offsets_.back(), permuted.size(1)}, permuted.dtype(), permuted.device(),
                        "rows received for my experts");
  f.op = ep_->all_to_all_async(permuted, send_rows_, f.buffer, recv_rows_);
  return f;
}

Tensor ExpertExchange::finish_dispatch(InFlight& f) const {
  if (!f.op) return f.buffer;
  f.op->wait();
  f.op.reset();
  return ops::gather_rows(f.buffer, to_local_);
}

ExpertExchange::InFlight ExpertExchange::start_combine(const Tensor& local) const {
  MF_CHECK(local.dim() == 2 && local.size(0) == local_offsets_.back(), "expert combine: expected [",
           local_offsets_.back(), ", H] rows, got ", shape_str(local.shape()));
  InFlight f;
  if (ep_->size() == 1) {
    f.buffer = local;
    return f;
  }
  f.sent = ops::gather_rows(local, to_peer_);
  f.buffer = ops::empty({pairs_, local.size(1)}, local.dtype(), local.device(), "expert outputs returned");
  f.op = ep_->all_to_all_async(f.sent, recv_rows_, f.buffer, send_rows_);
  return f;
}

Tensor ExpertExchange::finish_combine(InFlight& f) const {
  if (f.op) {
    f.op->wait();
    f.op.reset();
  }
  return f.buffer;
}

Tensor ExpertExchange::dispatch(const Tensor& permuted) const {
  InFlight f = start_dispatch(permuted);
  return finish_dispatch(f);
}

Tensor ExpertExchange::combine(const Tensor& local) const {
  InFlight f = start_combine(local);
  return finish_combine(f);
}

}  // namespace moeforge::parallel
