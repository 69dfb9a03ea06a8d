// The parts of the Communicator that do not depend on a transport: counts exchange, the one-rank group.
#include "dist/communicator.h"

#include <cstring>

#include "core/error.h"

namespace moeforge::dist {

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
    MF_CHECK(send_rows.size() == 1 && recv_rows.size() == 1 && send_rows[0] == recv_rows[0],
             "all_to_all on group '", name_, "': counts do not match one rank");
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

}  // namespace moeforge::dist
