#include "models/lora.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>
#include <set>

#include "core/error.h"
#include "core/fnv.h"
#include "hf/fs_util.h"
#include "hf/safetensors.h"
#include "models/pretrained.h"
#include "ops/ops.h"

namespace moeforge::models {

namespace fs = std::filesystem;

namespace {

const std::string kPeftPrefix = "base_model.model.";

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

// How `target` selects `module`, as the target_modules entry to write ("": it does not). PEFT
// matches a module by its whole name or by its trailing dotted components; a container ("the
// projections inside shared_expert") is written as the suffix that names each projection in it.
std::string match(const std::string& module, const std::string& target) {
  if (target == "all-linear") return module.substr(module.rfind('.') + 1);  // (the caller filters per family)
  if (module == target || ends_with(module, "." + target)) return target;
  const size_t pos = module.find("." + target + ".");
  if (pos != std::string::npos) return module.substr(pos + 1);
  return "";
}

uint64_t name_hash(const std::string& s) { return fnv1a(s); }

std::string adapter_key(const std::string& param_name) { return kPeftPrefix + param_name; }

// A fused expert adapter (a 3-D LoRA parameter, nn::ExpertLora) holds one PEFT tensor per expert
// and projection: `key`, at expert x, rows [r0, r0 + nr) and columns [c0, c0 + nc) of its slice.
struct ExpertPiece {
  std::string key;
  int64_t x, r0, nr, c0, nc;
};

// `whole`: name the pieces of all the model's experts (a tensor gathered over the expert-parallel
// group, or the keys a whole adapter file holds), else of this rank's.
std::vector<ExpertPiece> expert_pieces(const CausalLM& model, const nn::Param& p, bool whole = false) {
  const bool is_a = ends_with(p.name, ".lora_A.weight");
  const std::string fused = p.name.substr(0, p.name.size() - std::string(".lora_A.weight").size());
  const hf::ExpertGroup* g = model.adapter().group_of(fused);
  MF_CHECK(g, "internal: expert LoRA parameter ", p.name, " belongs to no expert group");
  const std::vector<std::string> parts = fused == g->gate_up ? g->gate_up_parts() : std::vector<std::string>{g->down_suffix};
  const int64_t n = static_cast<int64_t>(parts.size()), rows = p.shape[1] / n, cols = is_a ? p.shape[2] : p.shape[2] / n;
  const int64_t first = whole ? 0 : g->first, count = whole ? g->experts : p.shape[0];
  std::vector<ExpertPiece> out;
  for (int64_t x = 0; x < count; ++x)
    for (int64_t k = 0; k < n; ++k) {
      const std::string leaf = parts[k].substr(0, parts[k].size() - std::string(".weight").size());
      out.push_back({kPeftPrefix + g->prefix + std::to_string(first + x) + "." + leaf +
                         (is_a ? ".lora_A.weight" : ".lora_B.weight"),
                     x, k * rows, rows, is_a ? 0 : k * cols, cols});
    }
  return out;
}

const std::string kLoraA = ".lora_A.weight", kLoraB = ".lora_B.weight";

// The fused weight a 3-D LoRA parameter adapts ("<fused>.lora_A.weight" -> "<fused>").
std::string fused_of(const std::string& lora_name) { return lora_name.substr(0, lora_name.size() - kLoraA.size()); }

// A fused expert adapter's one PEFT tensor (target_parameters): PEFT nests the wrapper of the
// experts' first parameter (gate_up) inside the other's, as `base_layer`, whatever the order the
// config lists them in.
std::string fused_key(const CausalLM& model, const nn::Param& p) {
  const std::string fused = fused_of(p.name);
  const hf::ExpertGroup* g = model.adapter().group_of(fused);
  MF_CHECK(g, "internal: expert LoRA parameter ", p.name, " belongs to no expert group");
  return kPeftPrefix + fused.substr(0, fused.rfind('.')) + (fused == g->gate_up ? ".base_layer" : "") +
         (ends_with(p.name, kLoraA) ? kLoraA : kLoraB);
}

// PEFT's layout of a fused adapter for `experts` experts: A [E*r, in] (expert-major rows: the same
// memory as ours [E, r, in]); B [out, r*E] with column j*E + e (ours [E, out, r]).
Shape fused_file_shape(const nn::Param& p, int64_t experts) {
  return ends_with(p.name, kLoraA) ? Shape{experts * p.shape[1], p.shape[2]} : Shape{p.shape[1], p.shape[2] * experts};
}

// Ours [E, rows, cols] (all of the model's experts) -> PEFT's.
Tensor fused_to_file(const nn::Param& p, const Tensor& v) {
  const int64_t e_n = v.size(0), out = v.size(1), r = v.size(2);
  if (ends_with(p.name, kLoraA)) return v.view({e_n * out, r}).clone();
  Tensor t = Tensor::empty({out, r * e_n}, DType::F32);
  for (int64_t e = 0; e < e_n; ++e)
    for (int64_t o = 0; o < out; ++o)
      for (int64_t j = 0; j < r; ++j) t.f32()[o * r * e_n + j * e_n + e] = v.f32()[(e * out + o) * r + j];
  return t;
}

// PEFT's tensor `t` (all `experts` of the model) -> ours for experts [first, first + p.shape[0]).
Tensor fused_from_file(const nn::Param& p, const Tensor& t, int64_t experts, int64_t first) {
  const int64_t here = p.shape[0], rows = p.shape[1], cols = p.shape[2];
  if (ends_with(p.name, kLoraA))  // expert-major rows: this rank's experts are one contiguous run
    return t.view({experts, rows, cols}).slice0(first, here).clone();
  Tensor v = Tensor::empty(p.shape, DType::F32);
  for (int64_t x = 0; x < here; ++x)
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) v.f32()[(x * rows + i) * cols + j] = t.f32()[i * cols * experts + j * experts + first + x];
  return v;
}

// The fused weight's path inside its layer ("model.layers.3.mlp.experts.gate_up_proj" ->
// "mlp.experts.gate_up_proj"), as target_parameters names it.
std::string in_layer(const std::string& name) {
  const size_t at = name.find("layers.");
  if (at == std::string::npos) return name;
  const size_t dot = name.find('.', at + 7);
  return dot == std::string::npos ? name : name.substr(dot + 1);
}

}  // namespace

nn::ExpertAdapters expert_adapter_layout(const std::string& type) {
  if (type == "mixtral" || type == "qwen3_moe" || type == "deepseek_v3" || type == "olmoe")
    return nn::ExpertAdapters::PerExpert;
  if (type == "gpt_oss" || type == "qwen2_moe" || type == "nemotron_h") return nn::ExpertAdapters::Fused;
  return nn::ExpertAdapters::None;
}

float LoraOptions::scale() const {
  return static_cast<float>(rslora ? alpha / std::sqrt(static_cast<double>(rank)) : alpha / static_cast<double>(rank));
}

bool has_lora(const CausalLM& model) {
  for (const auto& p : model.params().all())
    if (p.lora) return true;
  return false;
}

LoraState apply_lora(CausalLM& model, const LoraOptions& o, uint64_t seed, const std::string& source) {
  MF_CHECK(o.rank > 0, source, ": key 'peft.rank': ", o.rank, " must be positive");
  MF_CHECK(std::isfinite(o.alpha) && o.alpha > 0, source, ": key 'peft.alpha': ", o.alpha, " must be positive");
  MF_CHECK(o.dropout >= 0 && o.dropout < 1, source, ": key 'peft.dropout': ", o.dropout, " must be in [0, 1)");
  MF_CHECK(!o.targets.empty() || !o.target_parameters.empty(), source, ": key 'peft.target_modules' is empty");
  MF_CHECK(!has_lora(model), source, ": the model has LoRA adapters already");
  const std::string type = model.config().model_type;
  // Where PEFT (0.21, on Transformers 5) loads per-expert adapters, it maps the per-expert projection
  // names onto the fused experts, so on those families the names mean the routed experts (and only
  // them: the same names on dense or shared-expert MLPs are never adapted, since PEFT would put them
  // on the experts too). Elsewhere the experts take fused adapters (target_parameters).
  const nn::ExpertAdapters layout = expert_adapter_layout(type);
  const bool expert_family = layout == nn::ExpertAdapters::PerExpert;
  const bool mixtral = type == "mixtral";
  const std::set<std::string> expert_leaves =
      mixtral ? std::set<std::string>{"w1", "w2", "w3"} : std::set<std::string>{"gate_proj", "up_proj", "down_proj"};
  std::set<std::string> expert_named;
  bool experts = false;
  for (const std::string& t : o.targets) {
    const std::string leaf = t.substr(t.rfind('.') + 1);
    if (t == "experts" || (expert_family && expert_leaves.count(leaf))) {
      MF_CHECK(layout != nn::ExpertAdapters::None, source, ": key 'peft.target_modules': '", t, "': ", type,
               " has no routed experts");
      if (t == "experts") expert_named = expert_leaves;
      else expert_named.insert(leaf);
      experts = true;
    }
    // PEFT refuses these on Mamba models (its fused Mamba kernels read the weights directly), so an
    // adapter on them would not load there.
    MF_CHECK(type != "nemotron_h" || (t != "out_proj" && t != "conv1d"), source, ": key 'peft.target_modules': '",
             t, "' cannot be adapted on nemotron_h (PEFT refuses out_proj and conv1d on Mamba models)");
  }
  // target_parameters: the fused experts' weights by name, both of them.
  std::set<std::string> fused_named;
  if (!o.target_parameters.empty()) {
    MF_CHECK(layout == nn::ExpertAdapters::Fused, source, ": key 'peft.target_parameters': ", type,
             layout == nn::ExpertAdapters::None ? " has no routed experts"
                                                : "'s routed experts take per-expert adapters (PEFT and vLLM load those): "
                                                  "give 'experts' in target_modules instead");
    std::set<std::string> fused_weights;  // in-layer paths of the experts' gate_up and down weights
    for (const auto& p : model.params().all())
      if (const hf::ExpertGroup* g = model.adapter().group_of(p.name); g && (p.name == g->gate_up || p.name == g->down))
        fused_weights.insert(in_layer(p.name));
    for (const std::string& t : o.target_parameters) {
      std::string hit;
      for (const std::string& w : fused_weights)
        if (w == t || ends_with(w, "." + t)) hit = w;
      MF_CHECK(!hit.empty(), source, ": key 'peft.target_parameters': '", t, "' names none of the experts' weights of this ",
               type, " model (", [&] {
                 std::string s;
                 for (const std::string& w : fused_weights) s += (s.empty() ? "" : ", ") + w;
                 return s;
               }(), ")");
      fused_named.insert(hit);
    }
    MF_CHECK(fused_named == fused_weights, source, ": key 'peft.target_parameters': LoRA on the routed experts "
             "takes both of their weights (gate_up and down)");
    experts = true;
  }
  MF_CHECK(!experts || o.dropout == 0, source, ": key 'peft.dropout': ", o.dropout, " with the routed experts "
           "targeted (PEFT's LoRA on fused experts has no dropout; set 0.0)");
  MF_CHECK(!experts || layout != nn::ExpertAdapters::PerExpert || expert_named == expert_leaves, source,
           ": key 'peft.target_modules': LoRA on the routed experts takes all of their projections (give 'experts', "
           "or all of the per-expert names)");
  std::set<std::string> written;
  std::vector<bool> used(o.targets.size(), false);
  LoraState st;
  st.options = o;
  st.modules = model.add_lora(
      o.rank, o.scale(),
      [&](const std::string& module) {
        const std::string leaf = module.substr(module.rfind('.') + 1);
        if (expert_family && expert_leaves.count(leaf)) return false;  // never a dense MLP's (see above)
        if (type == "nemotron_h" && ends_with(module, ".mixer.out_proj")) return false;  // see above
        bool hit = false;
        for (size_t i = 0; i < o.targets.size(); ++i) {
          if (o.targets[i] == "experts") continue;
          std::string w = match(module, o.targets[i]);
          if (w.empty()) continue;
          used[i] = true;
          written.insert(w);
          hit = true;
        }
        return hit;
      },
      experts ? layout : nn::ExpertAdapters::None, static_cast<float>(o.dropout));
  if (experts) {
    std::set<std::string> fused_params;
    for (const auto& p : model.params().all())
      if (p.lora && p.shape.size() == 3) fused_params.insert(in_layer(fused_of(p.name)));
    MF_CHECK(!fused_params.empty(), source, ": key 'peft.target_modules' names the routed experts, but this ", type,
             " model has no MoE layers");
    for (size_t i = 0; i < o.targets.size(); ++i) {
      const std::string leaf = o.targets[i].substr(o.targets[i].rfind('.') + 1);
      if (o.targets[i] == "experts" || (expert_family && expert_leaves.count(leaf))) used[i] = true;
    }
    if (expert_family) {
      written.insert(expert_leaves.begin(), expert_leaves.end());
    } else {  // gate_up first: the order PEFT nests them in
      for (const auto& p : model.params().all()) {
        const hf::ExpertGroup* g = p.lora ? nullptr : model.adapter().group_of(p.name);
        if (g && p.name == g->gate_up) {
          st.written_parameters = {in_layer(g->gate_up), in_layer(g->down)};
          break;
        }
      }
    }
  }
  for (size_t i = 0; i < o.targets.size(); ++i)
    MF_CHECK(used[i], source, ": key 'peft.target_modules': '", o.targets[i], "' matches no projection of this ",
             type, " model");
  st.written_targets.assign(written.begin(), written.end());
  // Initialise as PEFT does: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform with a = sqrt(5)), B = 0.
  for (auto& p : model.params().all()) {
    if (!p.lora) {
      if (p.trainable) p.frozen = true;
      p.trainable = false;
      continue;
    }
    p.value = Tensor::zeros(p.shape, DType::F32);
    if (ends_with(p.name, ".lora_A.weight")) {
      // One stream per (adapter, global expert): the same draw however the experts are split over ranks.
      const hf::ExpertGroup* g = p.shape.size() == 3 ? model.adapter().group_of(p.name) : nullptr;
      const int64_t blocks = p.shape.size() == 3 ? p.shape[0] : 1, per = p.value.numel() / blocks;
      const float bound = 1.f / std::sqrt(static_cast<float>(p.shape.back()));  // 1/sqrt(in features)
      std::uniform_real_distribution<float> u(-bound, bound);
      for (int64_t x = 0; x < blocks; ++x) {
        std::mt19937_64 rng(seed ^ name_hash(p.name) ^ (g ? name_hash(std::to_string(g->first + x)) : 0));
        for (int64_t i = 0; i < per; ++i) p.value.f32()[x * per + i] = u(rng);
      }
    }
  }
  if (!o.init_adapter.empty()) load_adapter_weights(model, o.init_adapter);
  return st;
}

namespace {

// The adapter's tensors in PEFT's names; `gathered` (index for index with the parameters, may be
// empty) holds whole-model copies of expert adapters sharded over an expert-parallel group.
hf::NamedTensors adapter_tensors(const CausalLM& model, const std::vector<Tensor>& gathered) {
  hf::NamedTensors tensors;
  const auto& all = model.params().all();
  for (size_t i = 0; i < all.size(); ++i) {
    const nn::Param& p = all[i];
    if (!p.lora) continue;
    MF_CHECK(p.value.defined(), "internal: LoRA parameter ", p.name, " is not on the host");
    const bool whole = i < gathered.size() && gathered[i].defined();
    const Tensor src = whole ? gathered[i] : p.value;
    const Tensor v = src.dtype() == DType::F32 ? src : src.to(DType::F32);
    if (p.shape.size() != 3) {
      tensors.emplace_back(adapter_key(p.name), v);
      continue;
    }
    if (expert_adapter_layout(model.config().model_type) == nn::ExpertAdapters::Fused) {
      MF_CHECK(v.size(0) == model.adapter().group_of(p.name)->experts, "internal: ", p.name, " is not whole");
      tensors.emplace_back(fused_key(model, p), fused_to_file(p, v));
      continue;
    }
    for (const ExpertPiece& piece : expert_pieces(model, p, whole)) {  // per expert, as PEFT and vLLM name them
      Tensor t = Tensor::empty({piece.nr, piece.nc}, DType::F32);
      for (int64_t r = 0; r < piece.nr; ++r)
        std::copy_n(v.f32() + (piece.x * p.shape[1] + piece.r0 + r) * p.shape[2] + piece.c0, piece.nc,
                    t.f32() + r * piece.nc);
      tensors.emplace_back(piece.key, t);
    }
  }
  return tensors;
}

void write_adapter_config(const LoraState& lora, const std::string& base_model, const std::string& dir);

}  // namespace

void write_adapter_files(const CausalLM& model, const LoraState& lora, const std::string& base_model,
                         const std::string& dir) {
  hf::save_safetensors((fs::path(dir) / "adapter_model.safetensors").string(), adapter_tensors(model, {}));
  write_adapter_config(lora, base_model, dir);
}

void write_adapter_files_across(const CausalLM& model, const LoraState& lora, const Parallel& par,
                                const std::string& base_model, const std::string& dir) {
  const bool ep = par.ep && par.ep->size() > 1;
  std::vector<Tensor> gathered;
  if (ep) {  // the experts' adapters whole, from every rank of the group (in rank order = expert order)
    const auto& all = model.params().all();
    gathered.resize(all.size());
    for (size_t i = 0; i < all.size(); ++i) {
      const hf::ExpertGroup* g = model.adapter().group_of(all[i].name);
      if (!all[i].lora || !g || all[i].shape[0] == g->experts) continue;
      Shape whole = all[i].shape;
      whole[0] = g->experts;
      gathered[i] = Tensor::empty(whole, all[i].value.dtype());
      par.ep->all_gather(all[i].value, gathered[i]);
    }
  }
  if (par.world && par.world->rank() != 0) return;
  hf::save_safetensors((fs::path(dir) / "adapter_model.safetensors").string(), adapter_tensors(model, gathered));
  write_adapter_config(lora, base_model, dir);
}

namespace {

void write_adapter_config(const LoraState& lora, const std::string& base_model, const std::string& dir) {
  const LoraOptions& o = lora.options;
  nlohmann::ordered_json j = {{"peft_type", "LORA"},
                              {"task_type", "CAUSAL_LM"},
                              {"base_model_name_or_path", base_model},
                              {"r", o.rank},
                              {"lora_alpha", o.alpha},
                              {"lora_dropout", o.dropout},
                              {"target_modules", lora.written_targets},
                              {"target_parameters", lora.written_parameters.empty()
                                                        ? nlohmann::ordered_json(nullptr)
                                                        : nlohmann::ordered_json(lora.written_parameters)},
                              {"bias", "none"},
                              {"fan_in_fan_out", false},
                              {"use_rslora", o.rslora},
                              {"use_dora", false},
                              {"init_lora_weights", true},
                              {"modules_to_save", nullptr},
                              {"layers_to_transform", nullptr},
                              {"layers_pattern", nullptr},
                              {"rank_pattern", nlohmann::json::object()},
                              {"alpha_pattern", nlohmann::json::object()},
                              {"inference_mode", true},
                              {"revision", nullptr}};
  hf::write_text_file_atomic((fs::path(dir) / "adapter_config.json").string(), j.dump(2) + "\n");
}

}  // namespace

void save_adapter_across(const CausalLM& model, const LoraState& lora, const Parallel& par,
                         const std::string& base_model, const std::string& dir) {
  const bool main = !par.world || par.world->rank() == 0;
  std::string tmp;
  if (main) tmp = begin_folder(dir, /*overwrite=*/true, "adapter");
  try {
    write_adapter_files_across(model, lora, par, base_model, tmp);
  } catch (...) {
    if (main) fs::remove_all(tmp);
    throw;
  }
  if (main) finish_folder(tmp, dir);
  if (par.world) par.world->barrier();
}

void save_adapter(const CausalLM& model, const LoraState& lora, const std::string& base_model, const std::string& dir,
                  bool overwrite) {
  const std::string tmp = begin_folder(dir, overwrite, "adapter");
  try {
    write_adapter_files(model, lora, base_model, tmp);
  } catch (...) {
    fs::remove_all(tmp);
    throw;
  }
  finish_folder(tmp, dir);
}

LoraOptions read_adapter_config(const std::string& dir) {
  const std::string path = (fs::path(dir) / "adapter_config.json").string();
  MF_CHECK(fs::exists(path), dir, ": not a PEFT adapter folder (no adapter_config.json)");
  const nlohmann::ordered_json j = hf::read_json_file(path);  // depth-checked, one error naming the file
  MF_CHECK(j.is_object(), path, ": expected a JSON object");
  LoraOptions o;
  const auto field = [&](const char* key) -> const nlohmann::ordered_json& {
    MF_CHECK(j.contains(key), path, ": missing field '", key, "'");
    return j[key];
  };
  MF_CHECK(field("peft_type").is_string() && field("peft_type").get<std::string>() == "LORA", path,
           ": field 'peft_type' must be \"LORA\"");
  MF_CHECK(field("r").is_number_integer() && field("r").get<int64_t>() > 0, path, ": field 'r' must be a positive integer");
  o.rank = field("r").get<int64_t>();
  MF_CHECK(field("lora_alpha").is_number() && field("lora_alpha").get<double>() > 0, path,
           ": field 'lora_alpha' must be a positive number");
  o.alpha = field("lora_alpha").get<double>();
  o.dropout = j.value("lora_dropout", 0.0);
  o.rslora = j.value("use_rslora", false);
  MF_CHECK(!j.value("use_dora", false), path, ": field 'use_dora': DoRA adapters are not supported");
  MF_CHECK(!j.contains("bias") || j["bias"] == "none", path, ": field 'bias': only \"none\" is supported");
  for (const char* k : {"rank_pattern", "alpha_pattern"})
    MF_CHECK(!j.contains(k) || j[k].is_null() || j[k].empty(), path, ": field '", k, "': per-module ranks are not supported");
  const auto& t = field("target_modules");
  o.targets.clear();
  if (t.is_string()) {
    o.targets.push_back(t.get<std::string>());
  } else if (t.is_null() && j.contains("target_parameters") && j["target_parameters"].is_array()) {
    // only the experts' weights (target_parameters)
  } else {
    MF_CHECK(t.is_array(), path, ": field 'target_modules' must be a list of names or a string");
    for (const auto& e : t) {
      MF_CHECK(e.is_string(), path, ": field 'target_modules' must hold strings");
      o.targets.push_back(e.get<std::string>());
    }
  }
  if (j.contains("target_parameters") && !j["target_parameters"].is_null()) {
    const auto& tp = j["target_parameters"];
    MF_CHECK(tp.is_array(), path, ": field 'target_parameters' must be a list of parameter names");
    for (const auto& e : tp) {
      MF_CHECK(e.is_string(), path, ": field 'target_parameters' must hold strings");
      o.target_parameters.push_back(e.get<std::string>());
    }
  }
  MF_CHECK(o.dropout >= 0 && o.dropout < 1, path, ": field 'lora_dropout' must be in [0, 1)");
  return o;
}

void load_adapter_weights(CausalLM& model, const std::string& dir) {
  const std::string path = (fs::path(dir) / "adapter_model.safetensors").string();
  MF_CHECK(fs::exists(path), dir, ": no adapter_model.safetensors");
  const auto file = hf::SafetensorsFile::open(path);
  std::set<std::string> used;
  for (auto& p : model.params().all()) {
    if (!p.lora) continue;
    if (p.shape.size() == 3 && expert_adapter_layout(model.config().model_type) == nn::ExpertAdapters::Fused) {
      const std::string key = fused_key(model, p);
      const hf::ExpertGroup* g = model.adapter().group_of(p.name);
      MF_CHECK(file.contains(key), path, ": missing '", key, "' (the adapter does not cover this model's targets)");
      const Tensor t = file.get(key).to(DType::F32);
      MF_CHECK(t.shape() == fused_file_shape(p, g->experts), path, ": '", key, "' is ", shape_str(t.shape()),
               ", the model needs ", shape_str(fused_file_shape(p, g->experts)));
      p.value = fused_from_file(p, t, g->experts, g->first);
      used.insert(key);
      continue;
    }
    if (p.shape.size() == 3) {  // a fused expert adapter, from its per-expert tensors
      Tensor v = Tensor::zeros(p.shape, DType::F32);
      for (const ExpertPiece& piece : expert_pieces(model, p)) {
        MF_CHECK(file.contains(piece.key), path, ": missing '", piece.key, "' (the adapter does not cover this model's targets)");
        const Tensor t = file.get(piece.key).to(DType::F32);
        MF_CHECK(t.shape() == Shape({piece.nr, piece.nc}), path, ": '", piece.key, "' is ", shape_str(t.shape()),
                 ", the model needs [", piece.nr, ", ", piece.nc, "]");
        for (int64_t i = 0; i < piece.nr; ++i)
          std::copy_n(t.f32() + i * piece.nc, piece.nc,
                      v.f32() + (piece.x * p.shape[1] + piece.r0 + i) * p.shape[2] + piece.c0);
        used.insert(piece.key);
      }
      p.value = v;
      continue;
    }
    const std::string key = adapter_key(p.name);
    MF_CHECK(file.contains(key), path, ": missing '", key, "' (the adapter does not cover this model's targets)");
    const Tensor t = file.get(key);
    MF_CHECK(t.shape() == p.shape, path, ": '", key, "' is ", shape_str(t.shape()), ", the model needs ",
             shape_str(p.shape));
    p.value = t.to(DType::F32).clone();
    used.insert(key);
  }
  // Under expert parallelism the other ranks' experts are in the file too.
  for (const auto& p : model.params().all())
    if (p.lora && p.shape.size() == 3 && expert_adapter_layout(model.config().model_type) != nn::ExpertAdapters::Fused)
      for (const ExpertPiece& piece : expert_pieces(model, p, /*whole=*/true)) used.insert(piece.key);
  for (const auto& e : file.entries())
    MF_CHECK(used.count(e.name), path, ": '", e.name, "' belongs to no adapted module of this model");
}

LoraState apply_adapter_folder(CausalLM& model, const std::string& dir) {
  LoraOptions o = read_adapter_config(dir);
  o.init_adapter = dir;
  o.dropout = 0;  // dropout acts only in training: the adapter's function is the same without it
  return apply_lora(model, o, 0, (fs::path(dir) / "adapter_config.json").string());
}

void merge_lora(CausalLM& model, const LoraState& lora) {
  auto& ps = model.params();
  const float scale = lora.options.scale();
  for (auto& a : ps.all()) {
    if (!a.lora || !ends_with(a.name, ".lora_A.weight")) continue;
    const std::string stem = a.name.substr(0, a.name.size() - std::string(".lora_A.weight").size());
    nn::Param* b = ps.find(stem + ".lora_B.weight");
    nn::Param* w = ps.find(stem + ".weight");  // a projection's weight
    if (!w) w = ps.find(stem);                  // fused experts [E, out, in]
    MF_CHECK(w && b, "internal: LoRA adapter ", a.name, " lacks its weight or B");
    MF_CHECK(w->value.defined() && w->value.dtype() == DType::F32, "merge: ", w->name, " is not on the host in F32");
    const int64_t experts = a.shape.size() == 3 ? a.shape[0] : 1;
    const int64_t out = b->shape[b->shape.size() - 2], in = a.shape.back(), r = a.shape[a.shape.size() - 2];
    // GPT-OSS keeps its expert weights [E, in, out]: the delta goes in transposed.
    const hf::ExpertGroup* g = a.shape.size() == 3 ? model.adapter().group_of(w->name) : nullptr;
    const bool transposed = g && g->transposed;
    for (int64_t x = 0; x < experts; ++x) {  // W[x] += scale * B[x] A[x] (a block-diagonal B: gate and up apart)
      const Tensor bx = b->value.view({experts, out, r}).slice0(x, 1).view({out, r});
      const Tensor ax = a.value.view({experts, r, in}).slice0(x, 1).view({r, in});
      Tensor delta = Tensor::zeros(transposed ? Shape{in, out} : Shape{out, in}, DType::F32);
      if (transposed) ops::gemm(ax, true, bx, true, delta);  // (B A)^T = A^T B^T
      else ops::gemm(bx, false, ax, false, delta);
      ops::scale_inplace({delta}, scale);
      Tensor wx = w->value.view({experts, transposed ? in : out, transposed ? out : in}).slice0(x, 1).view(delta.shape());
      ops::add_inplace(wx, delta);
    }
    ops::zero(b->value);
  }
}

}  // namespace moeforge::models
