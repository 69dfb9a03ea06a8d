// The parts of the Communicator that do not depend on a transport: counts exchange, the one-rank group.
#include "parallel/communicator.h"

#include <algorithm>
#include <cstring>

#include "core/error.h"
#include "parallel/collective_shapes.h"

namespace moeforge::parallel {

Block block_of(int64_t n, int rank, int ranks) {
  MF_CHECK(ranks >= 1 && rank >= 0 && rank < ranks, "block_of: rank ", rank, " of ", ranks);
  const int64_t chunk = (n + ranks - 1) / ranks;
  const int64_t first = std::min(n, rank * chunk);
  return {first, std::min(n, first + chunk) - first};
}

namespace {
struct Completed final : Communicator::Pending {
  void wait() override {}
};
}  // namespace

std::unique_ptr<Communicator::Pending> Communicator::all_to_all_async(const Tensor& in, const std::vector<int64_t>& send_rows,
                                                                      Tensor& out, const std::vector<int64_t>& recv_rows) {
  all_to_all(in, send_rows, out, recv_rows);
  return std::make_unique<Completed>();
}

void Communicator::all_gather_blocks(const std::vector<Tensor>& ts) {
  for (const Tensor& t : ts) {
    Tensor flat = t.view({t.numel()});
    for (int p = 0; p < size(); ++p) {
      const Block b = block_of(t.numel(), p, size());
      if (b.count == 0) continue;
      Tensor part = flat.slice0(b.first, b.count);
      broadcast(part, p);
    }
  }
}

std::unique_ptr<Communicator::Pending> Communicator::all_gather_blocks_async(const std::vector<Tensor>& ts) {
  all_gather_blocks(ts);
  return std::make_unique<Completed>();
}

void Communicator::reduce_scatter_blocks(const std::vector<Tensor>& ts) {
  for (const Tensor& t : ts) {
    Tensor whole = t;
    all_reduce_sum(whole);
  }
}

void check_blocks(const Communicator& c, const char* op, const Tensor& whole, const Tensor& block) {
  MF_CHECK(whole.dtype() == block.dtype() && whole.numel() == block.numel() * c.size(), op, " on group '", c.name(),
           "': ", shape_str(whole.shape()), " must hold ", c.size(), " blocks of ", shape_str(block.shape()));
}

int64_t check_all_to_all(const Communicator& c, const Tensor& in, const std::vector<int64_t>& send_rows,
                         const Tensor& out, const std::vector<int64_t>& recv_rows) {
  const int n = c.size();
  MF_CHECK(static_cast<int>(send_rows.size()) == n && static_cast<int>(recv_rows.size()) == n, "all_to_all on group '",
           c.name(), "': need one send and one receive count per rank (", n, ")");
  MF_CHECK(in.dtype() == out.dtype(), "all_to_all on group '", c.name(), "': input and output dtypes differ");
  const auto rows = [](const Tensor& t) { return t.shape().empty() ? int64_t{0} : t.shape()[0]; };
  const auto row_bytes = [&](const Tensor& t) { return rows(t) == 0 ? int64_t{-1} : static_cast<int64_t>(t.nbytes()) / rows(t); };
  const int64_t rb_in = row_bytes(in), rb_out = row_bytes(out);
  MF_CHECK(rb_in < 0 || rb_out < 0 || rb_in == rb_out, "all_to_all on group '", c.name(), "': rows of ",
           shape_str(in.shape()), " and ", shape_str(out.shape()), " differ");
  int64_t s = 0, r = 0;
  for (int p = 0; p < n; ++p) {
    s += send_rows[p];
    r += recv_rows[p];
  }
  MF_CHECK(s == rows(in) && r == rows(out), "all_to_all on group '", c.name(), "': counts sum to ", s, " sent and ", r,
           " received, tensors have ", shape_str(in.shape()), " and ", shape_str(out.shape()));
  return std::max<int64_t>(rb_in >= 0 ? rb_in : rb_out, 0);
}

std::vector<int64_t> exchange_counts(Communicator& comm, const std::vector<int64_t>& send_counts) {
  const int n = comm.size();
  MF_CHECK(static_cast<int>(send_counts.size()) == n, "exchange_counts on group '", comm.name(), "': ",
           send_counts.size(), " counts for ", n, " ranks");
  Tensor send = Tensor::from_i64(send_counts, {n, 1}), recv = Tensor::zeros({n, 1}, DType::I64);
  const std::vector<int64_t> ones(n, 1);
  comm.all_to_all(send, ones, recv, ones);
  return std::vector<int64_t>(recv.i64(), recv.i64() + n);
}

namespace {

class SelfCommunicator final : public Communicator {
 public:
  explicit SelfCommunicator(std::string name) : name_(std::move(name)) {}
  int rank() const override { return 0; }
  int size() const override { return 1; }
  const std::string& name() const override { return name_; }
  const char* backend() const override { return "self"; }
  void all_reduce_sum(Tensor&) override {}
  void reduce_scatter_sum(const Tensor& in, Tensor& out) override { copy(in, out, "reduce_scatter"); }
  void all_gather(const Tensor& in, Tensor& out) override { copy(in, out, "all_gather"); }
  void all_to_all(const Tensor& in, const std::vector<int64_t>& send_rows, Tensor& out,
                  const std::vector<int64_t>& recv_rows) override {
    check_all_to_all(*this, in, send_rows, out, recv_rows);
    copy(in, out, "all_to_all");
  }
  void broadcast(Tensor&, int root) override {
    MF_CHECK(root == 0, "broadcast on group '", name_, "': root ", root, " is not a rank of a one-rank group");
  }
  void barrier() override {}

 private:
  void copy(const Tensor& in, Tensor& out, const char* op) {
    MF_CHECK(in.nbytes() == out.nbytes() && in.dtype() == out.dtype(), op, " on group '", name_, "': input ",
             shape_str(in.shape()), " and output ", shape_str(out.shape()), " differ");
    if (in.raw() != out.raw() && in.nbytes() > 0) std::memcpy(out.raw(), in.raw(), in.nbytes());
  }
  std::string name_;
};

}  // namespace

std::unique_ptr<Communicator> self_communicator(const std::string& name) {
  return std::make_unique<SelfCommunicator>(name);
}

}  // namespace moeforge::parallel
