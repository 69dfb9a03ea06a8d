// Collectives between the ranks of a job (or of a group of them: the expert-parallel group, the
// expert-data-parallel group), behind one interface: gloo over TCP for host tensors (the CPU
// backend and CI), NCCL for device tensors (multi-GPU training and the multi-GPU bench). Every call is
// collective: all ranks of the group make the same calls in the same order. A peer that dies or stops answering turns into an error that
// names the collective and the group, within the group's timeout, never a hang.
#pragma once
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "parallel/tcp_store.h"

namespace moeforge::parallel {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;  // within the group
  virtual int size() const = 0;
  virtual const std::string& name() const = 0;  // the group's name, for messages
  virtual const char* backend() const = 0;      // "gloo", "nccl", "self"

  // In place: every rank ends with the elementwise sum over ranks.
  virtual void all_reduce_sum(Tensor& t) = 0;
  // Several tensors summed in place, as one collective where the backend can (NCCL groups them
  // into one launch); the same result as all_reduce_sum on each in turn.
  virtual void all_reduce_sum_many(const std::vector<Tensor*>& ts) {
    for (Tensor* t : ts) all_reduce_sum(*t);
  }
  // `in` [size * n ...] on every rank -> `out` [n ...]: rank r gets the sum over ranks of block r.
  virtual void reduce_scatter_sum(const Tensor& in, Tensor& out) = 0;
  // `in` [n ...] -> `out` [size * n ...], blocks in rank order.
  virtual void all_gather(const Tensor& in, Tensor& out) = 0;
  // Row exchange (rows = first dimension): the first send_rows[0] rows of `in` go to rank 0, the
  // next send_rows[1] to rank 1, ...; `out` receives recv_rows[p] rows from each rank p, in rank
  // order. The counts must agree pairwise (exchange_counts gives the receive side).
  virtual void all_to_all(const Tensor& in, const std::vector<int64_t>& send_rows, Tensor& out,
                          const std::vector<int64_t>& recv_rows) = 0;
  // A collective under way (all_to_all_async): wait() returns once it has completed, or throws as
  // the blocking call would have.
  class Pending {
   public:
    virtual ~Pending() = default;
    virtual void wait() = 0;
  };
  // all_to_all that returns before completing where the backend can: NCCL runs it on the group's
  // own stream, after the device work enqueued so far, so device work enqueued after this call
  // overlaps it. `in` and `out` must stay alive until wait() returns, and `out` must not be read
  // before. The default completes it before returning.
  virtual std::unique_ptr<Pending> all_to_all_async(const Tensor& in, const std::vector<int64_t>& send_rows, Tensor& out,
                                                    const std::vector<int64_t>& recv_rows);
  // In place: `t` takes root's value on every rank.
  virtual void broadcast(Tensor& t, int root) = 0;
  // In place (the handles share their storage with the caller's tensors), for each tensor: rank p's block of its flat elements (block_of(numel, p, size()))
  // goes to every rank, so each ends with every rank's block (an all-gather of uneven blocks that
  // live inside the tensors themselves: the sharded optimizer's updated slices). NCCL does it as
  // one group of broadcasts; the default broadcasts block by block.
  virtual void all_gather_blocks(const std::vector<Tensor>& ts);
  // all_gather_blocks that returns before completing where the backend can (NCCL: on the group's
  // stream, after the device work enqueued so far), as all_to_all_async; the default completes it.
  virtual std::unique_ptr<Pending> all_gather_blocks_async(const std::vector<Tensor>& ts);
  // In place, the converse: for each tensor, rank p's block ends holding the sum over ranks of that
  // block (the other blocks are left undefined): ZeRO-3's gradients, each rank keeping the sum of
  // its own block. NCCL does it as one group of reduces; the default sums the whole tensor.
  virtual void reduce_scatter_blocks(const std::vector<Tensor>& ts);
  virtual void barrier() = 0;

  // What a collective's timeout message adds about the other ranks (which one stopped answering:
  // Rendezvous::stalled_peers), where the job has a way to tell; "" otherwise. `takes`: how long
  // finding out takes; collectives then wait that much less, so that the error still comes within
  // the stated timeout (when the timeout is over twice as long).
  void set_timeout_diagnosis(std::function<std::string()> f, std::chrono::milliseconds takes) {
    diagnose_ = std::move(f);
    diagnosis_takes_ = takes;
  }

 protected:
  std::string timeout_diagnosis() const { return diagnose_ ? diagnose_() : std::string(); }
  // How long a collective waits for its peers, of the stated `timeout`.
  std::chrono::milliseconds wait_within(std::chrono::milliseconds timeout) const {
    return diagnose_ && timeout > 2 * diagnosis_takes_ ? timeout - diagnosis_takes_ : timeout;
  }

 private:
  std::function<std::string()> diagnose_;
  std::chrono::milliseconds diagnosis_takes_{0};
};

// Rank `rank`'s block of `n` elements split over `ranks`: ceil(n / ranks) each, the last ones
// shorter or empty. [first, first + count).
struct Block {
  int64_t first = 0, count = 0;
};
Block block_of(int64_t n, int rank, int ranks);

// What each rank will send me, from what I send each rank (an all-to-all of one count per pair).
std::vector<int64_t> exchange_counts(Communicator& comm, const std::vector<int64_t>& send_counts);

// The one-rank group: every collective is a copy (a single-process run takes the same code path).
std::unique_ptr<Communicator> self_communicator(const std::string& name);

// Whether this build has gloo (libgloo-dev).
bool gloo_available();

// Connects `group_size` ranks over TCP through the key-value store (keys under "gloo/<name>/"):
// every member calls this with its rank in the group. `host` is the address peers reach this rank
// at. Collectives that do not complete within `timeout` fail, naming the collective and the group.
std::unique_ptr<Communicator> connect_gloo(TcpStoreClient& store, const std::string& name, int rank, int group_size,
                                           const std::string& host, std::chrono::milliseconds timeout);

// Whether this build has NCCL (the CUDA backend with NCCL found).
bool nccl_available();

// NCCL over device tensors on the current CUDA device; rank 0 of the group publishes the NCCL id
// under "nccl/<name>/id". Collectives that do not finish within `timeout` abort the communicator
// and fail naming the collective and the group.
std::unique_ptr<Communicator> connect_nccl(TcpStoreClient& store, const std::string& name, int rank, int group_size,
                                           std::chrono::milliseconds timeout);

}  // namespace moeforge::parallel
