#include "hf/config.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>

#include "core/error.h"
#include "hf/fs_util.h"

namespace moeforge::hf {

namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;

bool ModelConfig::is_moe_layer(int64_t layer) const {
  if (!blocks.empty()) return blocks.at(static_cast<size_t>(layer)) == Block::Moe;
  // Transformers' rule for qwen2_moe/qwen3_moe: sparse unless listed in mlp_only_layers, and only
  // every decoder_sparse_step-th layer (1-based).
  if (std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer) != mlp_only_layers.end()) return false;
  return num_experts > 0 && decoder_sparse_step > 0 && (layer + 1) % decoder_sparse_step == 0;
}

std::optional<int64_t> ModelConfig::window_of(int64_t layer) const {
  if (!sliding_window) return std::nullopt;
  if (sliding_layers.empty()) return sliding_window;
  return sliding_layers.at(static_cast<size_t>(layer)) ? sliding_window : std::nullopt;
}

bool ConfigReader::has(const char* key) const { return j_.contains(key) && !j_[key].is_null(); }

void ConfigReader::fail(const char* key, const std::string& why) const {
  MF_THROW(source_, ": field '", key, "' ", why);
}

int64_t ConfigReader::req_int(const char* key) const {
  if (!has(key)) fail(key, "is required but missing");
  const auto& v = j_[key];
  if (!v.is_number_integer()) fail(key, "must be an integer, got " + v.dump());
  return v.get<int64_t>();
}

int64_t ConfigReader::req_int_any(std::initializer_list<const char*> keys) const {
  for (const char* k : keys)
    if (has(k)) return req_int(k);
  std::string names;
  for (const char* k : keys) names += std::string(names.empty() ? "" : " or ") + "'" + k + "'";
  MF_THROW(source_, ": field ", names, " is required but missing");
}

int64_t ConfigReader::opt_int(const char* key, int64_t def) const { return has(key) ? req_int(key) : def; }

double ConfigReader::opt_double(const char* key, double def) const {
  if (!has(key)) return def;
  const auto& v = j_[key];
  if (!v.is_number()) fail(key, "must be a number, got " + v.dump());
  return v.get<double>();
}

bool ConfigReader::opt_bool(const char* key, bool def) const {
  if (!has(key)) return def;
  const auto& v = j_[key];
  if (!v.is_boolean()) fail(key, "must be true or false, got " + v.dump());
  return v.get<bool>();
}

std::string ConfigReader::opt_string(const char* key, const std::string& def) const {
  if (!has(key)) return def;
  const auto& v = j_[key];
  if (!v.is_string()) fail(key, "must be a string, got " + v.dump());
  return v.get<std::string>();
}

std::optional<int64_t> ConfigReader::opt_nullable_int(const char* key) const {
  if (!has(key)) return std::nullopt;
  return req_int(key);
}

std::vector<int64_t> ConfigReader::opt_int_list(const char* key) const {
  std::vector<int64_t> out;
  if (!has(key)) return out;
  const auto& v = j_[key];
  if (!v.is_array()) fail(key, "must be a list of integers, got " + v.dump());
  for (const auto& x : v) {
    if (!x.is_number_integer()) fail(key, "must be a list of integers, got " + v.dump());
    out.push_back(x.get<int64_t>());
  }
  return out;
}

RopeConfig parse_rope(const ConfigReader& r, double default_theta) {
  RopeConfig rope;
  // v5 keeps everything in `rope_parameters`; v4 has `rope_theta` at the top and `rope_scaling`
  // (with `type` or `rope_type`) beside it.
  const ojson* params = nullptr;
  const char* where = nullptr;
  if (r.has("rope_parameters")) {
    params = &r.json()["rope_parameters"];
    where = "rope_parameters";
  } else if (r.has("rope_scaling")) {
    params = &r.json()["rope_scaling"];
    where = "rope_scaling";
  }
  rope.theta = r.opt_double("rope_theta", default_theta);
  rope.partial_rotary_factor = r.opt_double("partial_rotary_factor", 1.0);
  if (params) {
    if (!params->is_object()) r.fail(where, "must be an object, got " + params->dump());
    // A per-layer-type dictionary ({"full_attention": {...}, ...}) is not used by these families.
    if (params->contains("full_attention") || params->contains("sliding_attention"))
      r.fail(where, "has per-layer-type RoPE parameters, which this model family does not use");
    const std::string src = r.source() + " (" + where + ")";
    ConfigReader p(*params, src);
    rope.type = p.opt_string("rope_type", p.opt_string("type", "default"));
    rope.theta = p.opt_double("rope_theta", rope.theta);
    rope.partial_rotary_factor = p.opt_double("partial_rotary_factor", rope.partial_rotary_factor);
    rope.factor = p.opt_double("factor", 1.0);
    rope.original_max_position_embeddings = p.opt_nullable_int("original_max_position_embeddings");
    if (p.has("attention_factor")) rope.attention_factor = p.opt_double("attention_factor", 1.0);
    if (p.has("beta_fast")) rope.beta_fast = p.opt_double("beta_fast", 32.0);
    if (p.has("beta_slow")) rope.beta_slow = p.opt_double("beta_slow", 1.0);
    if (p.has("mscale")) rope.mscale = p.opt_double("mscale", 1.0);
    if (p.has("mscale_all_dim")) rope.mscale_all_dim = p.opt_double("mscale_all_dim", 0.0);
    rope.truncate = p.opt_bool("truncate", true);
    rope.low_freq_factor = p.opt_double("low_freq_factor", 1.0);
    rope.high_freq_factor = p.opt_double("high_freq_factor", 4.0);
    static const char* known[] = {"default", "linear", "dynamic", "yarn", "llama3"};
    if (std::find_if(std::begin(known), std::end(known), [&](const char* k) { return rope.type == k; }) ==
        std::end(known))
      MF_THROW(src, ": field 'rope_type' value '", rope.type,
               "' is not supported (supported: default, linear, dynamic, yarn, llama3)");
    if (rope.type != "default" && !p.has("factor")) p.fail("factor", "is required for rope_type '" + rope.type + "'");
    if (rope.type == "llama3" && !rope.original_max_position_embeddings)
      p.fail("original_max_position_embeddings", "is required for rope_type 'llama3'");
  }
  if (rope.theta <= 0) r.fail("rope_theta", "must be positive");
  return rope;
}

void parse_common(const ConfigReader& r, ModelConfig& c, const FamilyDefaults& d) {
  c.vocab_size = r.req_int("vocab_size");
  c.hidden_size = r.req_int("hidden_size");
  c.num_hidden_layers = d.num_hidden_layers ? *d.num_hidden_layers : r.req_int("num_hidden_layers");
  c.num_attention_heads = r.req_int("num_attention_heads");
  c.num_key_value_heads = r.opt_int("num_key_value_heads", d.num_key_value_heads.value_or(c.num_attention_heads));
  c.max_position_embeddings = r.opt_int("max_position_embeddings", d.max_position_embeddings);
  c.rms_norm_eps = r.opt_double("rms_norm_eps", d.rms_norm_eps);
  c.hidden_act = r.opt_string("hidden_act", "silu");
  c.tie_word_embeddings = r.opt_bool("tie_word_embeddings", false);
  for (const char* k : {"vocab_size", "hidden_size", "num_attention_heads"})
    if (r.req_int(k) <= 0) r.fail(k, "must be positive");
  if (c.num_hidden_layers <= 0) r.fail("num_hidden_layers", "must be positive");
  if (c.num_key_value_heads <= 0 || c.num_attention_heads % c.num_key_value_heads != 0)
    r.fail("num_key_value_heads", "must be positive and divide num_attention_heads (" +
                                      std::to_string(c.num_attention_heads) + ")");
  c.head_dim = r.opt_int("head_dim", d.head_dim.value_or(c.hidden_size / c.num_attention_heads));
  if (c.head_dim <= 0 || c.head_dim % 2 != 0) r.fail("head_dim", "must be a positive even number");
  if (c.hidden_act != "silu") r.fail("hidden_act", "value '" + c.hidden_act + "' is not supported (supported: silu)");
  const std::string dt = r.opt_string("dtype", r.opt_string("torch_dtype", ""));
  if (!dt.empty()) {
    c.dtype = dtype_from_torch_name(dt);
    if (!c.dtype) r.fail(r.has("dtype") ? "dtype" : "torch_dtype", "has unknown value '" + dt + "'");
  }
  c.rope = parse_rope(r, d.rope_theta);
  if (r.has("quantization_config")) {
    const auto& q = r.json()["quantization_config"];
    if (!q.is_object()) r.fail("quantization_config", "must be an object");
    ConfigReader qr(q, r.source() + " (quantization_config)");
    c.quant_method = qr.opt_string("quant_method", "");
    if (c.quant_method == "fp8") {
      if (qr.opt_string("fmt", "e4m3") != "e4m3")
        qr.fail("fmt", "is '" + qr.opt_string("fmt", "") + "'; moeforge dequantises e4m3 FP8 checkpoints only");
      const auto block = qr.opt_int_list("weight_block_size");
      if (block.size() != 2 || block[0] <= 0 || block[1] <= 0)
        qr.fail("weight_block_size", "must be two positive integers [rows, cols]");
      c.fp8_block_rows = block[0];
      c.fp8_block_cols = block[1];
    } else if (c.quant_method != "mxfp4") {
      qr.fail("quant_method", "is '" + c.quant_method +
                                  "'; moeforge loads fp8 (block-scaled e4m3) and mxfp4 checkpoints, dequantised to "
                                  "train (convert others to bf16 first)");
    }
  }
  const bool pad_given = r.json().contains("pad_token_id");  // null given means none
  if (r.has("pad_token_id") || (!pad_given && d.pad_token_id)) {
    int64_t pad = r.has("pad_token_id") ? r.req_int("pad_token_id") : *d.pad_token_id;
    if (pad < 0) pad += c.vocab_size;  // as torch's nn.Embedding reads a negative padding_idx
    if (pad < 0 || pad >= c.vocab_size)
      r.fail("pad_token_id", "is " + std::to_string(pad) + ", outside the vocabulary of " +
                                 std::to_string(c.vocab_size));
    c.pad_token_id = pad;
  }
}

void cut_to_layers(ojson& raw, int64_t layers) {
  raw["num_hidden_layers"] = layers;
  for (const char* key : {"layer_types", "layers_block_type"})
    if (raw.contains(key) && raw[key].is_array() && static_cast<int64_t>(raw[key].size()) > layers)
      raw[key] = ojson(std::vector<ojson>(raw[key].begin(), raw[key].begin() + layers));
  if (raw.contains("hybrid_override_pattern") && raw["hybrid_override_pattern"].is_string()) {
    const std::string p = raw["hybrid_override_pattern"].get<std::string>();
    if (static_cast<int64_t>(p.size()) > layers) raw["hybrid_override_pattern"] = p.substr(0, static_cast<size_t>(layers));
  }
}

namespace {

// Sizes beyond any model moeforge can hold are refused before anything is built or counted from
// them (an absurd expert count used to make `inspect` allocate until the kernel killed it, and
// parameter counts overflow 64 bits long before that).
void check_sizes(const ConfigReader& r, const ModelConfig& c) {
  const struct {
    const char* key;
    int64_t value, max;
  } limits[] = {{"vocab_size", c.vocab_size, int64_t{1} << 24},
                {"hidden_size", c.hidden_size, int64_t{1} << 17},
                {"num_hidden_layers", c.num_hidden_layers, int64_t{1} << 12},
                {"num_attention_heads", c.num_attention_heads, int64_t{1} << 12},
                {"head_dim", c.head_dim, int64_t{1} << 12},
                {"intermediate_size", c.intermediate_size, int64_t{1} << 20},
                {"moe_intermediate_size", c.moe_intermediate_size, int64_t{1} << 20},
                {"num_experts", c.num_experts, int64_t{1} << 14}};
  for (const auto& l : limits)
    if (l.value > l.max)
      r.fail(l.key, "is " + std::to_string(l.value) + ", beyond any model moeforge can hold (at most " +
                        std::to_string(l.max) + ")");
  // Each within bounds, the product can still be absurd: the weights' count, roughly, in floating point.
  const double h = static_cast<double>(c.hidden_size), layers = static_cast<double>(c.num_hidden_layers);
  const double attention = 4.0 * h * static_cast<double>(c.num_attention_heads) * static_cast<double>(c.head_dim);
  const double mlp = 3.0 * h * (static_cast<double>(c.intermediate_size) +
                                static_cast<double>(c.num_experts) * static_cast<double>(c.moe_intermediate_size));
  const double total = layers * (attention + mlp) + 2.0 * static_cast<double>(c.vocab_size) * h;
  if (total > 0x1p50) {
    char about[32];
    std::snprintf(about, sizeof about, "%.2g", total);
    r.fail("num_hidden_layers", std::string("with these sizes the model has about ") + about +
                                    " parameters, beyond what moeforge can hold (2^50, about 1.1e+15)");
  }
}

}  // namespace

ModelConfig parse_config(const ojson& j, const std::string& source) {
  MF_CHECK(j.is_object(), source, ": config must be a JSON object");
  ConfigReader r(j, source);
  ModelConfig c;
  c.source = source;
  c.raw = j;
  if (!r.has("model_type")) r.fail("model_type", "is required but missing");
  c.model_type = r.opt_string("model_type", "");
  parse_family(r, c);
  check_sizes(r, c);
  return c;
}

ModelConfig load_config(const std::string& path) {
  std::string file = path;
  if (fs::is_directory(path)) file = (fs::path(path) / "config.json").string();
  MF_CHECK(fs::exists(file), file, ": no such file (a model folder needs a config.json)");
  ojson j;
  const std::string text = read_text_file(file);
  check_json_depth(text, file);
  try {
    j = ojson::parse(text);
  } catch (const ojson::exception& e) {
    MF_THROW(file, ": invalid JSON (", e.what(), ")");
  }
  return parse_config(j, file);
}

void save_config(const ModelConfig& cfg, const std::string& path) {
  write_text_file_atomic(path, cfg.raw.dump(2) + "\n");
}

}  // namespace moeforge::hf
