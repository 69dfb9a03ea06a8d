// The Communicator over gloo's TCP transport (Debian's libgloo-dev): host tensors, one full mesh of
// connections per group, set up through moeforge's TCP store.
#include <gloo/allgather.h>
#include <gloo/allreduce.h>
#include <gloo/alltoallv.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/math.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/device.h>

#include <cstring>
#include <exception>
#include <functional>

#include "core/error.h"
#include "parallel/collective_shapes.h"
#include "parallel/communicator.h"

namespace moeforge::parallel {

namespace {

using ms = std::chrono::milliseconds;

// gloo's view of moeforge's store; keys live under "gloo/<group>/". A key that never appears
// (a member that never connected) fails with the key and the group rather than waiting forever.
class StoreAdapter final : public gloo::rendezvous::Store {
 public:
  StoreAdapter(TcpStoreClient& store, std::string group, ms timeout)
      : store_(store), prefix_("gloo/" + group + "/"), group_(std::move(group)), timeout_(timeout) {}
  void set(const std::string& key, const std::vector<char>& data) override {
    store_.set(prefix_ + key, std::string(data.begin(), data.end()));
  }
  std::vector<char> get(const std::string& key) override {
    const std::optional<std::string> v = store_.get(prefix_ + key, timeout_);
    if (!v)
      MF_THROW("gloo group '", group_, "': member '", key, "' never published its address within ",
               timeout_.count() / 1000.0, " s (a rank of the group never connected)");
    return std::vector<char>(v->begin(), v->end());
  }
  void wait(const std::vector<std::string>& keys) override { wait(keys, timeout_); }
  void wait(const std::vector<std::string>& keys, const ms&) override {
    for (const std::string& k : keys) get(k);
  }

 private:
  TcpStoreClient& store_;
  std::string prefix_, group_;
  ms timeout_;
};

using ReduceFn = void (*)(void*, const void*, const void*, size_t);

class GlooCommunicator final : public Communicator {
 public:
  GlooCommunicator(TcpStoreClient& store, std::string name, int rank, int size, const std::string& host, ms timeout)
      : name_(std::move(name)), rank_(rank), size_(size), timeout_(timeout) {
    MF_CHECK(size >= 1 && rank >= 0 && rank < size, "gloo group '", name_, "': rank ", rank, " of ", size);
    guard("connect", [&] {
      gloo::transport::tcp::attr attr;
      attr.hostname = host;
      device_ = gloo::transport::tcp::CreateDevice(attr);
      auto ctx = std::make_shared<gloo::rendezvous::Context>(rank, size);
      ctx->setTimeout(timeout);
      StoreAdapter adapter(store, name_, timeout);
      ctx->connectFullMesh(adapter, device_);
      context_ = ctx;
    });
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }
  const char* backend() const override { return "gloo"; }

  void all_reduce_sum(Tensor& t) override {
    if (t.numel() == 0) return;
    const ReduceFn fn = sum_fn(t.dtype(), "all_reduce");
    guard("all_reduce", [&] {
      gloo::AllreduceOptions opts(context_);
      set_typed_output(opts, t);  // in place: no inputs set
      opts.setReduceFunction(fn);
      opts.setTimeout(wait_within(timeout_));
      gloo::allreduce(opts);
    });
  }

  // F32 tensors as one flat buffer, one round trip (a collective per tensor costs a round trip
  // each, which dominates a step's gradient sums on small models).
  void all_reduce_sum_many(const std::vector<Tensor*>& ts) override {
    int64_t total = 0;
    for (const Tensor* t : ts) {
      if (t->dtype() != DType::F32) return Communicator::all_reduce_sum_many(ts);
      total += t->numel();
    }
    if (total == 0) return;
    Tensor flat = Tensor::empty({total}, DType::F32);
    int64_t at = 0;
    for (const Tensor* t : ts) {
      std::memcpy(flat.f32() + at, t->f32(), t->nbytes());
      at += t->numel();
    }
    all_reduce_sum(flat);
    at = 0;
    for (Tensor* t : ts) {
      std::memcpy(t->f32(), flat.f32() + at, t->nbytes());
      at += t->numel();
    }
  }

  void reduce_scatter_sum(const Tensor& in, Tensor& out) override {
    check_blocks(*this, "reduce_scatter", in, out);
    sum_fn(in.dtype(), "reduce_scatter");
    // Block p goes to rank p; the received blocks are summed in rank order (deterministic).
    const int64_t block = out.numel();
    Tensor recv = Tensor::empty({size_ * block}, in.dtype());
    const std::vector<int64_t> counts(size_, block);
    exchange_bytes("reduce_scatter", in, counts, recv, counts, dtype_size(in.dtype()));
    if (in.dtype() == DType::F32) {
      sum_blocks(recv.f32(), out.f32(), block);
    } else if (in.dtype() == DType::F64) {
      sum_blocks(recv.data<double>(), out.data<double>(), block);
    } else {
      sum_blocks(recv.i64(), out.i64(), block);
    }
  }

  void all_gather(const Tensor& in, Tensor& out) override {
    check_blocks(*this, "all_gather", out, in);
    if (in.numel() == 0) return;
    guard("all_gather", [&] {
      gloo::AllgatherOptions opts(context_);
      opts.setInput(static_cast<char*>(in.raw()), in.nbytes());
      opts.setOutput(static_cast<char*>(out.raw()), out.nbytes());
      opts.setTimeout(wait_within(timeout_));
      gloo::allgather(opts);
    });
  }

  void all_to_all(const Tensor& in, const std::vector<int64_t>& send_rows, Tensor& out,
                  const std::vector<int64_t>& recv_rows) override {
    const int64_t row_bytes = check_all_to_all(*this, in, send_rows, out, recv_rows);
    exchange_bytes("all_to_all", in, send_rows, out, recv_rows, row_bytes);
  }

  void broadcast(Tensor& t, int root) override {
    MF_CHECK(root >= 0 && root < size_, "broadcast on group '", name_, "': root ", root, " is not a rank");
    if (t.numel() == 0) return;
    guard("broadcast", [&] {
      gloo::BroadcastOptions opts(context_);
      opts.setOutput(static_cast<char*>(t.raw()), t.nbytes());
      opts.setRoot(root);
      opts.setTimeout(wait_within(timeout_));
      gloo::broadcast(opts);
    });
  }

  void barrier() override {
    guard("barrier", [&] {
      gloo::BarrierOptions opts(context_);
      opts.setTimeout(wait_within(timeout_));
      gloo::barrier(opts);
    });
  }

 private:
  // gloo reports a dead or silent peer by throwing (IoException, timeouts); one message names the
  // collective, the group and this rank.
  void guard(const char* op, const std::function<void()>& body) {
    try {
      body();
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      const std::string peers = timeout_diagnosis();
      MF_THROW("collective ", op, " on group '", name_, "' failed at rank ", rank_, " of ", size_,
               " (a peer died, or did not take part within ", timeout_.count() / 1000.0, " s", peers.empty() ? "" : "; ",
               peers, "): ", e.what());
    }
  }

  ReduceFn sum_fn(DType dt, const char* op) const {
    if (dt == DType::F32) return static_cast<ReduceFn>(&gloo::sum<float>);
    if (dt == DType::F64) return static_cast<ReduceFn>(&gloo::sum<double>);
    if (dt == DType::I64) return static_cast<ReduceFn>(&gloo::sum<int64_t>);
    MF_THROW(op, " on group '", name_, "': sums of ", dtype_name(dt), " are not supported (F32, F64, I64)");
  }

  void set_typed_output(gloo::AllreduceOptions& opts, Tensor& t) const {
    if (t.dtype() == DType::F32)
      opts.setOutput(t.f32(), static_cast<size_t>(t.numel()));
    else if (t.dtype() == DType::F64)
      opts.setOutput(t.data<double>(), static_cast<size_t>(t.numel()));
    else
      opts.setOutput(t.i64(), static_cast<size_t>(t.numel()));
  }

  template <class T>
  void sum_blocks(const T* recv, T* out, int64_t block) const {
    for (int64_t i = 0; i < block; ++i) out[i] = recv[i];
    for (int p = 1; p < size_; ++p)
      for (int64_t i = 0; i < block; ++i) out[i] += recv[p * block + i];
  }

  // alltoallv on bytes: `unit` bytes per counted item.
  void exchange_bytes(const char* op, const Tensor& in, const std::vector<int64_t>& send, Tensor& out,
                      const std::vector<int64_t>& recv, int64_t unit) {
    std::vector<int64_t> send_b(size_), recv_b(size_);
    for (int p = 0; p < size_; ++p) {
      send_b[p] = send[p] * unit;
      recv_b[p] = recv[p] * unit;
    }
    // gloo wants real buffers even when nothing moves; a byte of scratch stands in for empty tensors.
    char scratch_in = 0, scratch_out = 0;
    char* src = in.nbytes() ? static_cast<char*>(in.raw()) : &scratch_in;
    char* dst = out.nbytes() ? static_cast<char*>(out.raw()) : &scratch_out;
    guard(op, [&] {
      gloo::AlltoallvOptions opts(context_);
      opts.setInput(src, send_b);
      opts.setOutput(dst, recv_b);
      opts.setTimeout(wait_within(timeout_));
      gloo::alltoallv(opts);
    });
  }

  std::string name_;
  int rank_, size_;
  ms timeout_;
  std::shared_ptr<gloo::transport::Device> device_;
  std::shared_ptr<gloo::Context> context_;
};

}  // namespace

bool gloo_available() { return true; }

std::unique_ptr<Communicator> connect_gloo(TcpStoreClient& store, const std::string& name, int rank, int group_size,
                                           const std::string& host, std::chrono::milliseconds timeout) {
  return std::make_unique<GlooCommunicator>(store, name, rank, group_size, host, timeout);
}

}  // namespace moeforge::parallel
