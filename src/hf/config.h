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
  // The embedding row that gets no gradient from the lookup (Transformers builds nn.Embedding with
  // padding_idx = pad_token_id); null when the config has none.
  std::optional<int64_t> pad_token_id;
  // Attention and MLP variants of the families.
  bool qkv_bias = false;  // bias on q_proj/k_proj/v_proj (attention_bias, or Qwen2's always-on QKV bias)
  bool o_bias = false;    // bias on o_proj
  bool mlp_bias = false;  // bias on the dense MLP's projections (Llama's mlp_bias)
  enum class QkNorm { None, PerHead, Full };
  // RMSNorm on q and k: per head of head_dim (Qwen3) or over the whole projection (OLMoE).
  QkNorm qk_norm = QkNorm::None;
  std::optional<double> clip_qkv;  // OLMoE: q, k, v clamped to [-clip, clip] after the norms
  bool attention_sinks = false;    // GPT-OSS: a learned logit per head joins every softmax
  std::optional<int64_t> sliding_window;  // the window of the layers that use one (null: none does)
  // Per layer, whether it uses sliding_window (from `layer_types` or the family's rule); empty: all.
  std::vector<bool> sliding_layers;
  RopeConfig rope;
  std::optional<DType> dtype;  // `dtype` (v5) or `torch_dtype` (v4)
  // quantization_config of a quantised checkpoint, dequantised on load: "fp8" (block-scaled e4m3,
  // DeepSeek-V3 and Qwen3-FP8 style) with its [rows, cols] blocks, or "mxfp4" (GPT-OSS's experts).
  std::string quant_method;
  int64_t fp8_block_rows = 0, fp8_block_cols = 0;

  // Mixture of experts.
  int64_t num_experts = 0, num_experts_per_tok = 0, moe_intermediate_size = 0;
  int64_t decoder_sparse_step = 1;
  std::vector<int64_t> mlp_only_layers;
  bool norm_topk_prob = false;
  bool output_router_logits = false;
  double router_aux_loss_coef = 0.001;
  // Qwen2-MoE: a shared expert of this width beside the routed ones, scaled by sigmoid(x . gate)
  // (0: none).
  int64_t shared_expert_intermediate_size = 0;
  // GPT-OSS's MoE (nn::SparseMoE::GptOssStyle): biased router softmaxing its top-k logits, biased
  // experts in Transformers' [E, H, 2I] interleaved layout with the clamped SwiGLU.
  bool gpt_oss_moe = false;
  double swiglu_limit = 7.0;

  // DeepSeek-V3's multi-head latent attention. head_dim then holds qk_rope_head_dim (the RoPE width),
  // as DeepseekV3Config sets it.
  struct LatentAttention {
    int64_t q_lora_rank = 0;  // 0: q_proj straight from the hidden state
    int64_t kv_lora_rank = 0, qk_nope_head_dim = 0, qk_rope_head_dim = 0, v_head_dim = 0;
    bool rope_interleave = true;
  };
  std::optional<LatentAttention> mla;
  // DeepSeek-V3's routing: sigmoid scores; the choice adds e_score_correction_bias and keeps the
  // topk_group best of n_group groups (a group's score: its two best); weights scaled by
  // routed_scaling_factor (after the renormalisation of norm_topk_prob).
  struct GroupedSigmoidRouting {
    int64_t n_group = 1, topk_group = 1;
    double routed_scaling_factor = 1.0;
  };
  std::optional<GroupedSigmoidRouting> grouped_sigmoid_routing;
  int64_t n_shared_experts = 0;  // DeepSeek-V3: ungated shared experts, n * moe_intermediate_size wide
  int64_t num_nextn_predict_layers = 0;  // DeepSeek-V3's multi-token prediction layers in checkpoints
  // The multi-token prediction layers the model builds: those of the num_nextn_predict_layers that
  // the checkpoint holds (from_pretrained sets it; Transformers writes none). Not a config.json field.
  int64_t mtp_layers = 0;
  // Nemotron-H's hybrid stack: each layer is one pre-norm block of one kind (layers_block_type, or
  // the older hybrid_override_pattern); empty for the attention + MLP layers of the other families.
  enum class Block { Mamba, Attention, Moe, Mlp };
  std::vector<Block> blocks;
  // Mamba2's mixer (Nemotron-H): heads x head_dim channels in n_groups groups sharing B and C.
  struct Mamba2 {
    int64_t heads = 0, head_dim = 0, groups = 1, state = 0, conv_kernel = 4, chunk = 128;
    bool conv_bias = true, proj_bias = false;
    double dt_min = 0.001;  // dt floored here (Transformers' torch path: time_step_limit (time_step_min, inf))
  };
  std::optional<Mamba2> mamba;
  // Nemotron-H's MLPs and experts: down(relu(up(x))^2), ungated; its MoE adds one such shared
  // expert of this width, and with a latent size runs the experts in that width between two
  // projections (Nemotron 3 Super).
  bool relu2_mlp = false;
  int64_t relu2_shared_intermediate_size = 0;
  int64_t moe_latent_size = 0;
  bool no_rope = false;  // attention without position encoding (Nemotron-H's)

  bool is_moe_layer(int64_t layer) const;
  // The attention window of a layer (null: full causal attention).
  std::optional<int64_t> window_of(int64_t layer) const;
};

// `path` is a config.json file or a folder holding one. Throws naming the file and field.
ModelConfig load_config(const std::string& path);
ModelConfig parse_config(const nlohmann::ordered_json& j, const std::string& source);
// config.json cut to its first `layers` layers: num_hidden_layers, and the per-layer lists
// (layer_types, Nemotron-H's layers_block_type or hybrid_override_pattern) cut to their prefix.
void cut_to_layers(nlohmann::ordered_json& raw, int64_t layers);
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

// `default_theta`: the family's rope_theta when the config names none (Mixtral's is 1e6).
RopeConfig parse_rope(const ConfigReader& r, double default_theta = 10000.0);

// What a family's configuration class fills in for fields config.json leaves out.
struct FamilyDefaults {
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  int64_t max_position_embeddings = 32768;
  std::optional<int64_t> num_key_value_heads;  // null: as many as attention heads
  std::optional<int64_t> head_dim;             // null: hidden_size / num_attention_heads
  std::optional<int64_t> pad_token_id;         // OLMoE's class defaults it to 1
  std::optional<int64_t> num_hidden_layers;    // derived by the family (Nemotron-H: its block list)
};
// The fields every family shares (sizes, norms, RoPE, dtype), checked; throws naming the field.
void parse_common(const ConfigReader& r, ModelConfig& c, const FamilyDefaults& d);
// Each supported family's own fields (hf/family_configs.cpp); throws for other model types.
void parse_family(const ConfigReader& r, ModelConfig& c);
std::vector<std::string> supported_config_types();

}  // namespace moeforge::hf
