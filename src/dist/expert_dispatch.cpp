#include "dist/expert_dispatch.h"

#include <cstring>

#include "core/error.h"

namespace moeforge::dist {

ExpertShard ExpertShard::of(int64_t experts, int rank, int ranks) {
  MF_CHECK(ranks >= 1 && experts % ranks == 0, "expert parallelism: ", experts, " experts cannot be split evenly over ",
           ranks, " ranks (ep_size must divide the expert count)");
  const int64_t per = experts / ranks;
  return {rank * per, per};
}

namespace {

// out[i] = in[index[i]] for rows of width `row_bytes`.
Tensor gather(const Tensor& in, const std::vector<int64_t>& index, int64_t width) {
  Tensor out = Tensor::empty({static_cast<int64_t>(index.size()), width}, in.dtype());
  const size_t rb = static_cast<size_t>(width) * dtype_size(in.dtype());
  const char* src = static_cast<const char*>(in.raw());
  char* dst = static_cast<char*>(out.raw());
  for (size_t i = 0; i < index.size(); ++i) std::memcpy(dst + i * rb, src + index[i] * rb, rb);
  return out;
}

// out[index[i]] = in[i].
Tensor scatter(const Tensor& in, const std::vector<int64_t>& index, int64_t rows, int64_t width) {
  Tensor out = Tensor::empty({rows, width}, in.dtype());
  const size_t rb = static_cast<size_t>(width) * dtype_size(in.dtype());
  const char* src = static_cast<const char*>(in.raw());
  char* dst = static_cast<char*>(out.raw());
  for (size_t i = 0; i < index.size(); ++i) std::memcpy(dst + index[i] * rb, src + i * rb, rb);
  return out;
}

int64_t width_of(const Tensor& t, int64_t rows, const char* what) {
  MF_CHECK(t.dim() == 2 && t.size(0) == rows, what, ": expected [", rows, ", H] rows, got ", shape_str(t.shape()));
  return t.size(1);
}

}  // namespace

ExpertDispatch::ExpertDispatch(Communicator& ep, const std::vector<int64_t>& pair_expert, int64_t experts)
    : ep_(&ep), shard_(ExpertShard::of(experts, ep.rank(), ep.size())), pairs_(static_cast<int64_t>(pair_expert.size())) {
  const int n = ep.size();
  const int64_t per = shard_.count;
  // Bucket the pairs by global expert (pair order inside); experts are contiguous per rank, so
  // expert order is also destination-rank order.
  std::vector<std::vector<int64_t>> by_expert(static_cast<size_t>(experts));
  for (int64_t i = 0; i < pairs_; ++i) {
    const int64_t e = pair_expert[i];
    MF_CHECK(e >= 0 && e < experts, "expert dispatch: pair ", i, " names expert ", e, " of ", experts);
    by_expert[e].push_back(i);
  }
  send_rows_.assign(n, 0);
  std::vector<int64_t> send_counts(static_cast<size_t>(experts));  // [peer][local expert of that peer]
  for (int64_t e = 0; e < experts; ++e) {
    send_counts[e] = static_cast<int64_t>(by_expert[e].size());
    send_rows_[e / per] += send_counts[e];
    send_order_.insert(send_order_.end(), by_expert[e].begin(), by_expert[e].end());
  }
  // recv_counts[p * per + j]: rows rank p sends for my local expert j.
  Tensor sc = Tensor::from_i64(send_counts, {experts, 1}), rc = Tensor::zeros({experts, 1}, DType::I64);
  const std::vector<int64_t> per_peer(n, per);
  ep.all_to_all(sc, per_peer, rc, per_peer);
  const int64_t* recv_counts = rc.i64();
  recv_rows_.assign(n, 0);
  for (int p = 0; p < n; ++p)
    for (int64_t j = 0; j < per; ++j) recv_rows_[p] += recv_counts[p * per + j];
  // The received buffer is ordered (source rank, local expert); computation wants (local expert,
  // source rank).
  local_offsets_.assign(per + 1, 0);
  for (int64_t j = 0; j < per; ++j) {
    int64_t rows = 0;
    for (int p = 0; p < n; ++p) rows += recv_counts[p * per + j];
    local_offsets_[j + 1] = local_offsets_[j] + rows;
  }
  std::vector<int64_t> fill(local_offsets_.begin(), local_offsets_.end() - 1);
  for (int p = 0; p < n; ++p)
    for (int64_t j = 0; j < per; ++j)
      for (int64_t r = 0; r < recv_counts[p * per + j]; ++r) recv_to_expert_.push_back(fill[j]++);
}

Tensor ExpertDispatch::dispatch(const Tensor& pair_rows) const {
  const int64_t h = width_of(pair_rows, pairs_, "expert dispatch");
  Tensor send = gather(pair_rows, send_order_, h);
  Tensor recv = Tensor::empty({received(), h}, pair_rows.dtype());
  ep_->all_to_all(send, send_rows_, recv, recv_rows_);
  return scatter(recv, recv_to_expert_, received(), h);
}

Tensor ExpertDispatch::combine(const Tensor& expert_rows) const {
  const int64_t h = width_of(expert_rows, received(), "expert combine");
  Tensor send = gather(expert_rows, recv_to_expert_, h);
  Tensor back = Tensor::empty({pairs_, h}, expert_rows.dtype());
  ep_->all_to_all(send, recv_rows_, back, send_rows_);
  return scatter(back, send_order_, pairs_, h);
}

}  // namespace moeforge::dist
