// The Communicator over NCCL for device tensors (on the current CUDA device). The unique id goes
// from the group's rank 0 to the others through moeforge's TCP store. Initialisation is
// non-blocking and polled against the group's deadline (a member that never comes is a timeout,
// not a hang); the collectives then run on a blocking communicator split from it (cheaper per
// call), and each call waits for its collective while watching the deadline and NCCL's
// asynchronous error, so a dead or silent peer becomes an error naming the collective (after
// aborting the communicator). Waiting per call keeps the semantics of the gloo backend;
// overlapping communication with compute is the next step (issue 6).
#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "core/error.h"
#include "parallel/collective_shapes.h"
#include "parallel/communicator.h"
#include "ops/cuda/check.h"
#include "ops/cuda/runtime.h"

namespace moeforge::parallel {

namespace {

using Clock = std::chrono::steady_clock;

ncclDataType_t nccl_type(DType dt, const std::string& where) {
  switch (dt) {
    case DType::F32: return ncclFloat32;
    case DType::F64: return ncclFloat64;
    case DType::BF16: return ncclBfloat16;
    case DType::F16: return ncclFloat16;
    case DType::I64: return ncclInt64;
    case DType::I32: return ncclInt32;
    case DType::U8: return ncclUint8;
    default: MF_THROW(where, ": dtype ", dtype_name(dt), " is not supported by NCCL");
  }
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(TcpStoreClient& store, std::string name, int rank, int size, std::chrono::milliseconds timeout)
      : name_(std::move(name)), rank_(rank), size_(size), timeout_(timeout) {
    MF_CHECK(size >= 1 && rank >= 0 && rank < size, "nccl group '", name_, "': rank ", rank, " of ", size);
    ncclUniqueId id;
    const std::string key = "nccl/" + name_ + "/id";
    if (rank == 0) {
      check(ncclGetUniqueId(&id), "ncclGetUniqueId");
      store.set(key, std::string(reinterpret_cast<const char*>(&id), sizeof id));
    } else {
      const auto v = store.get(key, timeout);
      MF_CHECK(v && v->size() == sizeof id, "nccl group '", name_, "': rank 0 never published the NCCL id within ",
               timeout.count() / 1000.0, " s");
      std::memcpy(&id, v->data(), sizeof id);
    }
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    ncclResult_t r = ncclCommInitRankConfig(&comm_, size, id, rank, &config);
    if (r != ncclSuccess && r != ncclInProgress) fail("init", r);
    wait_comm("init");
    // Every member is in. Collectives on a non-blocking communicator go through NCCL's
    // asynchronous launch path, about 0.1 ms each (measured: a 4 KB all-reduce on 2 H200s takes
    // 0.12 ms non-blocking, 0.02 ms blocking; docs/perf-notes.md), which is most of a small
    // collective and a MoE layer makes several. So the group continues on a blocking copy of
    // itself, split from the non-blocking one; the wait after each collective still watches the
    // deadline and NCCL's asynchronous error, and aborts.
    ncclConfig_t fast = NCCL_CONFIG_INITIALIZER;
    fast.blocking = 1;
    ncclComm_t child = nullptr;
    r = ncclCommSplit(comm_, 0, rank, &child, &fast);
    if (r != ncclSuccess && r != ncclInProgress) fail("init (split)", r);
    wait_comm("init (split)");
    parent_ = comm_;
    comm_ = child;
    wait_comm("init (split)");
    barrier_buf_ = cuda::empty({1}, DType::F32, "the NCCL barrier word");
    // The group's own stream: collectives start after the device work enqueued before them (an
    // event on the compute stream) and run beside whatever is enqueued after (overlap).
    MF_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    MF_CUDA_CHECK(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
  }

  ~NcclCommunicator() override {
    if (comm_) ncclCommDestroy(comm_);
    if (parent_) ncclCommDestroy(parent_);
    if (ready_) cudaEventDestroy(ready_);
    if (stream_) cudaStreamDestroy(stream_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }
  const char* backend() const override { return "nccl"; }

  void all_reduce_sum(Tensor& t) override {
    if (t.numel() == 0) return;
    launch("all_reduce", ncclAllReduce(t.raw(), t.raw(), t.numel(), nccl_type(t.dtype(), where("all_reduce")), ncclSum,
                                       comm_, stream()));
  }

  void all_reduce_sum_many(const std::vector<Tensor*>& ts) override {
    ncclResult_t res = ncclGroupStart();
    for (Tensor* t : ts)
      if (res == ncclSuccess && t->numel() > 0)
        res = ncclAllReduce(t->raw(), t->raw(), t->numel(), nccl_type(t->dtype(), where("all_reduce")), ncclSum, comm_,
                            stream());
    const ncclResult_t end = ncclGroupEnd();
    launch("all_reduce (grouped)", res != ncclSuccess ? res : end);
  }

  void reduce_scatter_sum(const Tensor& in, Tensor& out) override {
    check_blocks(*this, "reduce_scatter", in, out);
    launch("reduce_scatter", ncclReduceScatter(in.raw(), out.raw(), out.numel(), nccl_type(in.dtype(), where("reduce_scatter")),
                                               ncclSum, comm_, stream()));
  }

  void all_gather(const Tensor& in, Tensor& out) override {
    check_blocks(*this, "all_gather", out, in);
    launch("all_gather", ncclAllGather(in.raw(), out.raw(), in.numel(), nccl_type(in.dtype(), where("all_gather")), comm_,
                                       stream()));
  }

  void all_to_all(const Tensor& in, const std::vector<int64_t>& send_rows, Tensor& out,
                  const std::vector<int64_t>& recv_rows) override {
    launch("all_to_all", enqueue_all_to_all(in, send_rows, out, recv_rows));
  }

  std::unique_ptr<Pending> all_to_all_async(const Tensor& in, const std::vector<int64_t>& send_rows, Tensor& out,
                                            const std::vector<int64_t>& recv_rows) override {
    const ncclResult_t r = enqueue_all_to_all(in, send_rows, out, recv_rows);
    if (!comm_) MF_THROW("collective all_to_all on group '", name_, "': the communicator was aborted by an earlier failure");
    if (r != ncclSuccess && r != ncclInProgress) fail("all_to_all", r);
    return std::make_unique<InFlight>(*this, "all_to_all");
  }

  // A collective enqueued on the group's stream: done once an event recorded after it fires.
  class InFlight final : public Pending {
   public:
    InFlight(NcclCommunicator& c, const char* op) : c_(c), op_(op) {
      MF_CUDA_CHECK(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
      MF_CUDA_CHECK(cudaEventRecord(done_, c.stream_));
    }
    ~InFlight() override {
      if (done_) cudaEventDestroy(done_);
    }
    void wait() override {
      const auto start = Clock::now(), deadline = start + c_.wait_within(c_.timeout_);
      for (;;) {
        const cudaError_t q = cudaEventQuery(done_);
        if (q == cudaSuccess) return;
        if (q != cudaErrorNotReady) MF_THROW("collective ", op_, " on group '", c_.name_, "': CUDA error ", cudaGetErrorString(q));
        c_.check_async(op_);
        if (Clock::now() > deadline) c_.timed_out(op_);
        pause(start);
      }
    }

   private:
    NcclCommunicator& c_;
    const char* op_;
    cudaEvent_t done_ = nullptr;
  };

 private:
  ncclResult_t enqueue_all_to_all(const Tensor& in, const std::vector<int64_t>& send_rows, Tensor& out,
                                  const std::vector<int64_t>& recv_rows) {
    const int64_t rb = check_all_to_all(*this, in, send_rows, out, recv_rows);
    const char* src = static_cast<const char*>(in.raw());
    char* dst = static_cast<char*>(out.raw());
    // One group of point-to-point calls: NCCL pairs every send with its peer's receive.
    ncclResult_t res = ncclGroupStart();
    int64_t so = 0, ro = 0;
    for (int p = 0; p < size_ && res == ncclSuccess; ++p) {
      const size_t sb = static_cast<size_t>(send_rows[p] * rb);
      const size_t rbytes = static_cast<size_t>(recv_rows[p] * rb);
      if (sb) res = ncclSend(src + so, sb, ncclUint8, p, comm_, stream());
      if (res == ncclSuccess && rbytes) res = ncclRecv(dst + ro, rbytes, ncclUint8, p, comm_, stream());
      so += static_cast<int64_t>(sb);
      ro += static_cast<int64_t>(rbytes);
    }
    const ncclResult_t end = ncclGroupEnd();
    return res != ncclSuccess ? res : end;
  }

 public:
  void broadcast(Tensor& t, int root) override {
    MF_CHECK(root >= 0 && root < size_, where("broadcast"), ": root ", root, " is not a rank");
    if (t.numel() == 0) return;
    launch("broadcast", ncclBroadcast(t.raw(), t.raw(), t.numel(), nccl_type(t.dtype(), where("broadcast")), root, comm_,
                                      stream()));
  }

  void all_gather_blocks(const std::vector<Tensor>& ts) override {
    launch("all_gather_blocks", enqueue_all_gather_blocks(ts));
  }

  std::unique_ptr<Pending> all_gather_blocks_async(const std::vector<Tensor>& ts) override {
    const ncclResult_t r = enqueue_all_gather_blocks(ts);
    if (!comm_) MF_THROW("collective all_gather_blocks on group '", name_, "': the communicator was aborted by an earlier failure");
    if (r != ncclSuccess && r != ncclInProgress) fail("all_gather_blocks", r);
    return std::make_unique<InFlight>(*this, "all_gather_blocks");
  }

  // One group of broadcasts: rank p's block of every tensor from p to all.
  ncclResult_t enqueue_all_gather_blocks(const std::vector<Tensor>& ts) {
    ncclResult_t res = ncclGroupStart();
    for (const Tensor& t : ts) {
      const size_t es = dtype_size(t.dtype());
      char* base = static_cast<char*>(t.raw());
      for (int p = 0; p < size_ && res == ncclSuccess; ++p) {
        const Block b = block_of(t.numel(), p, size_);
        if (b.count == 0) continue;
        char* at = base + b.first * es;
        res = ncclBroadcast(at, at, static_cast<size_t>(b.count) * es, ncclUint8, p, comm_, stream());
      }
    }
    const ncclResult_t end = ncclGroupEnd();
    return res != ncclSuccess ? res : end;
  }

  void reduce_scatter_blocks(const std::vector<Tensor>& ts) override {
    ncclResult_t res = ncclGroupStart();
    for (const Tensor& t : ts) {
      const size_t es = dtype_size(t.dtype());
      const ncclDataType_t type = nccl_type(t.dtype(), where("reduce_scatter_blocks"));
      char* base = static_cast<char*>(t.raw());
      for (int p = 0; p < size_ && res == ncclSuccess; ++p) {
        const Block b = block_of(t.numel(), p, size_);
        if (b.count == 0) continue;
        char* at = base + b.first * es;
        res = ncclReduce(at, at, static_cast<size_t>(b.count), type, ncclSum, p, comm_, stream());
      }
    }
    const ncclResult_t end = ncclGroupEnd();
    launch("reduce_scatter_blocks", res != ncclSuccess ? res : end);
  }

  void barrier() override {
    launch("barrier", ncclAllReduce(barrier_buf_.raw(), barrier_buf_.raw(), 1, ncclFloat32, ncclSum, comm_,
                                    stream()));
  }

 private:
  std::string where(const char* op) const { return std::string(op) + " on group '" + name_ + "'"; }

  void check(ncclResult_t r, const char* what) const {
    MF_CHECK(r == ncclSuccess, "nccl group '", name_, "': ", what, " failed: ", ncclGetErrorString(r));
  }

  [[noreturn]] void fail(const char* op, ncclResult_t r) {
    const std::string msg = ncclGetErrorString(r);
    const char* last = ncclGetLastError(comm_);
    abort_all();
    MF_THROW("collective ", op, " on group '", name_, "' failed at rank ", rank_, " of ", size_, ": ", msg,
             last && *last ? std::string(" (") + last + ")" : std::string());
  }

  // Polls the communicator until it is ready (ncclInProgress while a non-blocking call runs).
  void wait_comm(const char* op) {
    const auto start = Clock::now(), deadline = start + wait_within(timeout_);
    for (;;) {
      ncclResult_t st = ncclSuccess;
      ncclCommGetAsyncError(comm_, &st);
      if (st == ncclSuccess) return;
      if (st != ncclInProgress) fail(op, st);
      if (Clock::now() > deadline) timed_out(op);
      pause(start);
    }
  }

  // Between polls: spin for the first milliseconds (a collective on NVLink takes well under one,
  // and a sleep can last a millisecond or more in a VM, which cost 5-10 ms per MoE layer's
  // exchange), then sleep so that a long wait does not burn a core.
  static void pause(Clock::time_point start) {
    if (Clock::now() - start < std::chrono::milliseconds(20))
      std::this_thread::yield();
    else
      std::this_thread::sleep_for(std::chrono::microseconds(200));
  }

  // The group's stream, made to wait for the device work enqueued so far on the compute stream.
  cudaStream_t stream() {
    MF_CUDA_CHECK(cudaEventRecord(ready_, cuda::current_stream()));
    MF_CUDA_CHECK(cudaStreamWaitEvent(stream_, ready_, 0));
    return stream_;
  }

  void check_async(const char* op) {
    ncclResult_t st = ncclSuccess;
    if (comm_) ncclCommGetAsyncError(comm_, &st);
    if (st != ncclSuccess && st != ncclInProgress) fail(op, st);
  }

  // Enqueued: wait for the stream, watching NCCL's asynchronous error and the deadline.
  void launch(const char* op, ncclResult_t r) {
    if (!comm_) MF_THROW("collective ", op, " on group '", name_, "': the communicator was aborted by an earlier failure");
    if (r != ncclSuccess && r != ncclInProgress) fail(op, r);
    wait_comm(op);
    const auto start = Clock::now(), deadline = start + wait_within(timeout_);
    for (;;) {
      const cudaError_t q = cudaStreamQuery(stream_);
      if (q == cudaSuccess) return;
      if (q != cudaErrorNotReady) MF_THROW("collective ", op, " on group '", name_, "': CUDA error ", cudaGetErrorString(q));
      ncclResult_t st = ncclSuccess;
      ncclCommGetAsyncError(comm_, &st);
      if (st != ncclSuccess && st != ncclInProgress) fail(op, st);
      if (Clock::now() > deadline) timed_out(op);
      pause(start);
    }
  }

  void abort_all() {
    if (comm_) ncclCommAbort(comm_);
    if (parent_) ncclCommAbort(parent_);
    comm_ = parent_ = nullptr;
  }

  [[noreturn]] void timed_out(const char* op) {
    abort_all();
    const std::string peers = timeout_diagnosis();
    MF_THROW("collective ", op, " on group '", name_, "' did not complete within ", timeout_.count() / 1000.0,
             " s at rank ", rank_, " of ", size_, " (a peer died or is not taking part", peers.empty() ? "" : "; ", peers,
             ")");
  }

  std::string name_;
  int rank_, size_;
  std::chrono::milliseconds timeout_;
  ncclComm_t comm_ = nullptr;
  ncclComm_t parent_ = nullptr;  // the non-blocking communicator the group was initialised on
  cudaStream_t stream_ = nullptr;
  cudaEvent_t ready_ = nullptr;
  Tensor barrier_buf_;
};

}  // namespace

bool nccl_available() { return true; }

std::unique_ptr<Communicator> connect_nccl(TcpStoreClient& store, const std::string& name, int rank, int group_size,
                                           std::chrono::milliseconds timeout) {
  return std::make_unique<NcclCommunicator>(store, name, rank, group_size, timeout);
}

}  // namespace moeforge::parallel
