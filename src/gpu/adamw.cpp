#include "gpu/adamw.h"

#include <algorithm>

#include "core/error.h"
#include "ops/ops.h"
#include "ops/cuda/ops_cuda.h"
#include "ops/cuda/runtime.h"

namespace moeforge::gpu {

namespace {

// The flat elements [b.first, b.first + b.count) of a device tensor, as a 1-D view.
Tensor flat_block(const Tensor& t, parallel::Block b) { return t.view({t.numel()}).slice0(b.first, b.count); }

}  // namespace

DeviceAdamW::DeviceAdamW(DeviceParams& params, train::AdamWOptions opts, OptimizerSharding sharding)
    : params_(params), opts_(opts), sharding_(std::move(sharding)) {
  MF_CHECK(sharding_.group_of.empty() || sharding_.group_of.size() == params.size(), "internal: optimizer sharding for ",
           sharding_.group_of.size(), " of ", params.size(), " parameters");
  const DType mdt = params.precision() == Precision::BF16 ? DType::BF16 : DType::F32;
  for (size_t i = 0; i < params.size(); ++i) {
    parallel::Communicator* g = sharding_.group_of.empty() ? nullptr : sharding_.group_of[i];
    split_.push_back(g && g->size() > 1);
    MF_CHECK(!params.sharded(i) || params.shard_group(i) == g,
             "internal: a ZeRO-3 parameter's moments split over another group than its weight");
    if (params.frozen(i)) {  // LoRA's frozen base: never updated, no moments
      exp_avg_.emplace_back();
      exp_avg_sq_.emplace_back();
      continue;
    }
    const Shape s = split_[i] ? Shape{block(i).count} : params.shape(i);
    exp_avg_.push_back(cuda::empty(s, mdt, "AdamW exp_avg"));
    exp_avg_sq_.push_back(cuda::empty(s, mdt, "AdamW exp_avg_sq"));
    cuda::zero(exp_avg_.back());
    cuda::zero(exp_avg_sq_.back());
  }
  moments_fresh_.assign(params.size(), true);
  zero_moment_rows_.resize(params.size());
  loaded_zero_rows_.resize(params.size());
}

Tensor DeviceAdamW::zero_moment_flags(size_t i, const Tensor& written_rows) {
  // What the moments were known to be before this update: taken up by it, or never.
  const bool fresh = moments_fresh_.at(i);
  moments_fresh_[i] = false;
  const Tensor loaded = std::move(loaded_zero_rows_.at(i));
  loaded_zero_rows_[i] = Tensor();
  Tensor& flags = zero_moment_rows_.at(i);
  if (!written_rows.defined() || (flags.defined() && flags.numel() != written_rows.numel())) {
    flags = Tensor();  // this update touches every row (or other rows): the flags end here
    return Tensor();
  }
  if (!flags.defined() && fresh) {
    Tensor ones = Tensor::empty({written_rows.numel()}, DType::U8);
    std::fill_n(ones.data<uint8_t>(), ones.numel(), uint8_t{1});
    flags = cuda::to_device(ones, DType::U8);
  } else if (!flags.defined() && loaded.defined() && loaded.numel() == written_rows.numel()) {
    flags = cuda::to_device(loaded, DType::U8);
  }
  return flags;
}

parallel::Block DeviceAdamW::block(size_t i) const {
  const parallel::Communicator* g = sharding_.group_of.at(i);
  return parallel::block_of(params_.numel(i), g->rank(), g->size());
}

Tensor DeviceAdamW::moment_host(const Tensor& m, size_t i) {
  if (!m.defined()) return Tensor();  // a frozen parameter's (none)
  const Shape& shape = params_.shape(i);
  if (!split_[i]) return cuda::to_host_f32(m).view(shape);
  Tensor whole = cuda::empty(shape, m.dtype(), "gathered AdamW moment");
  cuda::zero(whole);
  Tensor mine = flat_block(whole, block(i));
  if (mine.numel() > 0) cuda::convert(m, mine);
  sharding_.group_of[i]->all_gather_blocks({whole});
  return cuda::to_host_f32(whole).view(shape);
}

void DeviceAdamW::load_moments(size_t i, const Tensor& exp_avg, const Tensor& exp_avg_sq) {
  const auto upload = [&](const Tensor& host, Tensor& dst) {
    MF_CHECK(host.numel() == params_.numel(i), "internal: AdamW moment of ", host.numel(), " elements for a ",
             params_.numel(i), "-element parameter");
    Tensor part = split_[i] ? host.view({host.numel()}).slice0(block(i).first, block(i).count).clone() : host;
    dst = cuda::to_device(part, dst.dtype()).view(dst.shape());
  };
  upload(exp_avg, exp_avg_.at(i));
  upload(exp_avg_sq, exp_avg_sq_.at(i));
  // Loaded values: the rows whose moments are all +0, for the next update with row flags.
  moments_fresh_.at(i) = false;
  zero_moment_rows_.at(i) = Tensor();
  const Shape& shape = params_.shape(i);
  loaded_zero_rows_.at(i) = split_[i] || shape.empty() || shape[0] < 1
                                ? Tensor()
                                : train::zero_moment_rows(exp_avg, exp_avg_sq, shape[0]);
}

void DeviceAdamW::step(double lr, float grad_scale) {
  begin_step(lr, grad_scale);
  std::vector<size_t> all(params_.size());
  for (size_t i = 0; i < all.size(); ++i) all[i] = i;
  update(all);
}

void DeviceAdamW::begin_step(double lr, float grad_scale) {
  ++step_;
  lr_ = lr;
  scalars_ = train::adamw_scalars(opts_, lr, step_);
  scalars_.grad_scale = grad_scale;
}

void DeviceAdamW::update(const std::vector<size_t>& indices) {
  std::vector<ops::AdamWTensors> ts;
  // Split parameters: every rank's updated block goes to all, one exchange per group (the groups
  // in parameter order, the same on every rank).
  std::vector<std::pair<parallel::Communicator*, std::vector<Tensor>>> exchange;
  auto exchange_in = [&](parallel::Communicator* g) -> std::vector<Tensor>& {
    for (auto& [group, ts2] : exchange)
      if (group == g) return ts2;
    exchange.emplace_back(g, std::vector<Tensor>{});
    return exchange.back().second;
  };
  for (size_t i : indices) {
    if (!params_.trainable(i)) continue;
    const bool decay = opts_.decay_norms_and_biases || params_.decay(i);
    ops::AdamWTensors t;
    t.param = params_.master(i);
    // zeros if backward never wrote it (an unused parameter); a whole parameter's gradient as its
    // sites left it, rows they did not write read as zeros (a split one is made whole first)
    if (params_.sharded(i)) t.grad = params_.shard_grad(i);
    else if (split_[i]) t.grad = params_.grad(i);
    else t.grad = params_.grad_as_written(i, t.grad_written_rows);
    t.zero_moment_rows = zero_moment_flags(i, t.grad_written_rows);
    t.exp_avg = exp_avg_[i];
    t.exp_avg_sq = exp_avg_sq_[i];
    t.weight_decay_mul = static_cast<float>(1.0 - lr_ * (decay ? opts_.weight_decay : 0.0));
    if (params_.sharded(i)) {  // ZeRO-3: the block is all this rank holds; nothing to exchange
      MF_CHECK(split_[i], "internal: a ZeRO-3 parameter without its moments split over the same group");
      if (params_.has_masters()) t.param_bf16_copy = params_.shard_value(i);
      if (t.param.numel() > 0) ts.push_back(std::move(t));
      continue;
    }
    if (params_.has_masters()) t.param_bf16_copy = params_.value(i);
    if (split_[i]) {
      const parallel::Block b = block(i);
      t.param = flat_block(t.param, b);
      t.grad = flat_block(t.grad, b);
      if (t.param_bf16_copy.defined()) t.param_bf16_copy = flat_block(t.param_bf16_copy, b);
      std::vector<Tensor>& ex = exchange_in(sharding_.group_of[i]);
      ex.push_back(params_.master(i));
      if (params_.has_masters()) ex.push_back(params_.value(i));
    }
    if (t.param.numel() > 0) ts.push_back(std::move(t));
  }
  ops::adamw_multi_tensor(ts, scalars_);
  for (auto& [g, ts2] : exchange) g->all_gather_blocks(ts2);
}

int64_t DeviceAdamW::bytes() const {
  int64_t b = 0;
  for (const auto* list : {&exp_avg_, &exp_avg_sq_})
    for (const Tensor& t : *list) b += static_cast<int64_t>(t.nbytes());
  return b;
}

}  // namespace moeforge::gpu
