#include "gpu/bench.h"

#include <algorithm>
#include <cstdio>
#include <chrono>
#include <random>
#include <vector>

#include "core/error.h"
#include "parallel/env.h"
#include "gpu/adamw.h"
#include "gpu/device_params.h"
#include "gpu/phase_times.h"
#include "models/flops.h"
#include "models/registry.h"
#include "ops/cuda/runtime.h"
#include "train/gradients.h"
#include "train/ranks.h"

namespace moeforge::gpu {

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n == 0 ? 0.0 : (n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]));
}

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

// The largest of one number per rank (host, over gloo).
double max_over(parallel::Communicator& world, double v) {
  Tensor mine = Tensor::empty({1}, DType::F64), all = Tensor::empty({world.size()}, DType::F64);
  mine.data<double>()[0] = v;
  world.all_gather(mine, all);
  return *std::max_element(all.data<double>(), all.data<double>() + world.size());
}

}  // namespace

BenchResult run_bench(const hf::ModelConfig& cfg, const BenchOptions& o, void (*progress)(int64_t, int64_t, double, double)) {
  MF_CHECK(cuda::available(), "bench: no CUDA device is available on this machine");
  MF_CHECK(o.seq >= 2 && o.batch >= 1 && o.steps >= 1 && o.warmup >= 0, "bench: seq >= 2, batch >= 1, steps >= 1, warmup >= 0");
  // Several ranks: one GPU each, joined with the bench's own arguments as the "recipe" so ranks
  // started with different ones are refused.
  const parallel::DistEnv env = parallel::dist_env();
  std::unique_ptr<train::RankGroups> groups;
  if (env.world_size > 1) {
    MF_CHECK(cuda::device_count() >= env.local_world_size, "bench: ", env.local_world_size,
             " ranks on this node but ", cuda::device_count(), " GPU(s)");
    cuda::set_device(env.local_rank);
    const int64_t ep = o.ep_size > 0 ? o.ep_size : env.world_size;
    const std::string args = cfg.source + " layers " + std::to_string(cfg.num_hidden_layers) + " seq " +
                             std::to_string(o.seq) + " batch " + std::to_string(o.batch) + " ep " + std::to_string(ep) +
                             (o.balanced_routing ? " balanced" : " native") + " " + precision_name(o.precision);
    groups = train::join_ranks(env, ep, cfg.num_experts, args, "bench", /*gpus=*/true);
  }
  auto model = models::build_model(cfg, groups ? groups->parallel() : models::Parallel{});
  MF_CHECK(!o.lora || !groups, "bench: LoRA is benchmarked on one GPU");
  int64_t lora_params = 0;
  if (o.lora) {
    models::apply_lora(*model, *o.lora, o.seed, "bench");
    for (const auto& p : model->params().all()) lora_params += p.lora ? shape_numel(p.shape) : 0;
  }
  // Which parameters are expert shards: their first dimension is split over the group.
  std::vector<bool> sharded(model->params().all().size(), false);
  int64_t full_params = model->params().numel();
  if (groups) {
    auto full = models::build_model(cfg);
    full_params = full->params().numel();
    for (size_t i = 0; i < sharded.size(); ++i)
      sharded[i] = model->params().all()[i].shape != full->params().all()[i].shape;
    groups->expert_sharded = sharded;
    groups->zero_stage = o.zero_stage;
  }
  const float init_std = cfg.raw.contains("initializer_range") && cfg.raw["initializer_range"].is_number()
                             ? cfg.raw["initializer_range"].get<float>()
                             : 0.02f;
  const models::Parallel par = groups ? groups->device_parallel() : models::Parallel{};
  DeviceParams device = DeviceParams::random(model->params(), o.precision, init_std, o.seed);
  device.keep_squares(!o.optimizer_in_backward && o.max_grad_norm > 0);  // only that step takes the norm
  MF_CHECK(o.zero_stage == 1 || o.zero_stage == 3, "bench: --zero-stage must be 1 or 3, got ", o.zero_stage);
  const std::vector<parallel::Communicator*> copy_group =
      groups ? groups->device_copy_groups() : std::vector<parallel::Communicator*>{};
  if (groups && o.zero_stage == 3) device.shard(copy_group);
  PhaseTimes phases;  // MOEFORGE_PHASE_TIMES=1 or events
  // Sums gradients over the ranks holding copies of them (nothing on one GPU; ZeRO-3 blocks were
  // summed in backward); no norm unless --max-grad-norm asks for clipping.
  auto sum_grads = [&](const std::vector<size_t>& idx) { train::sum_gradients(groups.get(), device, idx, nullptr); };
  std::vector<size_t> every(device.size());
  for (size_t i = 0; i < every.size(); ++i) every[i] = i;
  train::AdamWOptions ao;
  ao.lr = o.lr;
  ao.weight_decay = o.weight_decay;
  // ZeRO-1 over the ranks: each keeps the AdamW moments of its block of every parameter it holds a
  // copy of (dense ones over the world, expert shards over their copies).
  DeviceAdamW opt(device, ao, OptimizerSharding{copy_group});
  cuda::synchronize();
  if (phases.enabled() && env.rank == 0)
    std::fprintf(stderr, "before the first step: %.2f GiB allocated (weights %.2f, AdamW moments %.2f)\n",
                 static_cast<double>(cuda::allocator_stats().allocated_bytes) / kGiB,
                 static_cast<double>(device.bytes()) / kGiB, static_cast<double>(opt.bytes()) / kGiB);

  std::mt19937_64 rng(o.seed + static_cast<uint64_t>(env.rank));
  std::uniform_int_distribution<int64_t> tok(0, cfg.vocab_size - 1);
  const int64_t n = o.batch * o.seq;
  models::TrainStepOptions so;
  so.ce_scale = 1.f / static_cast<float>(o.batch * (o.seq - 1));
  so.activation_checkpointing = o.activation_checkpointing;
  so.ep_chunks = groups && groups->ep_size > 1 ? parallel::ep_chunks_from_env() : 1;
  if (phases.enabled()) so.mark_phase = [&](const char* phase) { phases.mark(phase); };
  models::RoutingControl balanced{models::RoutingControl::Mode::Balanced, {}};
  std::vector<double> fwd, bwd, optm, step;
  BenchResult r;
  const int64_t total = o.warmup + o.steps;
  for (int64_t i = 0; i < total; ++i) {
    std::vector<int64_t> ids(static_cast<size_t>(n));
    for (auto& t : ids) t = tok(rng);
    Tensor input = Tensor::from_i64(ids, {o.batch, o.seq});
    models::ForwardInputs in;
    in.input_ids = input;
    in.labels = &input;
    if (o.balanced_routing) in.routing = &balanced;
    const auto t0 = std::chrono::steady_clock::now();
    if (o.optimizer_in_backward) {
      opt.begin_step(o.lr);
      so.on_grads_ready = [&](const std::vector<size_t>& idx) {
        sum_grads(idx);
        opt.update(idx);
        device.release_grads(idx);
      };
    }
    phases.start();
    const models::TrainStepResult sr = model->forward_backward(device, in, so, par);
    const auto t1 = std::chrono::steady_clock::now();
    if (!o.optimizer_in_backward) {
      float clip_scale = 1.f;  // applied by AdamW as it reads the gradients, as in `train`
      if (o.max_grad_norm > 0) {
        r.last_grad_norm = train::finish_gradients(groups.get(), device, o.max_grad_norm, &clip_scale);
      } else {
        sum_grads(every);
      }
      opt.step(o.lr, clip_scale);
      device.zero_grad();
    }
    cuda::synchronize();
    const auto t2 = std::chrono::steady_clock::now();
    phases.finish_step();
    const double loss = sr.ce_sum / static_cast<double>(std::max<int64_t>(sr.tokens, 1));
    const double step_ms = std::chrono::duration<double, std::milli>(t2 - t0).count();
    if (i == 0) r.first_loss = loss;
    r.last_loss = loss;
    if (i >= o.warmup) {
      fwd.push_back(sr.forward_ms);
      bwd.push_back(sr.backward_ms);
      optm.push_back(std::chrono::duration<double, std::milli>(t2 - t1).count());
      step.push_back(step_ms);
    }
    if (progress) progress(i + 1, total, loss, step_ms);
    if (i + 1 == o.warmup) phases.clear();  // phases count the timed steps only
  }
  if (phases.enabled()) {
    const bool events = phases.mode() == PhaseMode::Events;
    const double steps = static_cast<double>(o.steps);
    std::fprintf(stderr, "phase times (MOEFORGE_PHASE_TIMES=%s; ms per step, mean of the %lld timed steps):\n",
                 events ? "events: device time, no synchronisation" : "1: wall time, synchronised at each mark",
                 static_cast<long long>(o.steps));
    for (const auto& [phase, ms] : phases.totals()) {
      if (events) {
        // Near 0: the device had caught up with the host there (it waited for launches).
        std::fprintf(stderr, "  %8.2f  %s (device behind the host at its marks: %.3f ms mean; allocated at most %.2f GiB)\n",
                     ms / steps, phase.c_str(), phases.mean_lag_ms(phase), phases.allocated_gib().at(phase));
      } else {
        std::fprintf(stderr, "  %8.2f  %s (allocated at its end, at most %.2f GiB)\n", ms / steps, phase.c_str(),
                     phases.allocated_gib().at(phase));
      }
    }
    for (const auto& [key, text] : phases.notes()) std::fprintf(stderr, "  %s: %s\n", key.c_str(), text.c_str());
  }
  r.forward_ms = median(fwd);
  r.backward_ms = median(bwd);
  r.optimizer_ms = median(optm);
  r.step_ms = median(step);
  const auto st = cuda::allocator_stats();
  r.peak_allocated_gib = static_cast<double>(st.peak_allocated_bytes) / kGiB;
  r.peak_reserved_gib = static_cast<double>(st.peak_reserved_bytes) / kGiB;
  r.device_used_gib = static_cast<double>(cuda::device_used_bytes()) / kGiB;
  if (groups) {  // per GPU: the slowest rank's times, the largest memory
    parallel::Communicator& w = *groups->world_group;
    for (double* v : {&r.forward_ms, &r.backward_ms, &r.optimizer_ms, &r.step_ms, &r.peak_allocated_gib,
                      &r.peak_reserved_gib, &r.device_used_gib})
      *v = max_over(w, *v);
    r.world = env.world_size;
    r.ep_size = groups->ep_size;
  }
  r.tokens_per_s = static_cast<double>(n) / (r.step_ms / 1000.0);
  r.tflops = models::flops_per_token(cfg, o.seq).training * r.tokens_per_s / 1e12;
  r.params = full_params;
  r.trainable_params = o.lora ? lora_params : full_params;
  r.device = cuda::device_name();
  return r;
}

}  // namespace moeforge::gpu
