#include "gpu/device_params.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "core/error.h"
#include "ops/cuda/ops_cuda.h"
#include "ops/cuda/runtime.h"

namespace moeforge::gpu {

DeviceParams::DeviceParams(const nn::ParamStore& host, Precision precision) : precision_(precision) {
  const DType dt = gpu::compute_dtype(precision);
  for (const nn::Param& p : host.all()) {
    MF_CHECK(p.value.defined(), "parameter ", p.name, " has no value (was the checkpoint loaded?)");
    values_.push_back(cuda::to_device(p.value, dt));
    // A frozen base weight (LoRA) is only read: no F32 master beside its compute copy.
    if (precision == Precision::BF16Mixed)
      masters_.push_back(p.frozen ? Tensor() : cuda::to_device(p.value, DType::F32));
    shapes_.push_back(p.shape);
    add_param_slot(p.decay, p.trainable, p.frozen);
  }
}

DeviceParams DeviceParams::random(const nn::ParamStore& shapes, Precision precision, float std, uint64_t seed) {
  DeviceParams d(precision);
  const DType dt = gpu::compute_dtype(precision);
  for (const nn::Param& p : shapes.all()) {
    const bool one_dim = p.shape.size() == 1;
    const bool master = precision == Precision::BF16Mixed && !p.frozen;  // a frozen base weight keeps none
    Tensor v = cuda::empty(p.shape, master ? DType::F32 : dt, "a parameter");
    if (one_dim) cuda::fill(v, 1.f);
    else cuda::fill_normal(v, 0.f, std, seed + 0x1000 * d.values_.size());
    if (master) {
      d.masters_.push_back(v);
      Tensor c = cuda::empty(p.shape, DType::BF16, "a parameter");
      d.values_.push_back(c);
    } else {
      if (precision == Precision::BF16Mixed) d.masters_.emplace_back();  // index for index with the values
      d.values_.push_back(v);
    }
    d.shapes_.push_back(p.shape);
    d.add_param_slot(p.decay, p.trainable, p.frozen);
  }
  if (precision == Precision::BF16Mixed)
    for (size_t i = 0; i < d.values_.size(); ++i)
      if (d.masters_[i].defined()) cuda::convert(d.masters_[i], d.values_[i]);
  return d;
}

void DeviceParams::add_param_slot(bool decay, bool trainable, bool frozen) {
  grads_.emplace_back();
  written_rows_.emplace_back();
  squares_.emplace_back();
  decay_.push_back(decay);
  trainable_.push_back(trainable);
  frozen_.push_back(frozen);
}

namespace {

// The flat elements [b.first, b.first + b.count) of a device tensor, as a 1-D view.
Tensor flat_block(const Tensor& t, parallel::Block b) { return t.view({t.numel()}).slice0(b.first, b.count); }

}  // namespace

const Tensor& DeviceParams::value(size_t i) const {
  const Tensor& v = values_.at(i);
  MF_CHECK(v.defined(), "internal: parameter ", i, " is sharded (ZeRO-3) and was used without being gathered");
  return v;
}

const Tensor& DeviceParams::exact(size_t i) const {
  if (masters_.empty() || sharded(i)) return value(i);
  return masters_.at(i).defined() ? masters_.at(i) : value(i);
}

Device DeviceParams::device() const { return Device::cuda(0); }  // one device per process (allocator.cpp)

Tensor& DeviceParams::master(size_t i) {
  if (sharded(i)) return shard_masters_.at(i).defined() ? shard_masters_.at(i) : shard_values_.at(i);
  return masters_.empty() ? values_.at(i) : masters_.at(i);
}

Tensor& DeviceParams::grad_for_write(size_t i, bool& accumulate) {
  zero_unwritten(i);  // a second contribution adds to every row
  squares_.at(i) = Tensor();  // and changes the sum of squares
  Tensor& g = grads_.at(i);
  accumulate = g.defined();
  if (!g.defined()) {
    // 1-D parameters (norm weights, biases) keep F32 gradients: their kernels accumulate in F32.
    const Shape& shape = shapes_.at(i);
    g = cuda::empty(shape, shape.size() == 1 ? DType::F32 : gpu::compute_dtype(precision_), "a parameter gradient");
  }
  return g;
}

Tensor& DeviceParams::grad(size_t i) {
  bool accumulate = false;
  Tensor& g = grad_for_write(i, accumulate);
  if (!accumulate) cuda::zero(g);
  return g;
}

namespace {
// The A/B switches of this file: a saving is on unless its variable is set to 0.
bool env_is_zero(const char* name) {
  const char* v = std::getenv(name);
  return v && std::strcmp(v, "0") == 0;
}

// MOEFORGE_GRAD_ROW_FLAGS=0: every site writes its whole gradient (zeros included), as before row
// flags; for measuring them.
bool row_flags_enabled() {
  static const bool yes = !env_is_zero("MOEFORGE_GRAD_ROW_FLAGS");
  return yes;
}

// MOEFORGE_GRAD_SQUARES=0: the gradient norm reads every gradient, as before the partial squares;
// for measuring them (`run.sh envab`).
bool squares_enabled() {
  static const bool yes = !env_is_zero("MOEFORGE_GRAD_SQUARES");
  return yes;
}
}  // namespace

Tensor* DeviceParams::written_rows(size_t i, int64_t rows) {
  MF_CHECK(grads_.at(i).defined() && !written_rows_.at(i).defined(),
           "internal: row flags asked for a gradient that was not just handed out for writing");
  if (!row_flags_enabled() || sharded(i) || rows < 1 || numel(i) % rows != 0) return nullptr;
  written_rows_[i] = cuda::empty({rows}, DType::U8, "a gradient's written-row flags");
  return &written_rows_[i];
}

Tensor* DeviceParams::squares_out(size_t i) {
  MF_CHECK(grads_.at(i).defined() && !squares_.at(i).defined(),
           "internal: partial squares asked for a gradient that was not just handed out for writing");
  if (!keep_squares_ || !squares_enabled() || sharded(i)) return nullptr;
  return &squares_[i];
}

const Tensor* DeviceParams::grad_squares(size_t i) const {
  const Tensor& s = squares_.at(i);
  return s.defined() && grads_.at(i).defined() ? &s : nullptr;
}

void DeviceParams::zero_unwritten(size_t i) {
  Tensor& flags = written_rows_.at(i);
  if (!flags.defined()) return;
  cuda::zero_unwritten_rows(grads_.at(i), flags);
  flags = Tensor();
}

Tensor& DeviceParams::grad_as_written(size_t i, Tensor& written) {
  written = written_rows_.at(i);
  if (!grads_.at(i).defined()) return grad(i);
  return grads_[i];
}

Tensor& DeviceParams::shard_grad(size_t i) {
  MF_CHECK(sharded(i), "internal: parameter ", i, " has no block gradient (not sharded)");
  Tensor& g = shard_grads_.at(i);
  if (!g.defined()) {
    const DType dt = shapes_.at(i).size() == 1 ? DType::F32 : gpu::compute_dtype(precision_);
    g = cuda::empty({shard_values_.at(i).numel()}, dt, "a parameter's block gradient");
    cuda::zero(g);
  }
  return g;
}

void DeviceParams::shard(const std::vector<parallel::Communicator*>& group_of) {
  MF_CHECK(group_of.size() == values_.size(), "internal: ZeRO-3 groups for ", group_of.size(), " of ", values_.size(),
           " parameters");
  group_of_.assign(values_.size(), nullptr);
  shard_values_.resize(values_.size());
  shard_masters_.resize(values_.size());
  shard_grads_.resize(values_.size());
  // Every block is copied out before any whole value is freed, and the freed memory goes back to
  // the device: otherwise the caching allocator hands a block the whole value's freed memory
  // (it reuses blocks up to twice the size asked for), and nothing would be saved.
  for (size_t i = 0; i < values_.size(); ++i) {
    parallel::Communicator* g = group_of[i];
    // Every rank needs a block (block_of leaves the last ones empty when there are few elements).
    // Buffers stay whole; LoRA's frozen base weights are split like trained ones (gathered per layer,
    // no gradient blocks).
    if (!g || g->size() == 1 || (!trainable_[i] && !frozen_[i]) ||
        parallel::block_of(numel(i), g->size() - 1, g->size()).count == 0)
      continue;
    group_of_[i] = g;
    const parallel::Block b = block(i);
    shard_values_[i] = cuda::copy(flat_block(values_[i], b), "a parameter's block");
    if (!masters_.empty() && masters_[i].defined())
      shard_masters_[i] = cuda::copy(flat_block(masters_[i], b), "a parameter's F32 master block");
    if (std::find(groups_.begin(), groups_.end(), g) == groups_.end()) groups_.push_back(g);
  }
  for (size_t i = 0; i < values_.size(); ++i) {
    if (!sharded(i)) continue;
    values_[i] = Tensor();
    if (!masters_.empty()) masters_[i] = Tensor();
    grads_[i] = Tensor();
    written_rows_[i] = Tensor();
    squares_[i] = Tensor();
  }
  cuda::synchronize();
  cuda::empty_cache();
}

parallel::Block DeviceParams::block(size_t i) const {
  const parallel::Communicator* g = group_of_.at(i);
  return parallel::block_of(numel(i), g->rank(), g->size());
}

Tensor DeviceParams::whole_buffer(size_t i) {
  const DType dt = shard_values_[i].dtype();
  for (size_t k = 0; k < spare_.size(); ++k)
    if (spare_[k].numel() == numel(i) && spare_[k].dtype() == dt) {
      Tensor t = spare_[k].view(shapes_[i]);
      spare_.erase(spare_.begin() + static_cast<std::ptrdiff_t>(k));
      return t;
    }
  return cuda::empty(shapes_[i], dt, "a gathered parameter");
}

std::vector<std::pair<parallel::Communicator*, std::vector<Tensor>>> DeviceParams::start_gather(
    const std::vector<size_t>& indices, std::vector<size_t>& started) {
  // One collective per group, the groups in a fixed order: every rank issues the same sequence.
  std::vector<std::pair<parallel::Communicator*, std::vector<Tensor>>> per_group;
  for (parallel::Communicator* g : groups_) per_group.emplace_back(g, std::vector<Tensor>{});
  for (size_t i : indices) {
    if (!sharded(i) || values_[i].defined()) continue;
    values_[i] = whole_buffer(i);
    Tensor mine = flat_block(values_[i], block(i));
    cuda::convert(shard_values_[i], mine);
    for (auto& [g, ts] : per_group)
      if (g == group_of_[i]) ts.push_back(values_[i]);
    started.push_back(i);
  }
  return per_group;
}

void DeviceParams::gather(const std::vector<size_t>& indices) {
  if (groups_.empty()) return;
  // Prefetches covering any of these: wait for them.
  for (size_t k = 0; k < inflight_.size();) {
    bool needed = false;
    for (size_t i : inflight_[k].indices)
      for (size_t j : indices) needed = needed || i == j;
    if (!needed) {
      ++k;
      continue;
    }
    for (auto& p : inflight_[k].pending) p->wait();
    inflight_.erase(inflight_.begin() + static_cast<std::ptrdiff_t>(k));
  }
  std::vector<size_t> started;
  for (auto& [g, ts] : start_gather(indices, started))
    if (!ts.empty()) g->all_gather_blocks(ts);
}

void DeviceParams::prefetch(const std::vector<size_t>& indices) {
  if (groups_.empty()) return;
  InFlight f;
  for (auto& [g, ts] : start_gather(indices, f.indices))
    if (!ts.empty()) f.pending.push_back(g->all_gather_blocks_async(ts));
  if (!f.indices.empty()) inflight_.push_back(std::move(f));
}

void DeviceParams::release(const std::vector<size_t>& indices) {
  for (size_t i : indices) {
    if (!sharded(i) || !values_[i].defined()) continue;
    for (const InFlight& f : inflight_)
      for (size_t j : f.indices)
        MF_CHECK(j != i, "internal: parameter ", i, " released while its gather is under way");
    // Spare buffers per size: enough for two layers in flight with two tensors of a size each
    // (k and v projections, q and k norms).
    int same = 0;
    for (const Tensor& t : spare_) same += t.numel() == values_[i].numel() && t.dtype() == values_[i].dtype();
    if (same < 4) spare_.push_back(values_[i]);
    values_[i] = Tensor();
  }
}

void DeviceParams::scatter_grads(const std::vector<size_t>& indices) {
  for (parallel::Communicator* g : groups_) {  // one collective per group, in a fixed order
    std::vector<size_t> which;
    std::vector<Tensor> whole;
    for (size_t i : indices) {
      if (!sharded(i) || group_of_[i] != g || !trainable_[i]) continue;  // a frozen weight has no gradient
      which.push_back(i);
      whole.push_back(grad(i));  // zeros where backward never wrote it: every rank sends the same list
    }
    if (whole.empty()) continue;
    g->reduce_scatter_blocks(whole);
    for (size_t k = 0; k < which.size(); ++k) {
      const size_t i = which[k];
      cuda::add_inplace(shard_grad(i), flat_block(whole[k], block(i)));
      grads_[i] = Tensor();
      squares_[i] = Tensor();
    }
  }
}

void DeviceParams::release_grads(const std::vector<size_t>& indices) {
  for (size_t i : indices) {
    grads_.at(i) = Tensor();
    written_rows_.at(i) = Tensor();
    squares_.at(i) = Tensor();
    if (sharded(i)) shard_grads_.at(i) = Tensor();
  }
}

// Dropping the gradients is zeroing them: grad() allocates zeroed, and grad_for_write() lets the
// next step's first GEMM write them without a memset and without reading them (and between steps
// the allocator can hand their memory to activations).
void DeviceParams::zero_grad() {
  for (auto* list : {&grads_, &shard_grads_, &written_rows_, &squares_})
    for (Tensor& t : *list) t = Tensor();
}

void DeviceParams::copy_to_host(nn::ParamStore& host) const {
  auto& all = host.all();
  MF_CHECK(all.size() == values_.size(), "copy_to_host: the host store has ", all.size(), " parameters, the device ",
           values_.size());
  for (size_t i = 0; i < all.size(); ++i) {
    if (frozen_[i]) continue;  // unchanged since the load (and freed on the host): LoRA saves only adapters
    if (sharded(i)) {  // the blocks of every rank into one whole (a collective)
      const Tensor& part = shard_masters_[i].defined() ? shard_masters_[i] : shard_values_[i];
      Tensor whole = cuda::empty(shapes_[i], part.dtype(), "a gathered parameter for the host");
      Tensor mine = flat_block(whole, block(i));
      cuda::convert(part, mine);
      group_of_[i]->all_gather_blocks({whole});
      all[i].value = cuda::to_host_f32(whole).view(all[i].shape);
      continue;
    }
    Tensor v = cuda::to_host_f32(masters_.empty() || !masters_[i].defined() ? values_[i] : masters_[i]);
    all[i].value = v.view(all[i].shape);
  }
}

int64_t DeviceParams::bytes() const {
  int64_t b = 0;
  for (const auto* list : {&values_, &grads_, &masters_, &shard_values_, &shard_masters_, &shard_grads_})
    for (const Tensor& t : *list) b += static_cast<int64_t>(t.nbytes());
  return b;
}

}  // namespace moeforge::gpu
