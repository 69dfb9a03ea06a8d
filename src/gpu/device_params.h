// A model's parameters on the GPU, index for index with its host ParamStore: the compute copy
// (in the policy's compute dtype), the gradient, and under bf16-mixed the F32 master copy the
// optimizer updates. Uploaded once; the training step never moves weights across PCIe. Gradients
// are allocated when backward first writes them, so a path that applies and frees them layer by
// layer (optimizer in backward) never holds them all.
//
// ZeRO-3 (shard_replicated): the parameters every rank of a group holds a copy of keep only this
// rank's block (parallel::block_of over the flat elements) of their value, master and gradient. The
// whole value exists between gather() and release() (the model gathers a layer's before it runs
// and releases them after), the whole gradient from backward's first write until scatter_grads(),
// which sums it over the group and adds this rank's block to the block gradient.
#pragma once
#include <memory>
#include <utility>
#include <vector>

#include "core/tensor.h"
#include "parallel/communicator.h"
#include "gpu/precision.h"
#include "nn/params.h"

namespace moeforge::gpu {

class DeviceParams : public nn::ParamAccess {
 public:
  DeviceParams(const nn::ParamStore& host, Precision precision);
  // Random weights on the device for the store's shapes (no host values needed): N(0, std) for
  // matrices, 1 for 1-D parameters (norm weights), as Transformers' _init_weights; for benchmarks.
  static DeviceParams random(const nn::ParamStore& shapes, Precision precision, float std, uint64_t seed);

  Precision precision() const { return precision_; }
  size_t size() const override { return values_.size(); }
  Tensor* block_grad(size_t i) override { return sharded(i) ? &shard_grad(i) : nullptr; }
  const Shape& shape(size_t i) const { return shapes_.at(i); }
  int64_t numel(size_t i) const { return shape_numel(shapes_.at(i)); }
  // The whole value (of a sharded parameter: only while gathered).
  const Tensor& value(size_t i) const override;
  // The gradient, allocated (zeroed) on first use: F32 for 1-D parameters, the compute dtype else.
  Tensor& grad(size_t i) override;
  // Not yet allocated: allocated unzeroed, accumulate = false (nn::ParamAccess).
  Tensor& grad_for_write(size_t i, bool& accumulate) override;
  // Row flags for a gradient just handed out unzeroed (nn::ParamAccess::written_rows); null for a
  // ZeRO-3 parameter, rows that do not divide it, or under MOEFORGE_GRAD_ROW_FLAGS=0.
  Tensor* written_rows(size_t i, int64_t rows) override;
  // Partial squares of a gradient just handed out unzeroed (nn::ParamAccess::squares_out); null
  // unless keep_squares(true), for a ZeRO-3 sharded parameter, or under MOEFORGE_GRAD_SQUARES=0
  // (the A/B switch).
  Tensor* squares_out(size_t i) override;
  // Whether the steps' gradients will have their norm taken (train: always, for the log and
  // clipping; the bench: with --max-grad-norm). Off, the kernels leave no partial squares: they
  // cost ~1% of a q30-L4 step that takes no norm (docs/perf-notes.md, session 27).
  void keep_squares(bool on) { keep_squares_ = on; }
  const Tensor* grad_squares(size_t i) const override;
  // The gradient as its sites left it, for the optimizer: `written` gets its row flags (undefined:
  // every row written), and the unwritten rows are not zeroed. Never written: zeros, as grad().
  Tensor& grad_as_written(size_t i, Tensor& written) override;
  // The F32 master under bf16-mixed (whole parameters only), else the value.
  const Tensor& exact(size_t i) const override;
  Device device() const override;
  DType compute_dtype() const override { return gpu::compute_dtype(precision_); }
  bool has_grad(size_t i) const { return grads_.at(i).defined(); }
  // Frees these gradients (the optimizer-in-backward path, once they have been applied).
  void release_grads(const std::vector<size_t>& indices);
  // What the optimizer updates: the F32 master under bf16-mixed, the compute copy otherwise (of a
  // sharded parameter: its block).
  Tensor& master(size_t i);
  bool has_masters() const { return !masters_.empty(); }
  bool decay(size_t i) const { return decay_.at(i); }
  bool trainable(size_t i) const override { return trainable_.at(i); }
  // A base weight frozen under LoRA: no master, no moments, not copied back to the host.
  bool frozen(size_t i) const { return frozen_.at(i); }  // false: a buffer AdamW leaves alone

  // Frees every gradient (the next backward writes them afresh; grad() of an unwritten one is zeros).
  void zero_grad();
  // Every parameter's current value into the host store (F32 from the master when there is one);
  // with sharded parameters a collective over their group (every rank calls it).
  void copy_to_host(nn::ParamStore& host) const;

  // ZeRO-3: each trainable (or LoRA-frozen) parameter with a group in `group_of` (the ranks that hold copies of it:
  // the world for dense weights, the expert-data-parallel group for an expert shard) keeps only
  // this rank's block, if the parameter is large enough for every rank of it to get one; their
  // whole values are freed. Null or one-rank groups: left whole.
  void shard(const std::vector<parallel::Communicator*>& group_of);
  bool sharded(size_t i) const { return !group_of_.empty() && group_of_.at(i) != nullptr; }
  bool any_sharded() const { return !groups_.empty(); }
  parallel::Communicator* shard_group(size_t i) const { return group_of_.empty() ? nullptr : group_of_.at(i); }
  parallel::Block block(size_t i) const;  // a sharded parameter's block of its flat elements
  // Whole values of these parameters (the sharded ones not gathered yet: one collective; those a
  // prefetch started: waited for), and freeing them again. Unsharded parameters are left alone.
  // prefetch() starts the gather and returns (on the group's stream, overlapping the compute
  // enqueued after it). Released buffers are kept for the next gather of the same size (the next
  // layer's), a few per size, so the per-layer churn does not fragment the caching allocator.
  void gather(const std::vector<size_t>& indices) override;
  void prefetch(const std::vector<size_t>& indices) override;
  void release(const std::vector<size_t>& indices) override;
  // The whole gradients of these sharded parameters summed over the group (one collective, every
  // rank passes the same list), this rank's block added to its block gradient, the whole freed.
  void scatter_grads(const std::vector<size_t>& indices) override;
  // A sharded parameter's block: value (compute dtype) and gradient (allocated zeroed on first use).
  Tensor& shard_value(size_t i) { return shard_values_.at(i); }
  Tensor& shard_grad(size_t i);
  // Bytes held on the device by values, gradients and masters.
  int64_t bytes() const;

 private:
  explicit DeviceParams(Precision p) : precision_(p) {}
  void add_param_slot(bool decay, bool trainable, bool frozen);
  Precision precision_;
  std::vector<Shape> shapes_;
  std::vector<Tensor> values_, grads_, masters_;
  std::vector<Tensor> written_rows_;  // per gradient: its row flags while some rows are unwritten
  std::vector<Tensor> squares_;       // per gradient: partial sums of its squares, while they hold
  bool keep_squares_ = false;
  void zero_unwritten(size_t i);      // makes grads_[i] whole (its unwritten rows zeros)
  std::vector<bool> decay_, trainable_, frozen_;
  std::vector<parallel::Communicator*> group_of_;  // ZeRO-3: per parameter, its group (null: whole)
  std::vector<parallel::Communicator*> groups_;    // the distinct groups, in first-use order
  std::vector<Tensor> shard_values_, shard_masters_, shard_grads_;  // per parameter; undefined: not sharded
  // Gathers under way: the parameters each covers, one collective per group.
  struct InFlight {
    std::vector<size_t> indices;
    std::vector<std::unique_ptr<parallel::Communicator::Pending>> pending;
  };
  std::vector<InFlight> inflight_;
  std::vector<Tensor> spare_;  // released whole-value buffers, for reuse
  // Sets up the gather of the sharded, not yet gathered parameters of `indices` (a whole buffer
  // each, this rank's block copied in; appended to `started`); returns the buffers per group.
  std::vector<std::pair<parallel::Communicator*, std::vector<Tensor>>> start_gather(const std::vector<size_t>& indices,
                                                                                std::vector<size_t>& started);
  Tensor whole_buffer(size_t i);
};

}  // namespace moeforge::gpu
