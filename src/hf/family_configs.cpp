// Each family's config.json fields, read as its Transformers configuration class reads them
// (defaults for fields left out, the derived per-layer choices of __post_init__).
#include <algorithm>
#include <functional>
#include <map>

#include "core/error.h"
#include "hf/config.h"

namespace moeforge::hf {

namespace {

// The MoE fields the routed families share; `experts_keys` are the expert count's spellings (the
// first is the class's own), `default_experts` the class's default when none is given.
void parse_routed_experts(const ConfigReader& r, ModelConfig& c, std::initializer_list<const char*> experts_keys,
                          int64_t default_experts, int64_t default_top_k, double default_aux_coef) {
  c.num_experts = default_experts;
  for (const char* k : experts_keys)
    if (r.has(k)) {
      c.num_experts = r.req_int(k);
      break;
    }
  c.num_experts_per_tok = r.opt_int("num_experts_per_tok", default_top_k);
  c.output_router_logits = r.opt_bool("output_router_logits", false);
  c.router_aux_loss_coef = r.opt_double("router_aux_loss_coef", default_aux_coef);
  if (c.num_experts <= 0) r.fail(*experts_keys.begin(), "must be positive");
  if (c.num_experts_per_tok <= 0 || c.num_experts_per_tok > c.num_experts)
    r.fail("num_experts_per_tok", "must be between 1 and the number of experts (" + std::to_string(c.num_experts) + ")");
}

// decoder_sparse_step / mlp_only_layers (Qwen2-MoE, Qwen3-MoE).
void parse_sparse_layers(const ConfigReader& r, ModelConfig& c) {
  c.decoder_sparse_step = r.opt_int("decoder_sparse_step", 1);
  c.mlp_only_layers = r.opt_int_list("mlp_only_layers");
  if (c.decoder_sparse_step <= 0) r.fail("decoder_sparse_step", "must be positive");
  for (auto l : c.mlp_only_layers)
    if (l < 0 || l >= c.num_hidden_layers)
      r.fail("mlp_only_layers", "lists layer " + std::to_string(l) + " but the model has " +
                                    std::to_string(c.num_hidden_layers) + " layers");
}

void check_positive(const ConfigReader& r, const char* key, int64_t v) {
  if (v <= 0) r.fail(key, "must be positive");
}

// `layer_types` when config.json has it (Transformers 5 writes it), else `rule(layer)`.
void parse_layer_types(const ConfigReader& r, ModelConfig& c, const std::function<bool(int64_t)>& rule) {
  c.sliding_layers.assign(static_cast<size_t>(c.num_hidden_layers), false);
  if (!r.has("layer_types")) {
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) c.sliding_layers[l] = rule(l);
    return;
  }
  const auto& v = r.json()["layer_types"];
  if (!v.is_array() || static_cast<int64_t>(v.size()) != c.num_hidden_layers)
    r.fail("layer_types", "must list one entry per layer (" + std::to_string(c.num_hidden_layers) + ")");
  for (size_t l = 0; l < v.size(); ++l) {
    const std::string t = v[l].is_string() ? v[l].get<std::string>() : v[l].dump();
    if (t != "full_attention" && t != "sliding_attention")
      r.fail("layer_types", "entry " + std::to_string(l) + " is '" + t +
                                "' (supported: full_attention, sliding_attention)");
    c.sliding_layers[l] = t == "sliding_attention";
  }
}

// use_sliding_window + sliding_window, as Qwen2/Qwen3/Qwen2-MoE/Qwen3-MoE keep them.
void parse_optional_window(const ConfigReader& r, ModelConfig& c) {
  if (!r.opt_bool("use_sliding_window", false)) return;
  // Left out, the classes' default 4096 applies; null means no window.
  c.sliding_window = r.json().contains("sliding_window") ? r.opt_nullable_int("sliding_window") : 4096;
  if (c.sliding_window && *c.sliding_window <= 0) r.fail("sliding_window", "must be positive");
}

void parse_qwen3_moe(const ConfigReader& r, ModelConfig& c) {
  parse_common(r, c, {});
  c.intermediate_size = r.opt_int("intermediate_size", 6144);
  // The hub spells the expert count `num_experts`; Transformers 5 writes `num_local_experts`.
  parse_routed_experts(r, c, {"num_experts", "num_local_experts"}, 128, 8, 0.001);
  c.moe_intermediate_size = r.opt_int("moe_intermediate_size", 768);
  check_positive(r, "moe_intermediate_size", c.moe_intermediate_size);
  parse_sparse_layers(r, c);
  c.norm_topk_prob = r.opt_bool("norm_topk_prob", false);
  c.qk_norm = ModelConfig::QkNorm::PerHead;
  c.qkv_bias = c.o_bias = r.opt_bool("attention_bias", false);
  parse_optional_window(r, c);  // every layer (Qwen3MoeConfig has no layer_types)
}

void parse_qwen2_moe(const ConfigReader& r, ModelConfig& c) {
  parse_common(r, c, {});
  c.intermediate_size = r.opt_int("intermediate_size", 5632);
  parse_routed_experts(r, c, {"num_experts", "num_local_experts"}, 60, 4, 0.001);
  c.moe_intermediate_size = r.opt_int("moe_intermediate_size", 1408);
  c.shared_expert_intermediate_size = r.opt_int("shared_expert_intermediate_size", 5632);
  check_positive(r, "moe_intermediate_size", c.moe_intermediate_size);
  check_positive(r, "shared_expert_intermediate_size", c.shared_expert_intermediate_size);
  parse_sparse_layers(r, c);
  c.norm_topk_prob = r.opt_bool("norm_topk_prob", false);
  c.qkv_bias = r.opt_bool("qkv_bias", true);
  const bool use = r.opt_bool("use_sliding_window", false);
  parse_optional_window(r, c);
  const int64_t max_window_layers = r.opt_int("max_window_layers", 28);
  // Qwen2MoeConfig.__post_init__: the even layers below max_window_layers, when enabled.
  parse_layer_types(r, c, [&](int64_t l) { return use && l % 2 == 0 && l < max_window_layers; });
}

void parse_mixtral(const ConfigReader& r, ModelConfig& c) {
  FamilyDefaults d;
  d.rms_norm_eps = 1e-5;
  d.rope_theta = 1e6;
  d.max_position_embeddings = 4096 * 32;
  d.num_key_value_heads = 8;
  parse_common(r, c, d);
  parse_routed_experts(r, c, {"num_local_experts", "num_experts"}, 8, 2, 0.001);
  // Every layer is sparse; the experts are intermediate_size wide; the top-k is always renormalised.
  c.intermediate_size = c.moe_intermediate_size = r.opt_int("intermediate_size", 14336);
  check_positive(r, "intermediate_size", c.intermediate_size);
  c.norm_topk_prob = true;
  c.sliding_window = r.opt_nullable_int("sliding_window");
  if (c.sliding_window && *c.sliding_window <= 0) r.fail("sliding_window", "must be positive");
  const double jitter = r.opt_double("router_jitter_noise", 0.0);
  if (jitter != 0.0)
    r.fail("router_jitter_noise", "is " + std::to_string(jitter) +
                                      "; moeforge does not apply router jitter (set it to 0 to train without it)");
}

void parse_olmoe(const ConfigReader& r, ModelConfig& c) {
  FamilyDefaults d;
  d.rms_norm_eps = 1e-5;
  d.max_position_embeddings = 4096;
  d.pad_token_id = 1;
  parse_common(r, c, d);
  parse_routed_experts(r, c, {"num_experts", "num_local_experts"}, 64, 8, 0.01);
  c.intermediate_size = c.moe_intermediate_size = r.opt_int("intermediate_size", 2048);
  check_positive(r, "intermediate_size", c.intermediate_size);
  c.norm_topk_prob = r.opt_bool("norm_topk_prob", false);
  c.qkv_bias = c.o_bias = r.opt_bool("attention_bias", false);
  // OlmoeAttention normalises q over hidden_size and k over (hidden / heads) * kv_heads values.
  c.qk_norm = ModelConfig::QkNorm::Full;
  if (c.head_dim * c.num_attention_heads != c.hidden_size)
    r.fail("head_dim", "must be hidden_size / num_attention_heads for olmoe (its q/k norms span hidden_size)");
  if (r.has("clip_qkv")) {
    c.clip_qkv = r.opt_double("clip_qkv", 0.0);
    if (*c.clip_qkv <= 0) r.fail("clip_qkv", "must be positive or null");
  }
}

void parse_dense(const ConfigReader& r, ModelConfig& c, const FamilyDefaults& d, int64_t default_inter) {
  parse_common(r, c, d);
  c.intermediate_size = r.opt_int("intermediate_size", default_inter);
  check_positive(r, "intermediate_size", c.intermediate_size);
}

void parse_llama(const ConfigReader& r, ModelConfig& c) {
  FamilyDefaults d;
  d.max_position_embeddings = 2048;
  parse_dense(r, c, d, 11008);
  c.qkv_bias = c.o_bias = r.opt_bool("attention_bias", false);
  c.mlp_bias = r.opt_bool("mlp_bias", false);
}

void parse_mistral(const ConfigReader& r, ModelConfig& c) {
  FamilyDefaults d;
  d.max_position_embeddings = 4096 * 32;
  d.num_key_value_heads = 8;
  parse_dense(r, c, d, 14336);
  // MistralConfig's sliding_window defaults to 4096 and applies to every layer.
  c.sliding_window = r.json().contains("sliding_window") ? r.opt_nullable_int("sliding_window") : 4096;
  if (c.sliding_window && *c.sliding_window <= 0) r.fail("sliding_window", "must be positive");
}

// Qwen2 and Qwen3 (dense): the layers from max_window_layers on slide, when enabled.
void parse_qwen_dense_window(const ConfigReader& r, ModelConfig& c) {
  parse_optional_window(r, c);
  const int64_t max_window_layers = r.opt_int("max_window_layers", 28);
  const bool use = c.sliding_window.has_value();
  parse_layer_types(r, c, [&](int64_t l) { return use && l >= max_window_layers; });
}

void parse_qwen2(const ConfigReader& r, ModelConfig& c) {
  parse_dense(r, c, {}, 22016);
  c.qkv_bias = true;  // Qwen2Attention: bias on q/k/v always, none on o
  parse_qwen_dense_window(r, c);
}

void parse_qwen3(const ConfigReader& r, ModelConfig& c) {
  FamilyDefaults d;
  d.head_dim = 128;  // Qwen3Config's default, not hidden / heads
  parse_dense(r, c, d, 22016);
  c.qk_norm = ModelConfig::QkNorm::PerHead;
  c.qkv_bias = c.o_bias = r.opt_bool("attention_bias", false);
  parse_qwen_dense_window(r, c);
}

void parse_gpt_oss(const ConfigReader& r, ModelConfig& c) {
  FamilyDefaults d;
  d.rms_norm_eps = 1e-5;
  d.rope_theta = 150000.0;
  d.max_position_embeddings = 131072;
  d.num_key_value_heads = 8;
  d.head_dim = 64;
  parse_common(r, c, d);
  if (!r.has("rope_parameters") && !r.has("rope_scaling")) {
    // GptOssConfig.__post_init__'s YaRN when the config names no RoPE parameters.
    c.rope.type = "yarn";
    c.rope.factor = 32.0;
    c.rope.beta_fast = 32.0;
    c.rope.beta_slow = 1.0;
    c.rope.truncate = false;
    c.rope.original_max_position_embeddings = 4096;
  }
  parse_routed_experts(r, c, {"num_local_experts", "num_experts"}, 128, 4, 0.001);
  c.intermediate_size = c.moe_intermediate_size = r.opt_int("intermediate_size", 2880);
  check_positive(r, "intermediate_size", c.intermediate_size);
  c.qkv_bias = c.o_bias = r.opt_bool("attention_bias", true);
  c.attention_sinks = true;
  c.gpt_oss_moe = true;
  // Transformers' GptOssExperts hard-codes 7.0, the value every GPT-OSS config.json carries.
  c.swiglu_limit = r.opt_double("swiglu_limit", 7.0);
  if (c.swiglu_limit <= 0) r.fail("swiglu_limit", "must be positive");
  c.sliding_window = r.json().contains("sliding_window") ? r.opt_nullable_int("sliding_window") : 128;
  if (c.sliding_window && *c.sliding_window <= 0) r.fail("sliding_window", "must be positive");
  // GptOssConfig.__post_init__: even layers slide, odd layers attend to everything.
  parse_layer_types(r, c, [](int64_t l) { return l % 2 == 0; });
}

// DeepSeek-V3's grouped sigmoid routing (n_group, topk_group, routed_scaling_factor, with the
// class's defaults in `d`), checked against the expert count and top-k; Nemotron-H reads the same.
void parse_grouped_sigmoid(const ConfigReader& r, ModelConfig& c, const ModelConfig::GroupedSigmoidRouting& d) {
  ModelConfig::GroupedSigmoidRouting g;
  g.n_group = r.opt_int("n_group", d.n_group);
  g.topk_group = r.opt_int("topk_group", d.topk_group);
  g.routed_scaling_factor = r.opt_double("routed_scaling_factor", d.routed_scaling_factor);
  if (g.n_group <= 0 || c.num_experts % g.n_group != 0)
    r.fail("n_group", "must divide the " + std::to_string(c.num_experts) + " routed experts");
  if (g.n_group > 1 && c.num_experts / g.n_group < 2)
    r.fail("n_group", "leaves fewer than 2 experts per group (a group scores its best two)");
  if (g.topk_group <= 0 || g.topk_group > g.n_group) r.fail("topk_group", "must be between 1 and n_group");
  if (c.num_experts_per_tok > g.topk_group * (c.num_experts / g.n_group))
    r.fail("num_experts_per_tok", "exceeds the experts of the topk_group groups kept");
  c.grouped_sigmoid_routing = g;
}

void parse_deepseek_v3(const ConfigReader& r, ModelConfig& c) {
  FamilyDefaults d;
  d.max_position_embeddings = 4096;
  parse_common(r, c, d);
  ModelConfig::LatentAttention mla;
  mla.q_lora_rank = r.has("q_lora_rank") ? r.req_int("q_lora_rank") : (r.json().contains("q_lora_rank") ? 0 : 1536);
  mla.kv_lora_rank = r.opt_int("kv_lora_rank", 512);
  mla.qk_nope_head_dim = r.opt_int("qk_nope_head_dim", 128);
  mla.qk_rope_head_dim = r.opt_int("qk_rope_head_dim", 64);
  mla.v_head_dim = r.opt_int("v_head_dim", 128);
  mla.rope_interleave = r.opt_bool("rope_interleave", true);
  for (auto [k, v] : {std::pair{"kv_lora_rank", mla.kv_lora_rank}, std::pair{"qk_nope_head_dim", mla.qk_nope_head_dim},
                      std::pair{"v_head_dim", mla.v_head_dim}})
    check_positive(r, k, v);
  if (mla.q_lora_rank < 0) r.fail("q_lora_rank", "must be positive or null");
  if (mla.qk_rope_head_dim <= 0 || mla.qk_rope_head_dim % 2) r.fail("qk_rope_head_dim", "must be a positive even number");
  c.mla = mla;
  c.head_dim = mla.qk_rope_head_dim;  // DeepseekV3Config.__post_init__: the RoPE tables' width
  c.qkv_bias = c.o_bias = r.opt_bool("attention_bias", false);
  c.intermediate_size = r.opt_int("intermediate_size", 18432);
  check_positive(r, "intermediate_size", c.intermediate_size);
  parse_routed_experts(r, c, {"n_routed_experts", "num_local_experts"}, 256, 8, 0.001);
  c.output_router_logits = false;  // DeepseekV3ForCausalLM has no load-balancing loss
  c.moe_intermediate_size = r.opt_int("moe_intermediate_size", 2048);
  check_positive(r, "moe_intermediate_size", c.moe_intermediate_size);
  c.n_shared_experts = r.opt_int("n_shared_experts", 1);
  if (c.n_shared_experts < 0) r.fail("n_shared_experts", "must not be negative");
  c.norm_topk_prob = r.opt_bool("norm_topk_prob", true);
  parse_grouped_sigmoid(r, c, {8, 4, 2.5});
  // The first first_k_dense_replace layers have a dense MLP, the rest experts.
  const int64_t dense = r.opt_int("first_k_dense_replace", 3);
  if (dense < 0) r.fail("first_k_dense_replace", "must not be negative");
  for (int64_t l = 0; l < std::min(dense, c.num_hidden_layers); ++l) c.mlp_only_layers.push_back(l);
  c.num_nextn_predict_layers = r.opt_int("num_nextn_predict_layers", r.opt_int("num_mtp_layers", 1));
}

// NemotronHConfig: the block kinds first (the layer count is their number), then the Mamba2 mixer,
// the relu^2 MoE with DeepSeek's grouped sigmoid routing, and GQA without RoPE.
std::vector<ModelConfig::Block> nemotron_blocks(const ConfigReader& r) {
  using B = ModelConfig::Block;
  std::vector<B> out;
  if (r.has("layers_block_type") || r.has("layer_types")) {
    const char* key = r.has("layers_block_type") ? "layers_block_type" : "layer_types";
    const auto& v = r.json()[key];
    if (!v.is_array() || v.empty()) r.fail(key, "must be a non-empty list of block types");
    for (size_t l = 0; l < v.size(); ++l) {
      const std::string t = v[l].is_string() ? v[l].get<std::string>() : v[l].dump();
      // Transformers' names and their legacy spellings (remap_legacy_layer_types).
      if (t == "linear_attention" || t == "mamba") out.push_back(B::Mamba);
      else if (t == "full_attention" || t == "attention") out.push_back(B::Attention);
      else if (t == "moe") out.push_back(B::Moe);
      else if (t == "mlp") out.push_back(B::Mlp);
      else r.fail(key, "entry " + std::to_string(l) + " is '" + t + "' (supported: linear_attention or mamba, "
                       "full_attention or attention, moe, mlp)");
    }
    return out;
  }
  if (!r.has("hybrid_override_pattern")) return {B::Mamba, B::Moe, B::Attention, B::Mlp};  // the class's default
  const std::string p = r.opt_string("hybrid_override_pattern", "");
  if (p.empty()) r.fail("hybrid_override_pattern", "must not be empty");
  for (size_t l = 0; l < p.size(); ++l) {
    switch (p[l]) {
      case 'M': out.push_back(B::Mamba); break;
      case '*': out.push_back(B::Attention); break;
      case 'E': out.push_back(B::Moe); break;
      case '-': out.push_back(B::Mlp); break;
      default:
        r.fail("hybrid_override_pattern", std::string("has '") + p[l] + "' at position " + std::to_string(l) +
                                              " (M mamba, * attention, E moe, - mlp)");
    }
  }
  return out;
}

void parse_nemotron_h(const ConfigReader& r, ModelConfig& c) {
  c.blocks = nemotron_blocks(r);
  FamilyDefaults d;
  d.max_position_embeddings = 4096;
  d.num_key_value_heads = 8;
  d.head_dim = 128;
  d.num_hidden_layers = static_cast<int64_t>(c.blocks.size());
  parse_common(r, c, d);
  c.rms_norm_eps = r.opt_double("layer_norm_epsilon", 1e-5);  // every norm's, the Mamba one's too
  c.pad_token_id.reset();  // NemotronHModel's embedding has no padding_idx
  // NemotronHForCausalLM declares no tied weights (_tied_weights_keys is empty): its lm_head is its
  // own tensor whatever tie_word_embeddings says.
  c.tie_word_embeddings = false;
  c.no_rope = true;
  // (Transformers builds q/k/v/o without biases whatever attention_bias says.)
  auto either = [&](const char* key, const char* legacy, int64_t def) {
    return r.has(key) ? r.req_int(key) : r.opt_int(legacy, def);
  };
  ModelConfig::Mamba2 m;
  m.heads = r.opt_int("mamba_num_heads", 128);
  m.head_dim = r.opt_int("mamba_head_dim", 64);
  m.groups = either("n_groups", "mamba_n_groups", 8);
  m.state = r.opt_int("ssm_state_size", 128);
  m.conv_kernel = either("conv_kernel", "mamba_d_conv", 4);
  m.chunk = either("chunk_size", "mamba_chunk_size", 128);
  m.conv_bias = r.has("use_conv_bias") ? r.opt_bool("use_conv_bias", true) : r.opt_bool("mamba_conv_bias", true);
  m.proj_bias = r.opt_bool("use_bias", false);
  m.dt_min = r.has("time_step_min") ? r.opt_double("time_step_min", 0.001) : r.opt_double("mamba_dt_min", 0.001);
  for (auto [k, v] : {std::pair{"mamba_num_heads", m.heads}, std::pair{"mamba_head_dim", m.head_dim},
                      std::pair{"n_groups", m.groups}, std::pair{"ssm_state_size", m.state},
                      std::pair{"conv_kernel", m.conv_kernel}, std::pair{"chunk_size", m.chunk}})
    check_positive(r, k, v);
  if (m.heads % m.groups != 0) r.fail("n_groups", "must divide mamba_num_heads (" + std::to_string(m.heads) + ")");
  if (r.opt_string("mamba_hidden_act", "silu") != "silu")
    r.fail("mamba_hidden_act", "value '" + r.opt_string("mamba_hidden_act", "") + "' is not supported (supported: silu)");
  c.mamba = m;
  c.relu2_mlp = true;
  if (r.opt_string("mlp_hidden_act", "relu2") != "relu2")
    r.fail("mlp_hidden_act", "value '" + r.opt_string("mlp_hidden_act", "") + "' is not supported (supported: relu2)");
  c.mlp_bias = r.opt_bool("mlp_bias", false);
  c.intermediate_size = r.opt_int("intermediate_size", 21504);
  check_positive(r, "intermediate_size", c.intermediate_size);
  const bool any_moe = std::count(c.blocks.begin(), c.blocks.end(), ModelConfig::Block::Moe) > 0;
  parse_routed_experts(r, c, {"n_routed_experts", "num_local_experts"}, 8, 2, 0.001);
  c.output_router_logits = false;  // NemotronHForCausalLM has no load-balancing loss
  if (!any_moe) c.num_experts = 0;
  c.moe_intermediate_size = r.opt_int("moe_intermediate_size", 7688);
  c.relu2_shared_intermediate_size = r.opt_int("moe_shared_expert_intermediate_size", 7688);
  c.moe_latent_size = r.has("moe_latent_size") ? r.req_int("moe_latent_size") : 0;
  if (any_moe) {
    check_positive(r, "moe_intermediate_size", c.moe_intermediate_size);
    check_positive(r, "moe_shared_expert_intermediate_size", c.relu2_shared_intermediate_size);
    if (c.moe_latent_size < 0) r.fail("moe_latent_size", "must be positive or null");
  }
  c.norm_topk_prob = r.opt_bool("norm_topk_prob", true);
  if (any_moe) parse_grouped_sigmoid(r, c, {1, 1, 1.0});
  // Multi-token prediction layers (mtp.*) are not part of NemotronHForCausalLM: ignored on load.
}

using Parser = void (*)(const ConfigReader&, ModelConfig&);
const std::map<std::string, Parser>& parsers() {
  static const std::map<std::string, Parser> m = {
      {"qwen3_moe", parse_qwen3_moe}, {"qwen2_moe", parse_qwen2_moe}, {"mixtral", parse_mixtral},
      {"olmoe", parse_olmoe},         {"llama", parse_llama},         {"mistral", parse_mistral},
      {"qwen2", parse_qwen2},         {"qwen3", parse_qwen3},         {"gpt_oss", parse_gpt_oss},
      {"deepseek_v3", parse_deepseek_v3}, {"nemotron_h", parse_nemotron_h},
  };
  return m;
}

}  // namespace

std::vector<std::string> supported_config_types() {
  std::vector<std::string> v;
  for (const auto& [k, _] : parsers()) v.push_back(k);
  return v;
}

void parse_family(const ConfigReader& r, ModelConfig& c) {
  auto it = parsers().find(c.model_type);
  if (it == parsers().end()) {
    std::string list;
    for (const auto& k : supported_config_types()) list += (list.empty() ? "" : ", ") + k;
    r.fail("model_type", "value '" + c.model_type + "' is not supported (supported: " + list + ")");
  }
  it->second(r, c);
}

}  // namespace moeforge::hf
