#include "models/decoder/decoder.h"

#include <algorithm>
#include <cstdlib>
#include <chrono>

#include "core/error.h"
#include "ops/ops.h"

namespace moeforge::models {

Decoder::Decoder(hf::ModelConfig c, Parallel par, ExpertNaming naming)
    : CausalLM(std::move(c), par), rope_(cfg_.rope, cfg_.head_dim, cfg_.max_position_embeddings) {
  const auto& c_ = cfg_;
  MF_CHECK(c_.mtp_layers >= 0 && c_.mtp_layers <= c_.num_nextn_predict_layers, "internal: ", c_.mtp_layers,
           " multi-token prediction layers built of the config's ", c_.num_nextn_predict_layers);
  const bool hybrid = !c_.blocks.empty();  // Nemotron-H's names: embeddings, norm_f
  embed_ = params_.add(hybrid ? "model.embeddings.weight" : "model.embed_tokens.weight", {c_.vocab_size, c_.hidden_size});
  main_layers_ = static_cast<size_t>(c_.num_hidden_layers);
  layers_.resize(main_layers_ + static_cast<size_t>(c_.mtp_layers));
  size_t moe_layers = 0;
  for (int64_t l = 0; l < c_.num_hidden_layers; ++l) add_layer(l, naming, moe_layers);
  final_norm_.init(params_, hybrid ? "model.norm_f.weight" : "model.norm.weight", c_.hidden_size,
                   static_cast<float>(c_.rms_norm_eps));
  if (c_.quant_method == "fp8") adapter_.set_fp8_blocks(c_.fp8_block_rows, c_.fp8_block_cols);
  if (c_.tie_word_embeddings) {
    lm_head_ = embed_;
    adapter_.ignore("lm_head.weight");  // Transformers ties it to the embedding whatever is stored
  } else {
    lm_head_ = params_.add("lm_head.weight", {c_.vocab_size, c_.hidden_size});
  }
  for (int64_t d = 1; d <= c_.mtp_layers; ++d) add_mtp_depth(d, naming, moe_layers);
  for (int64_t i = c_.mtp_layers; i < c_.num_nextn_predict_layers; ++i)
    adapter_.ignore_prefix("model.layers." + std::to_string(c_.num_hidden_layers + i) + ".",
                           "a multi-token prediction layer the checkpoint holds only in part");
  if (hybrid) {
    // Nemotron-H checkpoints keep the backbone under `backbone.` (Transformers 5 reads it as
    // `model.` and writes it back); its multi-token prediction layers are not part of the model.
    for (const auto& p : params_.all())
      if (p.name.rfind("model.", 0) == 0) adapter_.rename(p.name, "backbone." + p.name.substr(6));
    adapter_.ignore_prefix("mtp.", "a multi-token prediction layer (NemotronHForCausalLM has none)");
  }
  // Each decoder layer's parameters, by their internal names' "model.layers.<l>." prefix.
  layer_params_.resize(layers_.size());
  const auto& all = params_.all();
  for (size_t i = 0; i < all.size(); ++i)
    for (size_t l = 0; l < layers_.size(); ++l)
      if (all[i].name.rfind("model.layers." + std::to_string(l) + ".", 0) == 0) layer_params_[l].push_back(i);
}

void Decoder::add_layer(int64_t l, const ExpertNaming& naming, size_t& moe_layers) {
  const auto& c_ = cfg_;
  if (!c_.blocks.empty()) return add_block(l, naming, moe_layers);
  const float eps = static_cast<float>(c_.rms_norm_eps);
  const std::string pre = "model.layers." + std::to_string(l);
  Layer& L = layers_[static_cast<size_t>(l)];
  L.input_norm.init(params_, pre + ".input_layernorm.weight", c_.hidden_size, eps);
  if (c_.mla) {
    L.mla.emplace();
    L.mla->init(params_, pre + ".self_attn", c_.hidden_size, c_.num_attention_heads, *c_.mla, c_.qkv_bias,
                nn::latent_attention_scale(c_.rope, c_.mla->qk_nope_head_dim + c_.mla->qk_rope_head_dim));
  }
  nn::AttentionOptions ao;
  ao.qkv_bias = c_.qkv_bias;
  ao.o_bias = c_.o_bias;
  ao.qk_norm = c_.qk_norm;
  if (c_.clip_qkv) ao.clip_qkv = static_cast<float>(*c_.clip_qkv);
  ao.window = l < c_.num_hidden_layers ? c_.window_of(l) : std::nullopt;
  ao.eps = eps;
  ao.sinks = c_.attention_sinks;
  if (!L.mla)
    L.attn.init(params_, pre + ".self_attn", c_.hidden_size, c_.num_attention_heads, c_.num_key_value_heads,
                c_.head_dim, ao);
  L.post_attention_norm.init(params_, pre + ".post_attention_layernorm.weight", c_.hidden_size, eps);
  if (!c_.is_moe_layer(l)) {
    nn::DenseMLP mlp;
    mlp.init(params_, pre + ".mlp", c_.hidden_size, c_.intermediate_size, c_.mlp_bias);
    L.mlp = mlp;
    return;
  }
  nn::SparseMoE moe;
  std::optional<nn::SparseMoE::GptOssStyle> gpt_oss;
  if (c_.gpt_oss_moe) gpt_oss = nn::SparseMoE::GptOssStyle{1.702f, static_cast<float>(c_.swiglu_limit)};
  std::optional<nn::SparseMoE::GroupedSigmoid> grouped;
  if (const auto& g = c_.grouped_sigmoid_routing)
    grouped = nn::SparseMoE::GroupedSigmoid{g->n_group, g->topk_group, static_cast<float>(g->routed_scaling_factor)};
  moe.init(params_, pre + ".mlp", c_.hidden_size, c_.num_experts, c_.num_experts_per_tok, c_.moe_intermediate_size,
           c_.norm_topk_prob, par_.ep, gpt_oss, grouped);
  const std::string hub = pre + "." + naming.block;
  hf::ExpertGroup group;
  group.prefix = hub + ".experts.";
  group.gate_up = pre + ".mlp.experts.gate_up_proj";
  group.down = pre + ".mlp.experts.down_proj";
  group.gate_suffix = naming.gate;
  group.up_suffix = naming.up;
  group.down_suffix = naming.down;
  group.experts = c_.num_experts;
  group.first = moe.shard.first;
  if (gpt_oss) {  // stored fused only (and MXFP4-quantised in hub checkpoints), biases beside
    group.per_expert = false;
    group.transposed = true;
    group.fused_extra = {pre + ".mlp.experts.gate_up_proj_bias", pre + ".mlp.experts.down_proj_bias"};
  }
  adapter_.add_expert_group(group);
  if (naming.block != "mlp") adapter_.rename(pre + ".mlp.gate.weight", hub + ".gate.weight");
  L.mlp = moe;
  L.moe_slot = moe_layers++;
  if (c_.shared_expert_intermediate_size > 0) {
    L.shared.emplace();
    L.shared->init(params_, pre + ".mlp", c_.hidden_size, c_.shared_expert_intermediate_size);
  }
  if (c_.n_shared_experts > 0) {
    L.shared_experts.emplace();
    L.shared_experts->init(params_, pre + ".mlp.shared_experts", c_.hidden_size,
                           c_.moe_intermediate_size * c_.n_shared_experts);
  }
}

void Decoder::add_block(int64_t l, const ExpertNaming&, size_t& moe_layers) {
  const auto& c_ = cfg_;
  const float eps = static_cast<float>(c_.rms_norm_eps);
  const std::string pre = "model.layers." + std::to_string(l), mix = pre + ".mixer";
  Layer& L = layers_[static_cast<size_t>(l)];
  L.block = c_.blocks.at(static_cast<size_t>(l));
  L.input_norm.init(params_, pre + ".norm.weight", c_.hidden_size, eps);
  switch (*L.block) {
    case hf::ModelConfig::Block::Mamba:
      L.mamba.emplace();
      L.mamba->init(params_, mix, c_.hidden_size, *c_.mamba, eps);
      return;
    case hf::ModelConfig::Block::Attention: {
      nn::AttentionOptions ao;
      ao.rope = !c_.no_rope;
      L.attn.init(params_, mix, c_.hidden_size, c_.num_attention_heads, c_.num_key_value_heads, c_.head_dim, ao);
      return;
    }
    case hf::ModelConfig::Block::Mlp:
      L.relu2_mlp.emplace();
      L.relu2_mlp->init(params_, mix, c_.hidden_size, c_.intermediate_size, c_.mlp_bias);
      return;
    case hf::ModelConfig::Block::Moe: {
      const auto& g = *c_.grouped_sigmoid_routing;
      nn::SparseMoE moe;
      moe.init(params_, mix, c_.hidden_size, c_.num_experts, c_.num_experts_per_tok, c_.moe_intermediate_size,
               c_.norm_topk_prob, par_.ep, std::nullopt,
               nn::SparseMoE::GroupedSigmoid{g.n_group, g.topk_group, static_cast<float>(g.routed_scaling_factor)},
               nn::SparseMoE::Relu2Experts{c_.moe_latent_size, c_.mlp_bias});
      hf::ExpertGroup group;
      group.prefix = "backbone.layers." + std::to_string(l) + ".mixer.experts.";
      group.gate_up = mix + ".experts.up_proj";
      group.down = mix + ".experts.down_proj";
      group.gate_suffix = "";  // ungated: the fused tensor holds up rows only
      group.experts = c_.num_experts;
      group.first = moe.shard.first;
      adapter_.add_expert_group(group);
      L.mlp = moe;
      L.moe_slot = moe_layers++;
      L.relu2_shared.emplace();
      L.relu2_shared->init(params_, mix + ".shared_experts", c_.hidden_size, c_.relu2_shared_intermediate_size,
                           c_.mlp_bias);
      return;
    }
  }
}

void Decoder::add_mtp_depth(int64_t depth, const ExpertNaming& naming, size_t& moe_layers) {
  const auto& c_ = cfg_;
  const float eps = static_cast<float>(c_.rms_norm_eps);
  const int64_t l = c_.num_hidden_layers + depth - 1;
  const std::string pre = "model.layers." + std::to_string(l);
  MtpDepth d;
  d.layer = static_cast<size_t>(l);
  d.enorm.init(params_, pre + ".enorm.weight", c_.hidden_size, eps);
  d.hnorm.init(params_, pre + ".hnorm.weight", c_.hidden_size, eps);
  d.eh_proj.init(params_, pre + ".eh_proj", 2 * c_.hidden_size, c_.hidden_size, false);
  add_layer(l, naming, moe_layers);
  d.head_norm.init(params_, pre + ".shared_head.norm.weight", c_.hidden_size, eps);
  adapter_.copy_of(pre + ".embed_tokens.weight", params_.all()[embed_].name);
  adapter_.copy_of(pre + ".shared_head.head.weight", params_.all()[lm_head_].name);
  mtp_.push_back(d);
}

bool Decoder::is_mtp_param(const std::string& name) const {
  for (const MtpDepth& d : mtp_)
    if (name.rfind("model.layers." + std::to_string(d.layer) + ".", 0) == 0) return true;
  return false;
}

std::vector<nn::Linear*> Decoder::projections(Layer& L) {
  std::vector<nn::Linear*> out;
  const auto add_mlp = [&](nn::DenseMLP& m) {
    for (nn::Linear* p : {&m.gate_proj, &m.up_proj, &m.down_proj}) out.push_back(p);
  };
  const bool block = L.block.has_value();
  if (L.mla) {
    for (auto* p : {&L.mla->q_proj, &L.mla->q_a_proj, &L.mla->q_b_proj})
      if (p->has_value()) out.push_back(&**p);
    for (nn::Linear* p : {&L.mla->kv_a_proj, &L.mla->kv_b_proj, &L.mla->o_proj}) out.push_back(p);
  } else if (!block || *L.block == hf::ModelConfig::Block::Attention) {
    for (nn::Linear* p : {&L.attn.q_proj, &L.attn.k_proj, &L.attn.v_proj, &L.attn.o_proj}) out.push_back(p);
  }
  if (L.mamba)
    for (nn::Linear* p : {&L.mamba->in_proj, &L.mamba->out_proj}) out.push_back(p);
  if (!block || *L.block == hf::ModelConfig::Block::Moe) {
    if (auto* dense = std::get_if<nn::DenseMLP>(&L.mlp); dense && !block) add_mlp(*dense);
    if (auto* moe = std::get_if<nn::SparseMoE>(&L.mlp)) {
      if (moe->latent_in) out.push_back(&*moe->latent_in);
      if (moe->latent_out) out.push_back(&*moe->latent_out);
    }
  }
  if (L.shared) {
    add_mlp(L.shared->mlp);
    out.push_back(&L.shared->gate);
  }
  if (L.shared_experts) add_mlp(*L.shared_experts);
  for (auto* m : {&L.relu2_mlp, &L.relu2_shared})
    if (m->has_value())
      for (nn::Linear* p : {&(*m)->up_proj, &(*m)->down_proj}) out.push_back(p);
  return out;
}

std::vector<std::string> Decoder::add_lora(int64_t rank, float scale,
                                           const std::function<bool(const std::string& module)>& wants,
                                           nn::ExpertAdapters experts, float dropout) {
  std::vector<std::string> adapted;
  for (size_t l = 0; l < main_layers_ && experts != nn::ExpertAdapters::None; ++l) {
    auto* moe = std::get_if<nn::SparseMoE>(&layers_[l].mlp);
    if (!moe || (layers_[l].block && *layers_[l].block != hf::ModelConfig::Block::Moe)) continue;
    MF_CHECK(!moe->lora, "internal: the experts of layer ", l, " have LoRA adapters already");
    MF_CHECK(experts == nn::ExpertAdapters::Fused || !moe->gpt_oss, "internal: GPT-OSS's experts take fused adapters only");
    const nn::Param& gu = params_.all()[moe->gate_up];
    const std::string prefix = gu.name.substr(0, gu.name.rfind('.'));
    // The gate_up weight's outputs: [E, rows, in], or [E, in, rows] in GPT-OSS's transposed layout.
    const int64_t rows = moe->gpt_oss ? gu.shape[2] : gu.shape[1];
    const int64_t blocks = experts == nn::ExpertAdapters::PerExpert && !moe->relu2 ? 2 : 1;
    moe->lora.emplace();
    moe->lora->init(params_, gu.name, params_.all()[moe->down].name, gu.shape[0], moe->expert_width, moe->inter,
                    rows, blocks, rank, scale);
    for (size_t i : {moe->lora->gate_up_a, moe->lora->gate_up_b, moe->lora->down_a, moe->lora->down_b})
      layer_params_[l].push_back(i);
    adapted.push_back(prefix);
  }
  for (size_t l = 0; l < main_layers_; ++l)
    for (nn::Linear* lin : projections(layers_[l])) {
      const nn::Param& w = params_.all()[lin->weight];
      const std::string module = w.name.substr(0, w.name.size() - std::string(".weight").size());
      if (!wants(module)) continue;
      MF_CHECK(!lin->lora, module, ": has a LoRA adapter already");
      const int64_t out = w.shape[0], in = w.shape[1];
      lin->lora.emplace();
      lin->lora->init(params_, module, in, out, rank, scale, dropout);
      layer_params_[l].push_back(lin->lora->a);
      layer_params_[l].push_back(lin->lora->b);
      adapted.push_back(module);
    }
  return adapted;
}

void Decoder::set_mtp_trainable(bool on) {
  for (auto& p : params_.all())
    if (is_mtp_param(p.name) && !p.name.ends_with("e_score_correction_bias")) p.trainable = on;
}

Decoder::Batch Decoder::prepare(const nn::ParamAccess& ps, const ForwardInputs& in, const Parallel& par) const {
  const Tensor& ids = in.input_ids;
  MF_CHECK(ids.dim() == 2 && ids.dtype() == DType::I64, "input_ids must be an I64 [batch, seq] tensor, got ",
           dtype_name(ids.dtype()), " ", shape_str(ids.shape()));
  Batch bt;
  bt.b = ids.size(0);
  bt.s = ids.size(1);
  bt.t = bt.b * bt.s;
  bt.device = ps.device();
  bt.ids = ops::to_device(ids.view({bt.t}), bt.device, DType::I64);
  bt.routing = in.routing;
  bt.ctx.ep = par.ep;
  const bool same_shape = tables_.b == bt.b && tables_.s == bt.s && tables_.device == bt.device;
  if (in.position_ids) {
    MF_CHECK(in.position_ids->shape() == ids.shape(), "position_ids must match input_ids");
    Tensor cos, sin;
    rope_.tables(*in.position_ids, cos, sin);
    bt.cos = ops::to_device(cos, bt.device, DType::F32);
    bt.sin = ops::to_device(sin, bt.device, DType::F32);
  } else {
    if (!same_shape) {
      std::vector<int64_t> p(static_cast<size_t>(bt.t));
      for (int64_t i = 0; i < bt.t; ++i) p[i] = i % bt.s;
      Tensor cos, sin;
      rope_.tables(Tensor::from_i64(p, {bt.b, bt.s}), cos, sin);
      tables_ = {bt.b, bt.s, bt.device, ops::to_device(cos, bt.device, DType::F32),
                 ops::to_device(sin, bt.device, DType::F32), Tensor()};
    }
    bt.cos = tables_.cos;
    bt.sin = tables_.sin;
  }
  if (in.doc_ids) {
    MF_CHECK(in.doc_ids->shape() == ids.shape(), "doc_ids must match input_ids");
    bt.docs = ops::to_device(*in.doc_ids, bt.device, DType::I64);
    bt.doc_ids = &bt.docs;
  }
  if (in.routing && in.routing->mode == RoutingControl::Mode::Balanced && cfg_.num_experts > 0) {
    const int64_t k = cfg_.num_experts_per_tok, e = cfg_.num_experts;
    if (!tables_.balanced.defined() || tables_.balanced.size(0) != bt.t || tables_.device != bt.device) {
      // Token t's slot j goes to expert (t*k + j) mod E: every expert gets the same number of rows
      // (when E divides T*k) and a token's k experts are distinct (k <= E).
      std::vector<int64_t> idx(static_cast<size_t>(bt.t * k));
      for (int64_t i = 0; i < bt.t * k; ++i) idx[i] = i % e;
      tables_.balanced = ops::to_device(Tensor::from_i64(idx, {bt.t, k}), bt.device, DType::I64);
    }
    bt.balanced = tables_.balanced;
  }
  bt.chosen.resize(layers_.size());
  return bt;
}

Tensor Decoder::moe_forward(const nn::ParamAccess& ps, size_t l, const Tensor& n, Batch& bt, LayerCache* c,
                             nn::SparseMoE::RouterOut* router, const Tensor* replay) const {
  const Layer& L = layers_[l];
  const auto& moe = std::get<nn::SparseMoE>(L.mlp);
  const size_t slot = L.moe_slot;
  const Tensor* forced = replay;
  Tensor replayed;
  if (!forced && bt.routing && bt.routing->mode == RoutingControl::Mode::Replay) {
    MF_CHECK(slot < bt.routing->chosen.size(), "routing replay has no record for MoE layer ", slot);
    replayed = ops::to_device(bt.routing->chosen[slot], bt.device, DType::I64);
    forced = &replayed;
  }
  if (!forced && bt.balanced.defined()) forced = &bt.balanced;
  nn::SparseMoE::RouterOut local;
  nn::SparseMoE::RouterOut* r = router ? router : &local;
  // The shared experts depend only on n: the MoE layer runs them while its rows travel to other
  // ranks (or after its experts, with one). Their sums into m keep their order.
  nn::GatedSharedExpert::Parts gated;
  Tensor plain, relu2;
  const auto shared_work = [&] {
    if (L.shared) gated = L.shared->compute(ps, n, c ? &c->shared : nullptr);
    if (L.shared_experts) plain = L.shared_experts->forward(ps, n, c ? &c->shared_experts : nullptr);
    if (L.relu2_shared) relu2 = L.relu2_shared->forward(ps, n, c ? &c->relu2_shared : nullptr);
  };
  Tensor m = moe.forward(ps, bt.ctx, n, r, c ? &c->moe : nullptr, forced, shared_work);
  if (!replay) bt.chosen[l] = r->chosen;
  if (bt.routing && bt.routing->mode == RoutingControl::Mode::Record && !replay) {
    if (bt.routing->chosen.size() <= slot) bt.routing->chosen.resize(slot + 1);
    bt.routing->chosen[slot] = r->chosen;
  }
  if (L.shared) nn::GatedSharedExpert::add_to(m, gated);
  if (L.shared_experts) ops::add_inplace(m, plain);
  if (L.relu2_shared) ops::add_inplace(m, relu2);
  return m;
}

Tensor Decoder::moe_backward(nn::ParamAccess& ps, size_t l, LayerCache& c, const Batch& bt, const Tensor& dy,
                              const Tensor* dprobs_extra) const {
  const Layer& L = layers_[l];
  // The shared experts' backward while the routed gradients travel (expert parallelism), as forward.
  Tensor d_gated, d_plain, d_relu2;
  const auto shared_work = [&] {
    if (L.shared) d_gated = L.shared->backward(ps, c.shared, dy);
    if (L.shared_experts) d_plain = L.shared_experts->backward(ps, c.shared_experts, dy);
    if (L.relu2_shared) d_relu2 = L.relu2_shared->backward(ps, c.relu2_shared, dy);
  };
  Tensor dn = std::get<nn::SparseMoE>(L.mlp).backward(ps, bt.ctx, c.moe, dy, dprobs_extra, shared_work);
  if (L.shared) ops::add_inplace(dn, d_gated);
  if (L.shared_experts) ops::add_inplace(dn, d_plain);
  if (L.relu2_shared) ops::add_inplace(dn, d_relu2);
  return dn;
}

namespace {
// Tokens per chunk of the fused LM head + loss: one chunk's [rows, vocab] logits exist at a time.
// 0: ops::cross_entropy_chunk_rows's budget decides. MOEFORGE_CE_CHUNK_ROWS (1..65536) overrides
// it, for measuring the memory / speed trade.
int64_t lm_head_chunk_rows() {
  static const int64_t rows = [] {
    const char* v = std::getenv("MOEFORGE_CE_CHUNK_ROWS");
    if (!v) return int64_t{0};
    const long long n = std::atoll(v);
    MF_CHECK(n >= 1 && n <= 65536, "MOEFORGE_CE_CHUNK_ROWS must be 1..65536, got '", v, "'");
    return static_cast<int64_t>(n);
  }();
  return rows;
}
}  // namespace

namespace {
// The phase a hybrid block's time is charged to (MOEFORGE_PHASE_TIMES), by its kind.
const char* block_phase(hf::ModelConfig::Block b, bool forward) {
  switch (b) {
    case hf::ModelConfig::Block::Mamba: return forward ? "fwd: Mamba2 block" : "bwd: Mamba2 block";
    case hf::ModelConfig::Block::Attention: return forward ? "fwd: attention block" : "bwd: attention block";
    case hf::ModelConfig::Block::Moe: return forward ? "fwd: MoE block" : "bwd: MoE block";
    case hf::ModelConfig::Block::Mlp: return forward ? "fwd: MLP block" : "bwd: MLP block";
  }
  return "block";
}
}  // namespace

Tensor Decoder::block_forward(const nn::ParamAccess& ps, size_t l, const Tensor& x, Batch& bt, LayerCache* c,
                               nn::SparseMoE::RouterOut* router, const Tensor* replay) const {
  const Layer& L = layers_[l];
  const Tensor n = L.input_norm.forward(ps, x, c ? &c->rstd1 : nullptr);
  Tensor m;
  switch (*L.block) {
    case hf::ModelConfig::Block::Mamba: {
      const nn::MambaStates states = bt.mamba_states(l);
      m = L.mamba->forward(ps, n, bt.b, bt.doc_ids, c ? &c->mamba : nullptr, bt.generating() ? &states : nullptr);
      break;
    }
    case hf::ModelConfig::Block::Attention: {
      const nn::KvCaches kv = bt.kv_caches(l);
      m = L.attn.forward(ps, n, bt.b, bt.s, bt.cos, bt.sin, bt.doc_ids, c ? &c->attn : nullptr,
                         bt.generating() ? &kv : nullptr);
      break;
    }
    case hf::ModelConfig::Block::Mlp: m = L.relu2_mlp->forward(ps, n, c ? &c->relu2 : nullptr); break;
    case hf::ModelConfig::Block::Moe: m = moe_forward(ps, l, n, bt, c, router, replay); break;
  }
  if (c) c->x_in = x;
  ops::add_inplace(m, x);
  bt.ctx.phase(block_phase(*L.block, true));
  return m;
}

Tensor Decoder::block_backward(nn::ParamAccess& ps, size_t l, LayerCache& c, const Batch& bt, const Tensor& dy,
                                const Tensor* dprobs_extra) const {
  const Layer& L = layers_[l];
  Tensor dn;
  switch (*L.block) {
    case hf::ModelConfig::Block::Mamba: dn = L.mamba->backward(ps, c.mamba, bt.b, bt.doc_ids, dy); break;
    case hf::ModelConfig::Block::Attention:
      dn = L.attn.backward(ps, c.attn, bt.b, bt.s, bt.cos, bt.sin, bt.doc_ids, dy);
      break;
    case hf::ModelConfig::Block::Mlp: dn = L.relu2_mlp->backward(ps, c.relu2, dy); break;
    case hf::ModelConfig::Block::Moe: dn = moe_backward(ps, l, c, bt, dy, dprobs_extra); break;
  }
  // The block's input gradient: its norm's plus the residual branch's (dy), in one pass.
  Tensor dx = L.input_norm.backward(ps, c.x_in, dn, c.rstd1.defined() ? &c.rstd1 : nullptr, &dy);
  bt.ctx.phase(block_phase(*L.block, false));
  return dx;
}

Tensor Decoder::layer_forward(const nn::ParamAccess& ps, size_t l, const Tensor& x_in, Batch& bt, LayerCache* c,
                               nn::SparseMoE::RouterOut* router, const Tensor* replay) const {
  const Layer& L = layers_[l];
  if (L.block) return block_forward(ps, l, x_in, bt, c, router, replay);
  const Tensor n1 = L.input_norm.forward(ps, x_in, c ? &c->rstd1 : nullptr);
  const nn::KvCaches caches = bt.kv_caches(l);
  const nn::KvCaches* kv = bt.generating() ? &caches : nullptr;
  Tensor a = L.mla ? L.mla->forward(ps, n1, bt.b, bt.s, bt.cos, bt.sin, bt.doc_ids, c ? &c->mla : nullptr, kv)
                   : L.attn.forward(ps, n1, bt.b, bt.s, bt.cos, bt.sin, bt.doc_ids, c ? &c->attn : nullptr, kv);
  // The residual stream after attention (a new tensor: x_in stays for the backward), and the
  // post-attention norm of it, in one pass.
  Tensor x;
  const Tensor n = ops::add_rms_norm(a, x_in, ps.value(L.post_attention_norm.weight), L.post_attention_norm.eps, x,
                                     c ? &c->rstd2 : nullptr);
  a = Tensor();
  if (c) {
    c->x_in = x_in;
    c->x_mid = x;
  }
  bt.ctx.phase("fwd: attention block");
  Tensor m = std::holds_alternative<nn::SparseMoE>(L.mlp)
                 ? moe_forward(ps, l, n, bt, c, router, replay)
                 : std::get<nn::DenseMLP>(L.mlp).forward(ps, n, c ? &c->dense : nullptr);
  ops::add_inplace(m, x);
  bt.ctx.phase("fwd: MLP block + residual");
  return m;
}

Tensor Decoder::layer_backward(nn::ParamAccess& ps, size_t l, LayerCache& c, const Batch& bt, const Tensor& dy,
                                const Tensor* dprobs_extra) const {
  const Layer& L = layers_[l];
  if (L.block) return block_backward(ps, l, c, bt, dy, dprobs_extra);
  Tensor dn = std::holds_alternative<nn::SparseMoE>(L.mlp) ? moe_backward(ps, l, c, bt, dy, dprobs_extra)
                                                           : std::get<nn::DenseMLP>(L.mlp).backward(ps, c.dense, dy);
  // The residual stream's gradient at mid-layer: the MLP's norm's plus the residual branch's (dy).
  Tensor dmid = L.post_attention_norm.backward(ps, c.x_mid, dn, c.rstd2.defined() ? &c.rstd2 : nullptr, &dy);
  dn = Tensor();
  Tensor da = L.mla ? L.mla->backward(ps, c.mla, bt.b, bt.s, bt.cos, bt.sin, bt.doc_ids, dmid)
                    : L.attn.backward(ps, c.attn, bt.b, bt.s, bt.cos, bt.sin, bt.doc_ids, dmid);
  bt.ctx.phase("bwd: attention block");
  return L.input_norm.backward(ps, c.x_in, da, c.rstd1.defined() ? &c.rstd1 : nullptr, &dmid);
}

Tensor Decoder::aux_gradient(const std::vector<nn::SparseMoE::RouterOut>& routers, const Parallel& par, float scale,
                             float* loss, Device device) const {
  if (!cfg_.output_router_logits || cfg_.num_experts == 0) return Tensor();
  *loss = nn::load_balancing_loss(routers, cfg_.num_experts, par.world);
  std::vector<float> g = nn::load_balancing_prob_grad(routers, cfg_.num_experts, par.world);
  for (float& v : g) v *= scale;  // the same for every row
  return ops::to_device(Tensor::from_vector(g, {cfg_.num_experts}), device, DType::F32);
}

Tensor Decoder::main_forward(nn::ParamAccess& ps, Batch& bt, std::vector<LayerCache>* caches, bool ckpt,
                             std::vector<nn::SparseMoE::RouterOut>& routers) const {
  ps.gather({embed_});
  Tensor x = ops::embedding(bt.ids, ps.value(embed_));
  if (embed_ != lm_head_) ps.release({embed_});
  bt.ctx.phase("fwd: inputs + embedding");
  routers.assign(main_layers_, {});
  for (size_t l = 0; l < main_layers_; ++l) {
    ps.gather(layer_params_[l]);
    if (l + 1 < main_layers_) ps.prefetch(layer_params_[l + 1]);
    else ps.prefetch({final_norm_.weight, lm_head_});
    if (caches && ckpt) (*caches)[l].x_in = x;
    x = layer_forward(ps, l, x, bt, caches && !ckpt ? &(*caches)[l] : nullptr, &routers[l]);
    if (!cfg_.output_router_logits) routers[l].probs = Tensor();  // only the load-balancing loss reads them
    ps.release(layer_params_[l]);
  }
  ps.gather({final_norm_.weight, lm_head_});
  return x;
}

std::unique_ptr<GenerationCache> Decoder::start_generation(int64_t capacity, const Parallel& par) const {
  MF_CHECK(capacity > 0, "generation: the cache needs room for at least one position");
  auto g = std::make_unique<Generation>();
  g->capacity = capacity;
  g->par = par;
  g->kv.resize(main_layers_);
  for (auto& kv : g->kv) kv.capacity = capacity;
  g->mamba.resize(main_layers_);
  return g;
}

nn::KvCaches Decoder::Batch::kv_caches(size_t l) const {
  nn::KvCaches c{gen_rows, {}};
  for (Generation* g : gens) c.states.push_back(&g->kv[l]);
  return c;
}

nn::MambaStates Decoder::Batch::mamba_states(size_t l) const {
  nn::MambaStates c{gen_rows, {}};
  for (Generation* g : gens) c.states.push_back(&g->mamba[l]);
  return c;
}

Decoder::Generation* Decoder::generation_of(GenerationCache* cache) {
  auto* gen = dynamic_cast<Generation*>(cache);
  MF_CHECK(gen, "internal: a generation cache made by another model");
  return gen;
}

Tensor Decoder::run_generation(nn::ParamAccess& ps, const std::vector<std::vector<int64_t>>& ids,
                               const std::vector<Generation*>& gens, bool all_positions) const {
  MF_CHECK(!ids.empty() && ids.size() == gens.size(), "internal: a generation step of ", ids.size(), " sequences with ",
           gens.size(), " caches");
  const size_t nseq = ids.size();
  std::vector<int64_t> flat, positions, rows{0};
  for (size_t i = 0; i < nseq; ++i) {
    Generation* gen = gens[i];
    const int64_t n = static_cast<int64_t>(ids[i].size());
    MF_CHECK(n > 0, "generation: a step needs at least one token");
    MF_CHECK(gen->length + n <= gen->capacity, "generation: ", gen->length + n, " positions exceed the cache's ",
             gen->capacity);
    for (size_t j = 0; j < i; ++j) MF_CHECK(gens[j] != gen, "internal: one generation cache twice in a step");
    flat.insert(flat.end(), ids[i].begin(), ids[i].end());
    for (int64_t j = 0; j < n; ++j) positions.push_back(gen->length + j);
    rows.push_back(rows.back() + n);
  }
  const int64_t t = rows.back();
  const Tensor input_ids = Tensor::from_i64(flat, {1, t}), position_ids = Tensor::from_i64(positions, {1, t});
  ForwardInputs in{input_ids};
  in.position_ids = &position_ids;
  Batch bt = prepare(ps, in, gens.front()->par);
  bt.gens = gens;
  bt.gen_rows = rows;
  std::vector<nn::SparseMoE::RouterOut> routers;
  Tensor h = main_forward(ps, bt, nullptr, false, routers);
  if (!all_positions) {  // each sequence's last token
    if (nseq == 1) {
      h = h.slice0(t - 1, 1);
    } else {
      Tensor last = ops::empty({static_cast<int64_t>(nseq), cfg_.hidden_size}, h.dtype(), h.device(), "last tokens");
      for (size_t i = 0; i < nseq; ++i) nn::copy_rows(h.slice0(rows[i + 1] - 1, 1), last, static_cast<int64_t>(i));
      h = last;
    }
  }
  const Tensor x = final_norm_.forward(ps, h);
  Tensor logits = ops::to_device(ops::linear(x, ps.value(lm_head_)), Device::cpu(), DType::F32);
  ps.release({final_norm_.weight, lm_head_});
  for (size_t i = 0; i < nseq; ++i) gens[i]->length += static_cast<int64_t>(ids[i].size());
  return logits.view({all_positions ? t : static_cast<int64_t>(nseq), cfg_.vocab_size});
}

Tensor Decoder::generation_step(nn::ParamAccess& ps, const std::vector<int64_t>& ids, GenerationCache& cache,
                                bool all_positions) const {
  Tensor logits = run_generation(ps, {ids}, {generation_of(&cache)}, all_positions);
  return all_positions ? logits : logits.view({cfg_.vocab_size});
}

Tensor Decoder::generation_step_batch(nn::ParamAccess& ps, const std::vector<std::vector<int64_t>>& ids,
                                      const std::vector<GenerationCache*>& caches) const {
  std::vector<Generation*> gens;  // run_generation checks that they match `ids`
  for (GenerationCache* c : caches) {
    gens.push_back(generation_of(c));
    const Parallel& par = gens.back()->par;
    MF_CHECK(!(par.ep && par.ep->size() > 1) && !(par.world && par.world->size() > 1),
             "generation: several sequences per step are not supported with experts split over ranks");
  }
  return run_generation(ps, ids, gens, false);
}

ForwardOutputs Decoder::forward(nn::ParamAccess& ps, const ForwardInputs& in, const Parallel& par) const {
  Batch bt = prepare(ps, in, par);
  std::vector<nn::SparseMoE::RouterOut> routers;
  const Tensor x = final_norm_.forward(ps, main_forward(ps, bt, nullptr, false, routers));
  ForwardOutputs out;
  if (cfg_.output_router_logits) out.aux_loss = nn::load_balancing_loss(routers, cfg_.num_experts);
  if (!in.logits) {
    MF_CHECK(in.labels, "internal: a forward without logits needs labels");
    const Tensor targets = ops::to_device(shifted_targets(*in.labels), bt.device, DType::I64);
    Tensor unused_grad;  // the fused op's input gradient, at scale 0
    out.ce_sum = ops::fused_linear_cross_entropy(x, ps.value(lm_head_), targets, -100, 0.f, unused_grad, nullptr,
                                                 &out.loss_tokens, lm_head_chunk_rows());
    ps.release({final_norm_.weight, lm_head_});
    out.loss = out.loss_tokens ? static_cast<float>(out.ce_sum / out.loss_tokens) : NAN;
    if (cfg_.output_router_logits) out.loss += static_cast<float>(cfg_.router_aux_loss_coef) * out.aux_loss;
    return out;
  }
  Tensor logits = ops::linear(x, ps.value(lm_head_));
  const Device to = in.logits_on_device ? logits.device() : Device::cpu();
  if (logits.device() != to || logits.dtype() != DType::F32) logits = ops::to_device(logits, to, DType::F32);
  out.logits = logits.view({bt.b, bt.s, cfg_.vocab_size});
  ps.release({final_norm_.weight, lm_head_});
  if (in.labels) {
    out.loss = causal_lm_loss(out.logits, *in.labels, &out.loss_tokens);
    out.ce_sum = static_cast<double>(out.loss) * out.loss_tokens;
    if (cfg_.output_router_logits) out.loss += static_cast<float>(cfg_.router_aux_loss_coef) * out.aux_loss;
  }
  return out;
}

// Zeroes the last `n` positions of every row of x [B*S, ...]: there is no token t+n there.
namespace {
void zero_row_ends(Tensor& x, int64_t b, int64_t s, int64_t n) {
  const int64_t tail = std::min(n, s);
  for (int64_t i = 0; i < b; ++i) {
    Tensor rows = x.slice0(i * s + s - tail, tail);
    ops::zero(rows);
  }
}
}  // namespace

template <typename Ready>
Tensor Decoder::mtp_train(nn::ParamAccess& ps, const ForwardInputs& in, Batch& bt, const Tensor& h0,
                          const TrainStepOptions& opts, TrainStepResult& res, Ready& ready) const {
  const int64_t t = bt.t, h = cfg_.hidden_size;
  const size_t depths = mtp_.size();
  std::vector<MtpCache> caches(depths);
  res.mtp_ce_sums.assign(depths, 0.0);
  res.mtp_tokens.assign(depths, 0);
  const DType dt = h0.dtype();
  // Forward through the depths, each keeping what its backward needs.
  ps.gather({embed_});  // the embedding of tokens t+k (ZeRO-3: whole for the depths' run)
  Tensor prev = h0;
  for (size_t k = 0; k < depths; ++k) {
    const MtpDepth& d = mtp_[k];
    MtpCache& c = caches[k];
    const int64_t depth = static_cast<int64_t>(k + 1);
    ps.gather(layer_params_[d.layer]);
    c.ids = ops::to_device(mtp_input_ids(in.input_ids, depth).view({t}), bt.device, DType::I64);
    c.embed = ops::embedding(c.ids, ps.value(embed_));
    zero_row_ends(c.embed, bt.b, bt.s, depth);  // no token t+k there: a zero embedding, as vLLM feeds position 0
    c.joined = ops::empty({t, 2 * h}, dt, bt.device, "MTP [enorm | hnorm]");
    ops::copy_columns(d.enorm.forward(ps, c.embed, &c.rstd_e), h, 0, 1, c.joined, 2 * h, 0, h);
    ops::copy_columns(d.hnorm.forward(ps, prev, &c.rstd_h), h, 0, 1, c.joined, 2 * h, h, h);
    c.layer.x_in = d.eh_proj.forward(ps, c.joined);
    c.y = layer_forward(ps, d.layer, c.layer.x_in, bt, &c.layer, nullptr);
    c.h = d.head_norm.forward(ps, c.y, &c.rstd_y);
    prev = c.h;
    ps.release(layer_params_[d.layer]);
  }
  // Backward from the last depth: each depth's loss, plus the gradient its successor sent back
  // through hnorm, reaches its head norm; what reaches its hnorm goes to the depth before.
  Tensor d_next;
  for (size_t k = depths; k-- > 0;) {
    const MtpDepth& d = mtp_[k];
    MtpCache& c = caches[k];
    const int64_t depth = static_cast<int64_t>(k + 1);
    ps.gather(layer_params_[d.layer]);
    const Tensor targets = ops::to_device(mtp_targets(*in.labels, in.doc_ids, depth), bt.device, DType::I64);
    Tensor dh;
    res.mtp_ce_sums[k] = ops::fused_linear_cross_entropy(c.h, ps.value(lm_head_), targets, -100, opts.mtp_scales[k], dh,
                                                         head_grad(ps), &res.mtp_tokens[k], lm_head_chunk_rows());
    if (d_next.defined()) ops::add_inplace(dh, d_next);
    const Tensor dy = d.head_norm.backward(ps, c.y, dh, &c.rstd_y);
    dh = Tensor();
    const Tensor dx = layer_backward(ps, d.layer, c.layer, bt, dy, nullptr);
    const Tensor djoined = d.eh_proj.backward(ps, c.joined, dx);
    Tensor den = ops::empty({t, h}, dt, bt.device, "MTP enorm gradient");
    Tensor dhn = ops::empty({t, h}, dt, bt.device, "MTP hnorm gradient");
    ops::copy_columns(djoined, 2 * h, 0, 1, den, h, 0, h);
    ops::copy_columns(djoined, 2 * h, h, 1, dhn, h, 0, h);
    Tensor de = d.enorm.backward(ps, c.embed, den, &c.rstd_e);
    zero_row_ends(de, bt.b, bt.s, depth);
    if (ps.trainable(embed_)) ops::embedding_backward(c.ids, de, ps.grad(embed_), cfg_.pad_token_id.value_or(-1));
    d_next = d.hnorm.backward(ps, k == 0 ? h0 : caches[k - 1].h, dhn, &c.rstd_h);
    c = MtpCache();
    ready(layer_params_[d.layer]);
  }
  if (embed_ != lm_head_) ps.release({embed_});
  return d_next;
}

namespace {

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

TrainStepResult Decoder::forward_backward(nn::ParamAccess& ps, const ForwardInputs& in, const TrainStepOptions& opts,
                                          const Parallel& par) const {
  MF_CHECK(in.labels, "forward_backward needs labels");
  MF_CHECK(opts.mtp_scales.empty() || opts.mtp_scales.size() == mtp_.size(), "training asks for ",
           opts.mtp_scales.size(), " multi-token prediction depths, the model has ", mtp_.size());
  const auto t0 = std::chrono::steady_clock::now();
  const nn::LoraDropoutScope dropout(opts.lora_dropout_seed);  // the forward, its recomputations and the backward
  Batch bt = prepare(ps, in, par);
  bt.ctx.ep_chunks = opts.ep_chunks;
  bt.ctx.mark = opts.mark_phase;
  const bool ckpt = opts.activation_checkpointing;
  // Forward, keeping each layer's state (or only its input under activation checkpointing). Under
  // ZeRO-3 a layer's parameters exist whole only from gather() until release(), or until `ready`
  // has summed their gradients into this rank's blocks; the next layer's travel while one computes.
  std::vector<LayerCache> caches(main_layers_);
  std::vector<nn::SparseMoE::RouterOut> routers;
  Tensor x = main_forward(ps, bt, &caches, ckpt, routers);
  Tensor rstd_f;
  Tensor xf = final_norm_.forward(ps, x, &rstd_f);
  const Tensor targets = ops::to_device(shifted_targets(*in.labels), bt.device, DType::I64);
  bt.ctx.phase("fwd: final norm");
  // The LM head and the loss fused over chunks of tokens: the [T, V] logits never exist whole.
  TrainStepResult res;
  Tensor d_xf;
  // The step's first contribution to the LM head's gradient: written, not added (nothing to zero or read).
  bool head_accumulate = true;
  Tensor* head_dw = ps.trainable(lm_head_) ? &ps.grad_for_write(lm_head_, head_accumulate) : nullptr;
  res.ce_sum = ops::fused_linear_cross_entropy(xf, ps.value(lm_head_), targets, -100, opts.ce_scale, d_xf, head_dw,
                                               &res.tokens, lm_head_chunk_rows(), head_accumulate);
  bt.ctx.phase("fused LM head + loss (fwd and its grads)");
  // Parameters whose gradients are complete: ZeRO-3 sums them into this rank's blocks and frees
  // the whole values; then the optimizer-in-backward callback, if any.
  auto ready = [&](const std::vector<size_t>& idx) {
    ps.scatter_grads(idx);
    ps.release(idx);
    if (opts.on_grads_ready) opts.on_grads_ready(idx);
  };
  if (!opts.mtp_scales.empty()) {
    ops::add_inplace(d_xf, mtp_train(ps, in, bt, xf, opts, res, ready));
    bt.ctx.phase("multi-token prediction (fwd and bwd)");
  }
  if (lm_head_ != embed_) ready({lm_head_});  // tied: complete after the embedding backward
  ops::synchronize(bt.device);
  res.forward_ms = ms_since(t0);
  const auto t1 = std::chrono::steady_clock::now();
  // Backward.
  const Tensor dprobs_aux = aux_gradient(routers, par, opts.aux_scale, &res.aux_loss, bt.device);
  xf = Tensor();
  Tensor dx = final_norm_.backward(ps, x, d_xf, &rstd_f);
  d_xf = x = Tensor();
  ready({final_norm_.weight});
  for (size_t l = main_layers_; l-- > 0;) {
    ps.gather(layer_params_[l]);
    if (l > 0) ps.prefetch(layer_params_[l - 1]);
    if (ckpt) {  // recompute the layer, repeating its first forward's choice of experts
      const Tensor x_in = caches[l].x_in;
      caches[l] = LayerCache();
      layer_forward(ps, l, x_in, bt, &caches[l], nullptr, bt.chosen[l].defined() ? &bt.chosen[l] : nullptr);
    }
    const Tensor* extra = routers[l].probs.defined() && dprobs_aux.defined() ? &dprobs_aux : nullptr;
    dx = layer_backward(ps, l, caches[l], bt, dx, extra);
    caches[l] = LayerCache();
    ready(layer_params_[l]);
    bt.ctx.phase("bwd: layer's gradients ready (optimizer in backward)");
  }
  if (ps.trainable(embed_)) {
    // The step's first contribution (untied) writes only the batch's rows where the storage keeps
    // row flags; else the whole table's gradient is zeroed first (grad()) or added to (tied).
    bool accumulate = true;
    Tensor& g = ps.grad_for_write(embed_, accumulate);
    Tensor* written = accumulate ? nullptr : ps.written_rows(embed_, g.size(0));
    if (!accumulate && !written) ops::zero(g);
    ops::embedding_backward(bt.ids, dx, g, cfg_.pad_token_id.value_or(-1), written);
  }
  ready({embed_});
  bt.ctx.phase("bwd: embedding");
  ops::synchronize(bt.device);
  res.backward_ms = ms_since(t1);
  for (size_t l = 0; l < main_layers_; ++l)
    if (bt.chosen[l].defined()) res.routing.push_back(bt.chosen[l]);
  return res;
}

int64_t Decoder::active_parameters() const {
  // The main model's: the MTP layers run in training only (as DeepSeek-V3's 37B counts them).
  int64_t total = params_.numel();
  for (const auto& p : params_.all())
    if (is_mtp_param(p.name)) total -= shape_numel(p.shape);
  for (size_t l = 0; l < main_layers_; ++l)
    if (const auto* moe = std::get_if<nn::SparseMoE>(&layers_[l].mlp)) {
      total -= (moe->experts - moe->top_k) * moe->params_per_expert();
    }
  return total;
}

std::unique_ptr<CausalLM> make_decoder(const hf::ModelConfig& cfg, const Parallel& par, const ExpertNaming& naming) {
  return std::make_unique<Decoder>(cfg, par, naming);
}

}  // namespace moeforge::models
