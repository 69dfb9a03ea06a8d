// moeforge bench: the training-step benchmark (shared/BENCHMARKS.md) on this machine's GPU, printed
// as a table and as one JSON line that bench/compare.sh pairs with bench/hf_baseline.py's.
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "cli/app.h"
#include "cli/commands.h"
#include "core/error.h"
#include "hf/config.h"
#include "parallel/env.h"
#include "models/flops.h"

#ifdef MOEFORGE_HAVE_CUDA
#include "gpu/bench.h"
#include "gpu/fast_paths.h"
#include "ops/cuda/runtime.h"
#endif

namespace moeforge::cli {

int cmd_bench(const std::vector<std::string>& argv) {
  auto app = make_app("bench", "Training-step benchmark on the GPU (random weights and tokens): tokens/s, TFLOP/s, peak "
                      "memory,\nforward/backward/optimizer times, as a table and one JSON line (docs/benchmarks.md).",
                      "\nExample: moeforge bench ../shared/configs/qwen3-30b-a3b.json --layers 4 --routing balanced\n"
                      "Several GPUs: moeforge launch --nproc-per-node 8 -- bench CONFIG --ep-size 8");
  std::string path, routing = "native", precision = "bf16-mixed", lora_targets = "q_proj,k_proj,v_proj,o_proj,experts";
  int64_t layers = 0, seq = 4096, batch = 1, steps = 10, warmup = 3, ep_size = 0, zero_stage = 1, lora_rank = 0,
          lora_alpha = 0;
  uint64_t seed = 1234;
  double max_grad_norm = 0;
  bool ckpt = false, in_backward = false;
  app->add_option("config", path, "config.json or model folder")->required();
  app->add_option("--layers", layers, "cut the model to its first N layers (0: all)")->check(at_least(0));
  app->add_option("--seq", seq, "tokens per row")->check(at_least(1));
  app->add_option("--batch", batch, "rows per step and GPU")->check(at_least(1));
  app->add_option("--steps", steps, "timed steps")->check(at_least(1));
  app->add_option("--warmup", warmup, "untimed steps first")->check(at_least(0));
  app->add_option("--routing", routing, "native (the router's choice) or balanced (every expert the same rows)")
      ->check(CLI::IsMember({"native", "balanced"}));
  app->add_option("--precision", precision, "bf16-mixed, bf16 or fp32")->check(CLI::IsMember({"bf16-mixed", "bf16", "fp32"}));
  app->add_option("--seed", seed, "weights and tokens seed");
  app->add_option("--ep-size", ep_size, "experts split over this many ranks (0: all of them)")->check(at_least(0));
  app->add_option("--zero-stage", zero_stage, "1 (AdamW moments split) or 3 (weights and gradients too)")
      ->check(CLI::IsMember({1, 3}));
  app->add_flag("--activation-checkpointing", ckpt, "keep only each layer's input; recompute in backward");
  app->add_flag("--optimizer-in-backward", in_backward, "apply AdamW layer by layer during backward");
  app->add_option("--max-grad-norm", max_grad_norm,
                  "clip gradients to this norm before AdamW, as `train` does (0: no clipping, as the Transformers baseline)")
      ->check(CLI::NonNegativeNumber);
  auto* o_rank = app->add_option("--lora-rank", lora_rank, "train LoRA adapters of this rank instead of every weight")
                     ->check(at_least(1));
  app->add_option("--lora-alpha", lora_alpha, "LoRA alpha (default: 2 x rank)")->check(at_least(1));
  app->add_option("--lora-targets", lora_targets, "comma-separated LoRA target modules ('experts': the routed experts)");
  if (auto code = parse(*app, argv)) return *code;
  MF_CHECK(!in_backward || max_grad_norm <= 0, "bench: --max-grad-norm needs the whole gradient norm before the update, "
           "which --optimizer-in-backward applies layer by layer: drop one of them");
  MF_CHECK(std::filesystem::exists(path), path, ": no such file or folder");
  hf::ModelConfig cfg = hf::load_config(path);
  if (layers > 0) {
    hf::cut_to_layers(cfg.raw, layers);
    cfg = hf::parse_config(cfg.raw, cfg.source);
  }
#ifndef MOEFORGE_HAVE_CUDA
  (void)precision, (void)o_rank;
  MF_THROW("bench runs on the GPU, and this moeforge was built without the CUDA backend");
#else
  gpu::BenchOptions o;
  o.seq = seq;
  o.batch = batch;
  o.steps = steps;
  o.warmup = warmup;
  o.seed = seed;
  o.ep_size = ep_size;
  const bool main_rank = parallel::dist_env().rank == 0;
  o.balanced_routing = routing == "balanced";
  o.precision = gpu::parse_precision(precision, "bench --precision");
  o.activation_checkpointing = ckpt;
  o.optimizer_in_backward = in_backward;
  o.max_grad_norm = max_grad_norm;
  o.zero_stage = static_cast<int>(zero_stage);
  if (*o_rank) {
    models::LoraOptions lo;
    lo.rank = lora_rank;
    lo.alpha = static_cast<double>(lora_alpha > 0 ? lora_alpha : 2 * lora_rank);
    lo.targets.clear();
    for (size_t at = 0; at <= lora_targets.size();) {
      const size_t comma = std::min(lora_targets.find(',', at), lora_targets.size());
      if (comma > at) lo.targets.push_back(lora_targets.substr(at, comma - at));
      at = comma + 1;
    }
    o.lora = lo;
  }
  // Before any note about the GPU's fast paths: on a machine without one, only the error.
  MF_CHECK(cuda::available(), "bench: no CUDA device is available on this machine (bench measures the GPU path)");
  if (main_rank)
    for (const std::string& n : gpu::fast_path_notes(cfg, o.precision != gpu::Precision::FP32, false))
      std::fprintf(stderr, "note: %s\n", n.c_str());
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
  j["max_grad_norm"] = o.max_grad_norm;
  if (o.max_grad_norm > 0) j["last_grad_norm"] = r.last_grad_norm;
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
