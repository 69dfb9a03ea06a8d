#include "train/recipe.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <filesystem>
#include <functional>
#include <map>
#include <cmath>
#include <limits>
#include <set>
#include <sstream>

#include "core/error.h"

namespace moeforge::train {

namespace {

namespace fs = std::filesystem;

using Setter = std::function<void(Recipe&, const YAML::Node&, const std::string& where)>;

std::string scalar_text(const YAML::Node& n) {
  if (n.IsScalar()) return n.Scalar();
  YAML::Emitter e;
  e << YAML::Flow << n;
  return e.c_str();
}

template <typename T>
T as(const YAML::Node& n, const std::string& key, const std::string& where, const char* type) {
  if (!n.IsScalar()) MF_THROW(where, ": key '", key, "' must be ", type, ", got ", scalar_text(n));
  try {
    return n.as<T>();
  } catch (const YAML::Exception&) {
    MF_THROW(where, ": key '", key, "' must be ", type, ", got '", n.Scalar(), "'");
  }
}

struct Key {
  const char* name;
  Setter set;
  std::function<std::string(const Recipe&)> get;
};

template <typename Field>
Key int_key(const char* name, Field f, int64_t min) {
  return {name,
          [=](Recipe& r, const YAML::Node& n, const std::string& w) {
            const int64_t v = as<int64_t>(n, name, w, "an integer");
            if (v < min) MF_THROW(w, ": key '", name, "' must be >= ", min, ", got ", v);
            r.*f = v;
          },
          [=](const Recipe& r) { return std::to_string(r.*f); }};
}

std::string fmt_double(double v) {
  std::ostringstream os;
  os.precision(17);
  os << v;
  return os.str();
}

std::vector<Key> make_keys() {
  auto str = [](const char* name, std::string Recipe::*f) -> Key {
    return {name, [=](Recipe& r, const YAML::Node& n, const std::string& w) { r.*f = as<std::string>(n, name, w, "a string"); },
            [=](const Recipe& r) { return "\"" + r.*f + "\""; }};
  };
  auto boolean = [](const char* name, bool Recipe::*f) -> Key {
    return {name, [=](Recipe& r, const YAML::Node& n, const std::string& w) { r.*f = as<bool>(n, name, w, "true or false"); },
            [=](const Recipe& r) { return std::string(r.*f ? "true" : "false"); }};
  };
  // A finite number in [min, max] (max_exclusive: [min, max)).
  auto dbl = [](const char* name, std::function<double&(Recipe&)> f, double min,
                double max = std::numeric_limits<double>::max(), bool max_exclusive = false) -> Key {
    return {name,
            [=](Recipe& r, const YAML::Node& n, const std::string& w) {
              const double v = as<double>(n, name, w, "a number");
              if (!std::isfinite(v)) MF_THROW(w, ": key '", name, "' must be a finite number, got ", n.Scalar());
              if (v < min) MF_THROW(w, ": key '", name, "' must be >= ", min, ", got ", v);
              if (max_exclusive ? v >= max : v > max)
                MF_THROW(w, ": key '", name, "' must be ", max_exclusive ? "< " : "<= ", max, ", got ", v);
              f(r) = v;
            },
            [=](const Recipe& r) { return fmt_double(f(const_cast<Recipe&>(r))); }};
  };
  std::vector<Key> keys = {
      str("model", &Recipe::model),
      str("data", &Recipe::data),
      str("output_dir", &Recipe::output_dir),
      str("tokenizer", &Recipe::tokenizer),
      str("chat_template", &Recipe::chat_template),
      boolean("packing", &Recipe::packing),
      boolean("skip_bad_lines", &Recipe::skip_bad_lines),
      boolean("add_eos", &Recipe::add_eos),
      {"seq_len",
       [](Recipe& r, const YAML::Node& n, const std::string& w) {
         const int64_t v = as<int64_t>(n, "seq_len", w, "an integer");
         if (v != 0 && v < 2) MF_THROW(w, ": key 'seq_len' must be >= 2 (or 0: the model's length up to 2048), got ", v);
         r.seq_len = v;
       },
       [](const Recipe& r) { return std::to_string(r.seq_len); }},
      str("eval_data", &Recipe::eval_data),
      str("data_cache", &Recipe::data_cache),
      dbl("eval_split", [](Recipe& r) -> double& { return r.eval_split; }, 0, 1, true),
      int_key("eval_every", &Recipe::eval_every, 0),
      int_key("eval_max_batches", &Recipe::eval_max_batches, 0),
      boolean("save_best", &Recipe::save_best),
      {"report_to",
       [](Recipe& r, const YAML::Node& n, const std::string& w) {
         const auto v = as<std::string>(n, "report_to", w, "a string");
         if (v != "none" && v != "tensorboard") MF_THROW(w, ": key 'report_to' must be none or tensorboard, got '", v, "'");
         r.report_to = v;
       },
       [](const Recipe& r) { return r.report_to; }},
      boolean("resume_allow_changes", &Recipe::resume_allow_changes),
      int_key("micro_batch", &Recipe::micro_batch, 1),
      int_key("global_batch", &Recipe::global_batch, 1),
      int_key("steps", &Recipe::steps, 0),
      dbl("epochs", [](Recipe& r) -> double& { return r.epochs; }, 0),
      dbl("optimizer.lr", [](Recipe& r) -> double& { return r.optimizer.lr; }, 0),
      dbl("optimizer.beta1", [](Recipe& r) -> double& { return r.optimizer.beta1; }, 0, 1, /*max_exclusive=*/true),
      dbl("optimizer.beta2", [](Recipe& r) -> double& { return r.optimizer.beta2; }, 0, 1, /*max_exclusive=*/true),
      dbl("optimizer.eps", [](Recipe& r) -> double& { return r.optimizer.eps; }, 0),
      dbl("optimizer.weight_decay", [](Recipe& r) -> double& { return r.optimizer.weight_decay; }, 0),
      {"optimizer.decay_norms_and_biases",
       [](Recipe& r, const YAML::Node& n, const std::string& w) {
         r.optimizer.decay_norms_and_biases = as<bool>(n, "optimizer.decay_norms_and_biases", w, "true or false");
       },
       [](const Recipe& r) { return std::string(r.optimizer.decay_norms_and_biases ? "true" : "false"); }},
      {"schedule.type",
       [](Recipe& r, const YAML::Node& n, const std::string& w) {
         const auto v = as<std::string>(n, "schedule.type", w, "a string");
         if (v != "constant" && v != "linear" && v != "cosine" && v != "wsd")
           MF_THROW(w, ": key 'schedule.type' must be constant, linear, cosine or wsd, got '", v, "'");
         r.schedule.type = v;
       },
       [](const Recipe& r) { return r.schedule.type; }},
      {"schedule.warmup_steps",
       [](Recipe& r, const YAML::Node& n, const std::string& w) {
         r.schedule.warmup_steps = as<int64_t>(n, "schedule.warmup_steps", w, "an integer");
         if (r.schedule.warmup_steps < 0) MF_THROW(w, ": key 'schedule.warmup_steps' must be >= 0");
       },
       [](const Recipe& r) { return std::to_string(r.schedule.warmup_steps); }},
      dbl("schedule.min_lr_ratio", [](Recipe& r) -> double& { return r.schedule.min_lr_ratio; }, 0, 1),
      dbl("schedule.warmup_ratio", [](Recipe& r) -> double& { return r.schedule.warmup_ratio; }, 0, 1),
      {"schedule.decay_steps",
       [](Recipe& r, const YAML::Node& n, const std::string& w) {
         r.schedule.decay_steps = as<int64_t>(n, "schedule.decay_steps", w, "an integer");
         if (r.schedule.decay_steps < 0) MF_THROW(w, ": key 'schedule.decay_steps' must be >= 0");
       },
       [](const Recipe& r) { return std::to_string(r.schedule.decay_steps); }},
      dbl("schedule.decay_ratio", [](Recipe& r) -> double& { return r.schedule.decay_ratio; }, 0, 1),
      {"schedule.decay_type",
       [](Recipe& r, const YAML::Node& n, const std::string& w) {
         const auto v = as<std::string>(n, "schedule.decay_type", w, "a string");
         if (v != "linear" && v != "cosine" && v != "1-sqrt")
           MF_THROW(w, ": key 'schedule.decay_type' must be linear, cosine or 1-sqrt, got '", v, "'");
         r.schedule.decay_type = v;
       },
       [](const Recipe& r) { return r.schedule.decay_type; }},
      dbl("max_grad_norm", [](Recipe& r) -> double& { return r.max_grad_norm; }, 0),
      {"device",
       [](Recipe& r, const YAML::Node& n, const std::string& w) {
         const auto v = as<std::string>(n, "device", w, "a string");
         if (v != "cpu" && v != "cuda") MF_THROW(w, ": key 'device' must be cpu or cuda, got '", v, "'");
         r.device = v == "cuda" ? Device::Kind::CUDA : Device::Kind::CPU;
       },
       [](const Recipe& r) { return std::string(r.device == Device::Kind::CUDA ? "cuda" : "cpu"); }},
      {"precision",
       [](Recipe& r, const YAML::Node& n, const std::string& w) {
         const auto v = as<std::string>(n, "precision", w, "a string");
         if (v != "fp32" && v != "bf16-mixed" && v != "bf16")
           MF_THROW(w, ": key 'precision' must be fp32, bf16-mixed or bf16, got '", v, "'");
         r.precision = v;
       },
       [](const Recipe& r) { return r.precision; }},
      boolean("activation_checkpointing", &Recipe::activation_checkpointing),
      boolean("optimizer_in_backward", &Recipe::optimizer_in_backward),
      int_key("log_every", &Recipe::log_every, 1),
      int_key("save_every", &Recipe::save_every, 0),
      int_key("save_total_limit", &Recipe::save_total_limit, 1),
      str("max_shard_size", &Recipe::max_shard_size),
      {"seed", [](Recipe& r, const YAML::Node& n, const std::string& w) { r.seed = as<uint64_t>(n, "seed", w, "a non-negative integer"); },
       [](const Recipe& r) { return std::to_string(r.seed); }},
      boolean("overwrite", &Recipe::overwrite),
      {"resume",
       [](Recipe& r, const YAML::Node& n, const std::string& w) {
         const auto v = as<std::string>(n, "resume", w, "true, false or a checkpoint path");
         r.resume = (v == "false" || v == "no" || v.empty()) ? "" : (v == "yes" ? "true" : v);
       },
       [](const Recipe& r) { return r.resume.empty() ? std::string("false") : "\"" + r.resume + "\""; }},
      int_key("threads", &Recipe::threads, 0),
      int_key("ep_size", &Recipe::ep_size, 1),
      dbl("mtp_loss_scale", [](Recipe& r) -> double& { return r.mtp_loss_scale; }, 0),
      {"zero_stage",
       [](Recipe& r, const YAML::Node& n, const std::string& w) {
         const auto v = as<int64_t>(n, "zero_stage", w, "an integer");
         if (v != 1 && v != 3) MF_THROW(w, ": key 'zero_stage' must be 1 or 3, got ", v);
         r.zero_stage = v;
       },
       [](const Recipe& r) { return std::to_string(r.zero_stage); }},
      {"peft.method",
       [](Recipe& r, const YAML::Node& n, const std::string& w) {
         const auto v = as<std::string>(n, "peft.method", w, "a string");
         if (v != "lora" && v != "none" && !v.empty()) MF_THROW(w, ": key 'peft.method' must be lora or none, got '", v, "'");
         r.peft_method = v == "lora" ? v : "";
       },
       [](const Recipe& r) { return r.peft_method.empty() ? std::string("none") : r.peft_method; }},
      {"peft.rank",
       [](Recipe& r, const YAML::Node& n, const std::string& w) {
         r.lora.rank = as<int64_t>(n, "peft.rank", w, "an integer");
         if (r.lora.rank < 1 || r.lora.rank > 65536) MF_THROW(w, ": key 'peft.rank' must be in [1, 65536], got ", r.lora.rank);
       },
       [](const Recipe& r) { return std::to_string(r.lora.rank); }},
      dbl("peft.alpha", [](Recipe& r) -> double& { return r.lora.alpha; }, 1e-12),
      dbl("peft.dropout", [](Recipe& r) -> double& { return r.lora.dropout; }, 0, 1, /*max_exclusive=*/true),
      {"peft.use_rslora",
       [](Recipe& r, const YAML::Node& n, const std::string& w) { r.lora.rslora = as<bool>(n, "peft.use_rslora", w, "true or false"); },
       [](const Recipe& r) { return std::string(r.lora.rslora ? "true" : "false"); }},
      {"peft.target_modules",
       [](Recipe& r, const YAML::Node& n, const std::string& w) {
         r.lora.targets.clear();
         if (n.IsScalar()) {
           r.lora.targets.push_back(n.Scalar());
         } else if (n.IsSequence()) {
           for (const auto& e : n) r.lora.targets.push_back(as<std::string>(e, "peft.target_modules", w, "a module name"));
         } else {
           MF_THROW(w, ": key 'peft.target_modules' must be a list of module names or all-linear");
         }
         // (empty: only the experts' weights, given by peft.target_parameters; apply_lora checks that)
       },
       [](const Recipe& r) {
         std::string s = "[";
         for (size_t i = 0; i < r.lora.targets.size(); ++i) s += (i ? ", " : "") + r.lora.targets[i];
         return s + "]";
       }},
      {"peft.target_parameters",
       [](Recipe& r, const YAML::Node& n, const std::string& w) {
         r.lora.target_parameters.clear();
         if (!n.IsSequence()) MF_THROW(w, ": key 'peft.target_parameters' must be a list of parameter names");
         for (const auto& e : n)
           r.lora.target_parameters.push_back(as<std::string>(e, "peft.target_parameters", w, "a parameter name"));
       },
       [](const Recipe& r) {
         std::string s = "[";
         for (size_t i = 0; i < r.lora.target_parameters.size(); ++i) s += (i ? ", " : "") + r.lora.target_parameters[i];
         return s + "]";
       }},
      {"peft.adapter",
       [](Recipe& r, const YAML::Node& n, const std::string& w) { r.lora.init_adapter = as<std::string>(n, "peft.adapter", w, "a folder"); },
       [](const Recipe& r) { return "\"" + r.lora.init_adapter + "\""; }},
  };
  return keys;
}

const std::vector<Key>& keys() {
  static const std::vector<Key> k = make_keys();
  return k;
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

void apply(Recipe& r, const std::string& key, const YAML::Node& value, const std::string& where) {
  for (const auto& k : keys())
    if (key == k.name) {
      k.set(r, value, where);
      return;
    }
  std::string best;
  size_t best_d = 1000;
  for (const auto& k : keys()) {
    // Compare with the whole key and with its last part, so "lr" suggests "optimizer.lr".
    std::string name = k.name;
    const std::string tail = name.substr(name.rfind('.') + 1);
    const size_t d = std::min(edit_distance(key, name), edit_distance(key, tail));
    if (d < best_d) {
      best_d = d;
      best = name;
    }
  }
  if (best_d <= std::max<size_t>(2, key.size() / 3)) MF_THROW(where, ": unknown key '", key, "' (did you mean '", best, "'?)");
  MF_THROW(where, ": unknown key '", key, "'");
}

// `seen`: the keys the file gave so far (a key given twice is an error, not "the last one wins").
// Paths a recipe file gives are relative to the file's folder (command-line overrides stay
// relative to the current directory, where the shell typed them).
void resolve_paths(Recipe& r, const std::set<std::string>& from_file, const fs::path& folder) {
  auto fix = [&](const char* key, std::string& v) {
    if (!from_file.count(key) || v.empty() || fs::path(v).is_absolute()) return;
    v = (folder / v).lexically_normal().string();
  };
  fix("model", r.model);
  fix("data", r.data);
  fix("output_dir", r.output_dir);
  fix("tokenizer", r.tokenizer);
  fix("chat_template", r.chat_template);
  fix("eval_data", r.eval_data);
  if (r.data_cache != "none") fix("data_cache", r.data_cache);
  fix("peft.adapter", r.lora.init_adapter);
  if (r.resume != "true") fix("resume", r.resume);
}

void flatten(const YAML::Node& node, const std::string& prefix, Recipe& r, const std::string& where,
             std::set<std::string>& seen) {
  for (auto it = node.begin(); it != node.end(); ++it) {
    // YAML allows any node as a key ("? [a, b]" or "? {x: 1}"); a recipe's keys are names.
    MF_CHECK(it->first.IsScalar(), where, ": ", prefix.empty() ? "a key" : "a key under '" + prefix.substr(0, prefix.size() - 1) + "'",
             " at line ", it->first.Mark().line + 1, " is a ", it->first.IsMap() ? "mapping" : it->first.IsSequence() ? "list" : "null",
             ", not a name");
    const std::string key = prefix + it->first.as<std::string>();
    if (!seen.insert(key).second) MF_THROW(where, ": key '", key, "' is given twice");
    if (it->second.IsMap()) flatten(it->second, key + ".", r, where, seen);
    else apply(r, key, it->second, where);
  }
}

}  // namespace

std::vector<std::string> recipe_keys() {
  std::vector<std::string> v;
  for (const auto& k : keys()) v.push_back(k.name);
  return v;
}

namespace {
std::map<std::string, std::string> yaml_lines(const std::string& text) {
  std::map<std::string, std::string> out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    const auto colon = line.find(": ");
    if (colon != std::string::npos) out[line.substr(0, colon)] = line.substr(colon + 2);
  }
  return out;
}
}  // namespace

std::vector<std::string> changed_training_keys(const std::string& old_yaml, const std::string& new_yaml) {
  static const std::set<std::string> not_compared = {
      "output_dir", "overwrite", "resume", "resume_allow_changes", "threads", "log_every", "save_every",
      "save_total_limit", "max_shard_size", "device", "precision", "ep_size", "zero_stage", "skip_bad_lines",
      "eval_data", "eval_every", "eval_max_batches", "save_best", "activation_checkpointing", "optimizer_in_backward",
      "report_to", "data_cache",
      // A run may be extended (or cut short) on resume; the schedule then follows the new length.
      "steps", "epochs"};
  const auto a = yaml_lines(old_yaml), b = yaml_lines(new_yaml);
  std::vector<std::string> out;
  for (const auto& [key, value] : b) {
    if (not_compared.count(key)) continue;
    const auto it = a.find(key);
    if (it == a.end()) continue;  // a key the older run did not know
    if (it->second != value) out.push_back(key + ": " + it->second + " -> " + value);
  }
  return out;
}

namespace {
Recipe recipe_from(const YAML::Node& root, const std::string& path, const fs::path& base_dir,
                   const std::vector<std::string>& overrides);
}  // namespace

Recipe load_recipe(const std::string& path, const std::vector<std::string>& overrides) {
  YAML::Node root;
  try {
    root = YAML::LoadFile(path);
  } catch (const YAML::BadFile&) {
    MF_THROW(path, ": cannot open recipe");
  } catch (const YAML::Exception& e) {
    MF_THROW(path, ": invalid YAML at line ", e.mark.line + 1, " (", e.msg, ")");
  }
  return recipe_from(root, path, fs::path(path).parent_path(), overrides);
}

Recipe load_recipe_text(const std::string& yaml, const std::string& origin, const std::string& base_dir,
                        const std::vector<std::string>& overrides) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml);
  } catch (const YAML::Exception& e) {
    MF_THROW(origin, ": invalid YAML at line ", e.mark.line + 1, " (", e.msg, ")");
  }
  return recipe_from(root, origin, base_dir, overrides);
}

namespace {
Recipe recipe_from(const YAML::Node& root, const std::string& path, const fs::path& base_dir,
                   const std::vector<std::string>& overrides) {
  Recipe r;
  r.source = path;
  if (root.IsDefined() && !root.IsNull()) {
    MF_CHECK(root.IsMap(), path, ": a recipe must be a mapping of keys to values");
    std::set<std::string> seen;
    flatten(root, "", r, path, seen);
    resolve_paths(r, seen, base_dir);
  }
  for (const auto& o : overrides) {
    const auto eq = o.find('=');
    MF_CHECK(eq != std::string::npos && eq > 0, "command line: override '", o, "' must look like key=value");
    YAML::Node v;
    try {
      v = YAML::Load(o.substr(eq + 1));
    } catch (const YAML::Exception& e) {
      MF_THROW("command line: override '", o, "' has an invalid value (", e.msg, ")");
    }
    if (v.IsNull()) v = YAML::Node(std::string());
    apply(r, o.substr(0, eq), v, "command line");
  }
  for (const char* req : {"model", "data", "output_dir"}) {
    const std::string& v = std::string(req) == "model" ? r.model : std::string(req) == "data" ? r.data : r.output_dir;
    MF_CHECK(!v.empty(), path, ": key '", req, "' is required");
  }
  MF_CHECK(r.steps > 0 || r.epochs > 0, path, ": set 'steps' or 'epochs'");
  MF_CHECK(r.steps == 0 || r.epochs == 0, path, ": set one of 'steps' and 'epochs', not both (steps ", r.steps,
           ", epochs ", r.epochs, ")");
  MF_CHECK(r.schedule.warmup_steps == 0 || r.schedule.warmup_ratio == 0, path,
           ": set one of 'schedule.warmup_steps' and 'schedule.warmup_ratio', not both");
  MF_CHECK(!r.save_best || !r.eval_data.empty() || r.eval_split > 0, path,
           ": key 'save_best' needs 'eval_data' or 'eval_split' (the loss it keeps the best of)");
  MF_CHECK(r.eval_data.empty() || r.eval_split == 0, path,
           ": set one of 'eval_data' and 'eval_split' (a file of validation rows, or a share of data held out), not both");
  MF_CHECK(r.global_batch % r.micro_batch == 0, path, ": key 'global_batch' (", r.global_batch,
           ") must be a multiple of 'micro_batch' (", r.micro_batch, ")");
  MF_CHECK(r.peft_method.empty() || r.mtp_loss_scale == 0, path,
           ": key 'mtp_loss_scale' must be 0 with peft.method lora (LoRA adapts the main layers only)");
  MF_CHECK(r.peft_method == "lora" || r.lora.init_adapter.empty(), path, ": key 'peft.adapter' needs peft.method: lora");
  if (r.precision.empty()) r.precision = r.device == Device::Kind::CUDA ? "bf16-mixed" : "fp32";
  MF_CHECK(r.device == Device::Kind::CUDA || r.precision == "fp32", path, ": key 'precision' value '", r.precision,
           "' is not available on the CPU backend (CPU trains in fp32; bf16-mixed and bf16 need device: cuda)");
  return r;
}

}  // namespace

std::string Recipe::to_yaml() const {
  std::ostringstream os;
  os << "# resolved recipe (every key, defaults included)\n";
  for (const auto& k : keys()) os << k.name << ": " << k.get(*this) << "\n";
  return os.str();
}

}  // namespace moeforge::train
