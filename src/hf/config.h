// config.json: the architecture fields moeforge needs, read from either spelling Transformers has
// used (the hub's v4 names such as `rope_theta`/`rope_scaling`/`num_experts`, and the v5 names such
// as `rope_parameters`/`num_local_experts`). The parsed JSON is kept whole, so fields moeforge does
// not know are written back unchanged on save.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace moeforge::hf {

struct RopeConfig {
  std::string type = "default";  // default | linear | dynamic | yarn | llama3
  double theta = 10000.0;
  double factor = 1.0;
  double partial_rotary_factor = 1.0;
  std::optional<int64_t> original_max_position_embeddings;
  std::optional<double> attention_factor;  // yarn
  std::optional<double> beta_fast, beta_slow, mscale, mscale_all_dim;
  bool truncate = true;
  double low_freq_factor = 1.0, high_freq_factor = 4.0;  // llama3
};

struct ModelConfig {
  std::string source;      // file the config came from, for error messages
  std::string model_type;  // e.g. "qwen3_moe"
  nlohmann::ordered_json raw;

  int64_t vocab_size = 0, hidden_size = 0, num_hidden_layers = 0;
  int64_t num_attention_heads = 0, num_key_value_heads = 0, head_dim = 0;
  int64_t intermediate_size = 0;  // dense MLP width
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  std::string hidden_act = "silu";
  bool tie_word_embeddings = false;
  bool attention_bias = false;
  std::optional<int64_t> sliding_window;  // effective window (null when the model does not use one)
  RopeConfig rope;
  std::optional<DType> dtype;  // `dtype` (v5) or `torch_dtype` (v4)

  // Mixture of experts.
  int64_t num_experts = 0, num_experts_per_tok = 0, moe_intermediate_size = 0;
  int64_t decoder_sparse_step = 1;
  std::vector<int64_t> mlp_only_layers;
  bool norm_topk_prob = false;
  bool output_router_logits = false;
  double router_aux_loss_coef = 0.001;

  bool is_moe_layer(int64_t layer) const;
};

// `path` is a config.json file or a folder holding one. Throws naming the file and field.
ModelConfig load_config(const std::string& path);
ModelConfig parse_config(const nlohmann::ordered_json& j, const std::string& source);
// Writes `raw` (every original field, in order) atomically to `path`.
void save_config(const ModelConfig& cfg, const std::string& path);

// Typed field access with errors that name the file and the field.
class ConfigReader {
 public:
  ConfigReader(const nlohmann::ordered_json& j, std::string source) : j_(j), source_(std::move(source)) {}
  bool has(const char* key) const;  // present and not null
  int64_t req_int(const char* key) const;
  int64_t opt_int(const char* key, int64_t def) const;
  double opt_double(const char* key, double def) const;
  bool opt_bool(const char* key, bool def) const;
  std::string opt_string(const char* key, const std::string& def) const;
  std::optional<int64_t> opt_nullable_int(const char* key) const;
  std::vector<int64_t> opt_int_list(const char* key) const;
  // The first of `keys` that is present, or throws listing all of them.
  int64_t req_int_any(std::initializer_list<const char*> keys) const;
  [[noreturn]] void fail(const char* key, const std::string& why) const;
  const nlohmann::ordered_json& json() const { return j_; }
  const std::string& source() const { return source_; }

 private:
  const nlohmann::ordered_json& j_;
  std::string source_;
};

RopeConfig parse_rope(const ConfigReader& r);

}  // namespace moeforge::hf
