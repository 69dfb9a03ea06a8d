// moeforge inspect: what a model folder (or a bare config.json) holds and what training it costs.
#include <cstdio>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <variant>

#include "cli/app.h"
#include "cli/commands.h"
#include "core/error.h"
#include "hf/safetensors.h"
#include "models/registry.h"

namespace moeforge::cli {

namespace fs = std::filesystem;

namespace {

std::string human(double n, const char* unit = "") {
  char buf[64];
  if (n >= 1e12) std::snprintf(buf, sizeof buf, "%.2fT%s", n / 1e12, unit);
  else if (n >= 1e9) std::snprintf(buf, sizeof buf, "%.2fB%s", n / 1e9, unit);
  else if (n >= 1e6) std::snprintf(buf, sizeof buf, "%.2fM%s", n / 1e6, unit);
  else if (n >= 1e3) std::snprintf(buf, sizeof buf, "%.2fK%s", n / 1e3, unit);
  else std::snprintf(buf, sizeof buf, "%.0f%s", n, unit);
  return buf;
}

std::string bytes_str(double bytes) {
  static const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (bytes >= 1024.0 && u < 4) {
    bytes /= 1024.0;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f %s", bytes, units[u]);
  return buf;
}

// Bytes per parameter for weights + gradients + AdamW state under each precision policy.
struct Policy {
  const char* name;
  int bytes_per_param;
  const char* what;
};
constexpr Policy kPolicies[] = {
    {"fp32", 16, "fp32 weights 4 + grads 4 + AdamW moments 8"},
    {"bf16-mixed", 16, "bf16 weights 2 + bf16 grads 2 + fp32 master 4 + fp32 moments 8"},
    {"bf16", 8, "bf16 weights 2 + grads 2 + moments 4"},
};

}  // namespace

// Per GPU under a run of `gpus` ranks with experts split over `ep` of them (what moeforge's
// multi-GPU trainer holds): expert weights, gradients and moments for E / ep experts; dense weights
// and gradients whole on every GPU, their AdamW moments split over all GPUs (ZeRO-1); bf16-mixed's
// F32 masters whole. Gradients held for a whole step (the optimizer in backward frees most).
struct PerGpu {
  double weights = 0, grads = 0, moments = 0, masters = 0;
  double total() const { return weights + grads + moments + masters; }
};
PerGpu per_gpu_bytes(const Policy& p, double expert_params, double dense_params, int64_t gpus, int64_t ep) {
  const double here = expert_params / static_cast<double>(ep) + dense_params;
  const bool mixed = std::string(p.name) == "bf16-mixed";
  const double w = std::string(p.name) == "fp32" ? 4 : 2, m = std::string(p.name) == "bf16" ? 4 : 8;
  PerGpu r;
  r.weights = here * w;
  r.grads = here * w;
  r.moments = (expert_params / static_cast<double>(ep) + dense_params / static_cast<double>(gpus)) * m;
  r.masters = mixed ? here * 4 : 0;
  return r;
}

int cmd_inspect(const std::vector<std::string>& argv) {
  auto app = make_app("inspect", "Architecture, total and active parameters, checkpoint tensors found vs expected, and "
                      "the memory\nweights + gradients + AdamW state take under each precision policy (per GPU with --gpus).",
                      "\nExamples:\n  moeforge inspect examples/configs/qwen3-30b-a3b.json\n"
                      "  moeforge inspect MODEL_DIR --gpus 8 --json\n"
                      "  moeforge inspect RUN/final --base MODEL_DIR    # a LoRA adapter folder, checked against its base");
  std::string path, base;
  int64_t gpus = 1, ep_flag = 0;
  bool json = false;
  app->add_option("path", path, "model folder, config.json, or a PEFT LoRA adapter folder")->required();
  app->add_option("--base", base, "for an adapter folder: the base model folder to check it against "
                                  "(default: its base_model_name_or_path, where that folder exists)");
  app->add_option("--gpus", gpus, "estimate the memory of each of this many GPUs")->check(at_least(1));
  app->add_option("--ep-size", ep_flag, "experts split over this many GPUs (default: --gpus)")->check(at_least(1));
  app->add_flag("--json", json, "one JSON object instead of the report");
  if (auto code = parse(*app, argv)) return *code;
  MF_CHECK(fs::exists(path), path, ": no such file or folder");
  if (fs::is_directory(path) && fs::exists(fs::path(path) / "adapter_config.json") && !fs::exists(fs::path(path) / "config.json"))
    return inspect_adapter(path, base, json);
  MF_CHECK(base.empty(), "inspect --base: ", path, " is not a LoRA adapter folder (no adapter_config.json)");
  const hf::ModelConfig cfg = hf::load_config(path);
  auto model = models::build_model(cfg);
  const int64_t total = model->params().numel(), active = model->active_parameters();
  // Vendors count "active" two ways: Qwen and Mistral include the input embedding table, OpenAI
  // (GPT-OSS) leaves it out (a lookup, not a product); both are reported. Tied, the table is the
  // LM head too and stays in.
  const int64_t embedding = cfg.tie_word_embeddings ? 0 : cfg.vocab_size * cfg.hidden_size;
  // DeepSeek-V3's checkpoints carry multi-token prediction layers beyond num_hidden_layers: each a
  // decoder layer like the last plus enorm/hnorm, eh_proj [H, 2H], its norm, head and embedding.
  int64_t mtp = 0;
  if (cfg.num_nextn_predict_layers > 0) {
    const std::string last = "model.layers." + std::to_string(cfg.num_hidden_layers - 1) + ".";
    int64_t layer = 0;
    for (const auto& p : model->params().all())
      if (p.name.rfind(last, 0) == 0) layer += shape_numel(p.shape);
    const int64_t h = cfg.hidden_size;
    mtp = cfg.num_nextn_predict_layers * (layer + 3 * h + 2 * h * h + 2 * cfg.vocab_size * h);
  }
  int64_t moe_layers = 0, window_layers = 0;
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    moe_layers += cfg.is_moe_layer(l);
    window_layers += cfg.window_of(l).has_value();
  }

  nlohmann::ordered_json j;
  j["path"] = path;
  j["model_type"] = cfg.model_type;
  if (cfg.raw.contains("architectures")) j["architectures"] = cfg.raw["architectures"];
  j["layers"] = cfg.num_hidden_layers;
  j["moe_layers"] = moe_layers;
  // Nemotron-H: how many blocks of each kind, and the Mamba2 mixer's shape.
  int64_t kinds[4] = {0, 0, 0, 0};
  for (const auto b : cfg.blocks) ++kinds[static_cast<int>(b)];
  if (const auto& m = cfg.mamba) {
    j["blocks"] = {{"mamba", kinds[0]}, {"attention", kinds[1]}, {"moe", kinds[2]}, {"mlp", kinds[3]}};
    j["mamba"] = {{"heads", m->heads}, {"head_dim", m->head_dim}, {"groups", m->groups}, {"state", m->state},
                  {"conv_kernel", m->conv_kernel}};
  }
  j["hidden_size"] = cfg.hidden_size;
  j["attention"] = {{"heads", cfg.num_attention_heads}, {"kv_heads", cfg.num_key_value_heads},
                    {"head_dim", cfg.head_dim}, {"rope", cfg.rope.type}, {"rope_theta", cfg.rope.theta}};
  if (window_layers) {
    j["attention"]["sliding_window"] = *cfg.sliding_window;
    j["attention"]["sliding_window_layers"] = window_layers;
  }
  j["experts"] = {{"count", cfg.num_experts}, {"top_k", cfg.num_experts_per_tok},
                  {"intermediate_size", cfg.moe_intermediate_size}, {"norm_topk_prob", cfg.norm_topk_prob}};
  if (cfg.shared_expert_intermediate_size) j["experts"]["shared_intermediate_size"] = cfg.shared_expert_intermediate_size;
  j["vocab_size"] = cfg.vocab_size;
  j["tie_word_embeddings"] = cfg.tie_word_embeddings;
  j["parameters"] = {{"total", total}, {"active", active}, {"active_without_embedding", active - embedding}};
  if (mtp) j["parameters"]["total_with_mtp"] = total + mtp;

  // Tensors: compare the checkpoint's headers with what the config implies (no weights are read).
  const fs::path dir = fs::is_directory(path) ? fs::path(path) : fs::path(path).parent_path();
  nlohmann::ordered_json tj;
  bool have_weights = false;
  for (const auto& de : fs::directory_iterator(dir.empty() ? fs::path(".") : dir))
    if (de.path().extension() == ".safetensors") have_weights = true;
  if (have_weights && fs::is_directory(path)) {
    auto ckpt = hf::SafetensorsCheckpoint::open(dir.string());
    std::map<std::string, Shape> expected;
    for (auto& [n, s] : model->adapter().expected_hub_tensors(model->params())) expected[n] = s;
    // A fused checkpoint stores the internal names for the expert groups instead.
    for (const auto& p : model->params().all())
      if (ckpt.contains(p.name) && !expected.count(p.name)) {
        std::string prefix = p.name.substr(0, p.name.rfind('.') + 1);
        for (auto it = expected.begin(); it != expected.end();)
          it = (it->first.rfind(prefix, 0) == 0) ? expected.erase(it) : std::next(it);
        expected[p.name] = p.shape;
      }
    std::vector<std::string> missing, wrong_shape, unexpected;
    int64_t found = 0;
    for (const auto& [n, s] : expected) {
      if (!ckpt.contains(n)) missing.push_back(n);
      else if (ckpt.entry(n).shape != s) wrong_shape.push_back(n + " " + shape_str(ckpt.entry(n).shape) + " != " + shape_str(s));
      else ++found;
    }
    for (const auto& n : ckpt.names())
      if (!expected.count(n) && !(cfg.tie_word_embeddings && n == "lm_head.weight")) unexpected.push_back(n);
    std::map<std::string, int64_t> dtypes;
    for (const auto& n : ckpt.names()) ++dtypes[std::string(dtype_name(ckpt.entry(n).dtype))];
    tj = {{"expected", expected.size()}, {"found", found}, {"missing", missing.size()},
          {"wrong_shape", wrong_shape.size()}, {"unexpected", unexpected.size()}, {"dtypes", dtypes}};
    auto first = [](const std::vector<std::string>& v) {
      return std::vector<std::string>(v.begin(), v.begin() + std::min<size_t>(v.size(), 5));
    };
    if (!missing.empty()) tj["missing_examples"] = first(missing);
    if (!wrong_shape.empty()) tj["wrong_shape_examples"] = first(wrong_shape);
    if (!unexpected.empty()) tj["unexpected_examples"] = first(unexpected);
  } else {
    tj = {{"expected", model->adapter().expected_hub_tensors(model->params()).size()}, {"found", 0},
          {"note", "no safetensors weights in this folder"}};
  }
  j["tensors"] = tj;
  nlohmann::ordered_json mem;
  for (const auto& p : kPolicies)
    mem[p.name] = {{"bytes_per_param", p.bytes_per_param}, {"bytes", static_cast<double>(total) * p.bytes_per_param}};
  j["training_memory_excluding_activations"] = mem;
  // Several GPUs: what each holds (experts split over --ep-size, default all GPUs).
  const int64_t ep = ep_flag > 0 ? ep_flag : gpus;
  MF_CHECK(ep >= 1 && gpus % ep == 0, "--ep-size ", ep, " does not divide --gpus ", gpus);
  MF_CHECK(cfg.num_experts % ep == 0 || ep == 1, "--ep-size ", ep, " does not divide the model's ",
           cfg.num_experts, " experts");
  double expert_params = 0;
  for (const auto& p : model->params().all())
    if (model->adapter().group_of(p.name)) expert_params += static_cast<double>(shape_numel(p.shape));
  const double dense_params = static_cast<double>(total) - expert_params;
  if (gpus > 1) {
    nlohmann::ordered_json pg = {{"gpus", gpus}, {"ep_size", ep}, {"expert_parameters", expert_params},
                                 {"dense_parameters", dense_params}};
    for (const auto& p : kPolicies) {
      const PerGpu b = per_gpu_bytes(p, expert_params, dense_params, gpus, ep);
      pg[p.name] = {{"weights", b.weights}, {"grads", b.grads}, {"moments", b.moments}, {"masters", b.masters},
                    {"bytes", b.total()}};
    }
    j["training_memory_per_gpu_excluding_activations"] = pg;
  }

  if (json) {
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  std::printf("model       %s\n", path.c_str());
  std::printf("type        %s%s\n", cfg.model_type.c_str(),
              j.contains("architectures") ? (" (" + j["architectures"][0].get<std::string>() + ")").c_str() : "");
  if (const auto& m = cfg.mamba) {
    std::printf("layers      %lld blocks (%lld Mamba2, %lld attention, %lld MoE, %lld MLP)\n",
                (long long)cfg.num_hidden_layers, (long long)kinds[0], (long long)kinds[1], (long long)kinds[2],
                (long long)kinds[3]);
    std::printf("mamba2      %lld heads x %lld, %lld groups, state %lld, conv %lld\n", (long long)m->heads,
                (long long)m->head_dim, (long long)m->groups, (long long)m->state, (long long)m->conv_kernel);
  } else {
    std::printf("layers      %lld (%lld MoE, %lld dense MLP)\n", (long long)cfg.num_hidden_layers, (long long)moe_layers,
                (long long)(cfg.num_hidden_layers - moe_layers));
  }
  char theta[32];
  std::snprintf(theta, sizeof theta, "%g", cfg.rope.theta);
  const std::string position =
      cfg.no_rope ? std::string("no position encoding") : "RoPE " + cfg.rope.type + " theta " + theta;
  std::printf("attention   %lld q heads / %lld kv heads x %lld, %s%s\n", (long long)cfg.num_attention_heads,
              (long long)cfg.num_key_value_heads, (long long)cfg.head_dim, position.c_str(),
              window_layers ? (", sliding window " + std::to_string(*cfg.sliding_window) + " on " +
                               std::to_string(window_layers) + " of " + std::to_string(cfg.num_hidden_layers) + " layers")
                                  .c_str()
                            : "");
  if (cfg.num_experts == 0)
    std::printf("experts     none (dense MLP, %lld wide)\n", (long long)cfg.intermediate_size);
  else
    std::printf("experts     %lld, top-%lld, %lld wide%s%s\n", (long long)cfg.num_experts, (long long)cfg.num_experts_per_tok,
                (long long)cfg.moe_intermediate_size, cfg.norm_topk_prob ? ", renormalised" : "",
                cfg.shared_expert_intermediate_size
                    ? (", shared expert " + std::to_string(cfg.shared_expert_intermediate_size) + " wide").c_str()
                    : "");
  std::printf("parameters  %s total, %s active per token (%s without the input embedding)\n",
              human(static_cast<double>(total)).c_str(), human(static_cast<double>(active)).c_str(),
              human(static_cast<double>(active - embedding)).c_str());
  if (mtp)
    std::printf("            %s with the %lld multi-token prediction layer(s) checkpoints carry (not trained)\n",
                human(static_cast<double>(total + mtp)).c_str(), (long long)cfg.num_nextn_predict_layers);
  if (tj.contains("note")) {
    std::printf("tensors     %lld expected; %s\n", (long long)tj["expected"].get<int64_t>(), tj["note"].get<std::string>().c_str());
  } else {
    std::printf("tensors     %lld expected, %lld found, %lld missing, %lld wrong shape, %lld unexpected\n",
                (long long)tj["expected"].get<int64_t>(), (long long)tj["found"].get<int64_t>(),
                (long long)tj["missing"].get<int64_t>(), (long long)tj["wrong_shape"].get<int64_t>(),
                (long long)tj["unexpected"].get<int64_t>());
    for (const char* k : {"missing_examples", "wrong_shape_examples", "unexpected_examples"})
      if (tj.contains(k))
        for (const auto& n : tj[k]) std::printf("              %s: %s\n", k, n.get<std::string>().c_str());
  }
  std::printf("training memory, weights + gradients + AdamW state (activations not included):\n");
  for (const auto& p : kPolicies)
    std::printf("  %-11s %2d B/param  %12s   (%s)\n", p.name, p.bytes_per_param,
                bytes_str(static_cast<double>(total) * p.bytes_per_param).c_str(), p.what);
  if (gpus > 1) {
    std::printf("per GPU on %lld GPUs, experts split over %lld (%s expert + %s dense parameters here; dense AdamW\n"
                "moments split over all GPUs; gradients held for a whole step):\n",
                (long long)gpus, (long long)ep, human(expert_params / static_cast<double>(ep)).c_str(),
                human(dense_params).c_str());
    for (const auto& p : kPolicies) {
      const PerGpu b = per_gpu_bytes(p, expert_params, dense_params, gpus, ep);
      std::printf("  %-11s %12s   (weights %s, grads %s, moments %s%s%s)\n", p.name, bytes_str(b.total()).c_str(),
                  bytes_str(b.weights).c_str(), bytes_str(b.grads).c_str(), bytes_str(b.moments).c_str(),
                  b.masters > 0 ? ", masters " : "", b.masters > 0 ? bytes_str(b.masters).c_str() : "");
    }
  }
  return 0;
}

}  // namespace moeforge::cli
