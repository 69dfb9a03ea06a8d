// moeforge bench: the training-step benchmark (shared/BENCHMARKS.md) on this machine's GPU, printed
// as a table and as one JSON line that bench/compare.sh pairs with bench/hf_baseline.py's.
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "cli/args.h"
#include "cli/commands.h"
#include "core/error.h"
#include "hf/config.h"
#include "parallel/env.h"
#include "models/flops.h"

#ifdef MOEFORGE_HAVE_CUDA
#include "gpu/bench.h"
#endif

namespace moeforge::cli {

int cmd_bench(const std::vector<std::string>& argv) {
  Args args(argv, {"--layers", "--seq", "--batch", "--steps", "--warmup", "--routing", "--precision", "--seed", "--ep-size",
                   "--zero-stage", "--lora-rank", "--lora-alpha", "--lora-targets"},
            {"--activation-checkpointing", "--optimizer-in-backward"});
  MF_CHECK(args.positionals().size() == 1, "bench takes one CONFIG.json or MODEL_DIR");
  const std::string path = args.positionals()[0];
  MF_CHECK(std::filesystem::exists(path), path, ": no such file or folder");
  hf::ModelConfig cfg = hf::load_config(path);
  if (const auto l = args.get("--layers")) {
    const int64_t n = args.get_int("--layers", 0);
    MF_CHECK(n >= 1, "bench: --layers must be at least 1, got ", *l);
    hf::cut_to_layers(cfg.raw, n);
    cfg = hf::parse_config(cfg.raw, cfg.source);
  }
  const std::string routing = args.get("--routing").value_or("native");
  MF_CHECK(routing == "native" || routing == "balanced", "bench: --routing must be native or balanced, got '", routing, "'");
  const std::string precision = args.get("--precision").value_or("bf16-mixed");
#ifndef MOEFORGE_HAVE_CUDA
  (void)precision;
  MF_THROW("bench runs on the GPU, and this moeforge was built without the CUDA backend");
#else
  gpu::BenchOptions o;
  o.seq = args.get_int("--seq", 4096);
  o.batch = args.get_int("--batch", 1);
  o.steps = args.get_int("--steps", 10);
  o.warmup = args.get_int("--warmup", 3);
  o.seed = static_cast<uint64_t>(args.get_int("--seed", 1234));
  o.ep_size = args.get_int("--ep-size", 0);
  MF_CHECK(o.ep_size >= 0, "bench: --ep-size must be at least 1 (or 0: every rank)");
  const bool main_rank = parallel::dist_env().rank == 0;
  o.balanced_routing = routing == "balanced";
  o.precision = gpu::parse_precision(precision, "bench --precision");
  o.activation_checkpointing = args.has("--activation-checkpointing");
  o.optimizer_in_backward = args.has("--optimizer-in-backward");
  o.zero_stage = static_cast<int>(args.get_int("--zero-stage", 1));
  if (const auto r = args.get("--lora-rank")) {
    models::LoraOptions lo;
    lo.rank = args.get_int("--lora-rank", 16);
    MF_CHECK(lo.rank >= 1, "bench: --lora-rank must be at least 1, got ", *r);
    lo.alpha = static_cast<double>(args.get_int("--lora-alpha", 2 * lo.rank));
    lo.targets.clear();
    std::string targets = args.get("--lora-targets").value_or("q_proj,k_proj,v_proj,o_proj,experts");
    for (size_t at = 0; at <= targets.size();) {
      const size_t comma = std::min(targets.find(',', at), targets.size());
      if (comma > at) lo.targets.push_back(targets.substr(at, comma - at));
      at = comma + 1;
    }
    o.lora = lo;
  }
  if (main_rank)
    std::fprintf(stderr, "bench: %s, %lld layers, seq %lld, batch %lld, %s routing, %s, %lld warm-up + %lld timed steps\n",
               cfg.source.c_str(), static_cast<long long>(cfg.num_hidden_layers), static_cast<long long>(o.seq),
               static_cast<long long>(o.batch), routing.c_str(), precision.c_str(), static_cast<long long>(o.warmup),
               static_cast<long long>(o.steps));
  const auto progress = [](int64_t i, int64_t n, double loss, double ms) {
    std::fprintf(stderr, "  step %lld/%lld  loss %.4f  %.1f ms\n", static_cast<long long>(i), static_cast<long long>(n), loss, ms);
  };
  // Under several ranks only rank 0 prints (its steps, and the per-GPU figures of all).
  const gpu::BenchResult r = gpu::run_bench(cfg, o, main_rank ? +progress : nullptr);
  if (!main_rank) return 0;
  if (r.world > 1)
    std::printf("%d GPUs, experts split over %d (EP), dense weights %s\n", r.world, r.ep_size,
                o.zero_stage == 3 ? "split (ZeRO-3)" : "replicated, their AdamW moments split (ZeRO-1)");
  std::printf("%-14s %10s %8s %9s %9s %9s %9s %8s %8s %8s\n", "impl", "tok/s/GPU", "TFLOP/s", "peak GiB", "reserved",
              "dev used", "fwd+loss", "bwd ms", "opt ms", "step ms");
  std::printf("%-14s %10.0f %8.1f %9.2f %9.2f %9.2f %9.1f %8.1f %8.1f %8.1f\n", "moeforge", r.tokens_per_s, r.tflops,
              r.peak_allocated_gib, r.peak_reserved_gib, r.device_used_gib, r.forward_ms, r.backward_ms, r.optimizer_ms,
              r.step_ms);
  nlohmann::ordered_json j;
  j["impl"] = "moeforge";
  j["device"] = r.device;
  j["gpus"] = r.world;
  j["ep_size"] = r.ep_size;
  j["config"] = cfg.source;
  j["layers"] = cfg.num_hidden_layers;
  j["params"] = r.params;
  if (o.lora) {
    j["lora_rank"] = o.lora->rank;
    j["lora_targets"] = o.lora->targets;
    j["trainable_params"] = r.trainable_params;
  }
  j["seq"] = o.seq;
  j["batch"] = o.batch;
  j["routing"] = routing;
  j["precision"] = precision;
  j["activation_checkpointing"] = o.activation_checkpointing;
  j["optimizer_in_backward"] = o.optimizer_in_backward;
  j["zero_stage"] = o.zero_stage;
  j["steps"] = o.steps;
  j["warmup"] = o.warmup;
  j["tokens_per_s_per_gpu"] = r.tokens_per_s;
  j["model_tflops_per_gpu"] = r.tflops;
  j["flops_per_token"] = models::flops_per_token(cfg, o.seq).training;
  j["peak_allocated_gib"] = r.peak_allocated_gib;
  j["peak_reserved_gib"] = r.peak_reserved_gib;
  j["device_used_gib"] = r.device_used_gib;
  j["fwd_loss_ms"] = r.forward_ms;
  j["bwd_ms"] = r.backward_ms;
  j["optimizer_ms"] = r.optimizer_ms;
  j["step_ms"] = r.step_ms;
  j["first_loss"] = r.first_loss;
  j["last_loss"] = r.last_loss;
  std::printf("%s\n", j.dump().c_str());
  return 0;
#endif
}

}  // namespace moeforge::cli
