#include "models/pretrained.h"

#include <unistd.h>

#include <filesystem>

#include "core/error.h"
#include "core/fault_injection.h"
#include "hf/fs_util.h"
#include "hf/safetensors.h"
#include "models/registry.h"

namespace moeforge::models {

namespace fs = std::filesystem;

LoadedModel from_pretrained(const std::string& dir, const LoadOptions& opts, const Parallel& par) {
  MF_CHECK(fs::is_directory(dir), dir, ": model folder does not exist");
  hf::ModelConfig cfg = hf::load_config(dir);
  LoadedModel out;
  out.source_dir = dir;
  auto ckpt = hf::SafetensorsCheckpoint::open(dir);
  // The multi-token prediction layers the checkpoint holds (DeepSeek's releases do, Transformers
  // writes none): built, loaded, and saved back; trained when a recipe asks.
  while (cfg.mtp_layers < cfg.num_nextn_predict_layers &&
         ckpt.contains("model.layers." + std::to_string(cfg.num_hidden_layers + cfg.mtp_layers) + ".eh_proj.weight"))
    ++cfg.mtp_layers;
  out.model = build_model(cfg, par);
  out.report = out.model->adapter().load(ckpt, out.model->params(), opts.compute_dtype);
  return out;
}

namespace {
// Files that travel with a model folder unchanged.
const char* kCompanionFiles[] = {"generation_config.json", "tokenizer.json",        "tokenizer_config.json",
                                 "special_tokens_map.json", "tokenizer.model",      "vocab.json",
                                 "merges.txt",             "chat_template.jinja",  "chat_template.json",
                                 "added_tokens.json"};
}  // namespace

void write_config_and_companions(const CausalLM& model, const std::string& source_dir, const std::string& dir) {
  const fs::path tmp(dir);
  if (model.adapter().dequantized()) {
    // The weights were dequantised on load and are saved plain: the folder is no longer quantised.
    hf::ModelConfig plain = model.config();
    plain.raw.erase("quantization_config");
    hf::save_config(plain, (tmp / "config.json").string());
  } else {
    hf::save_config(model.config(), (tmp / "config.json").string());
  }
  if (!source_dir.empty())
    for (const char* f : kCompanionFiles) {
      const fs::path src = fs::path(source_dir) / f;
      if (fs::exists(src)) fs::copy_file(src, tmp / f, fs::copy_options::overwrite_existing);
    }
}

void write_pretrained_files(const CausalLM& model, const std::string& source_dir, const std::string& dir,
                            const SaveOptions& opts) {
  write_config_and_companions(model, source_dir, dir);
  const auto tensors = model.adapter().export_tensors(model.params(), model.config().dtype);
  hf::save_sharded(dir, tensors, opts.max_shard_bytes);
  hf::fsync_dir(dir);
}

std::string temp_folder_of(const std::string& out_dir, const std::string& tag) {
  const fs::path out = fs::path(out_dir).lexically_normal();
  const fs::path parent = out.has_parent_path() ? out.parent_path() : fs::path(".");
  return (parent / (out.filename().string() + ".tmp." + tag)).string();
}

std::string begin_folder(const std::string& out_dir, bool overwrite, const std::string& tag) {
  const fs::path out = fs::path(out_dir).lexically_normal();
  if (fs::exists(out)) {
    MF_CHECK(overwrite, out.string(), ": output folder exists (pass --overwrite to replace it)");
    MF_CHECK(fs::is_directory(out), out.string(), ": exists and is not a folder");
  }
  const fs::path parent = out.has_parent_path() ? out.parent_path() : fs::path(".");
  fs::create_directories(parent);
  const fs::path tmp = temp_folder_of(out_dir, tag);
  core::fault_point("remove a stale temporary folder");
  fs::remove_all(tmp);
  core::fault_point("create a temporary folder");
  fs::create_directories(tmp);
  return tmp.string();
}

void finish_folder(const std::string& tmp_dir, const std::string& out_dir) {
  const fs::path out = fs::path(out_dir).lexically_normal(), tmp(tmp_dir);
  const fs::path parent = out.has_parent_path() ? out.parent_path() : fs::path(".");
  hf::fsync_dir(tmp.string());
  // Swap into place: the old folder (if any) is moved aside first and removed only after the
  // new one has its final name.
  fs::path old;
  if (fs::exists(out)) {
    old = parent / (out.filename().string() + ".old." + std::to_string(::getpid()));
    core::fault_point("move the old folder aside");
    fs::rename(out, old);
  }
  core::fault_point("rename the new folder into place");
  fs::rename(tmp, out);
  hf::fsync_dir(parent.string());
  core::fault_point("remove the old folder");
  if (!old.empty()) fs::remove_all(old);
}

void save_pretrained(const CausalLM& model, const std::string& source_dir, const std::string& out_dir,
                     const SaveOptions& opts) {
  const std::string tmp = begin_folder(out_dir, opts.overwrite, std::to_string(::getpid()));
  try {
    write_pretrained_files(model, source_dir, tmp, opts);
  } catch (...) {
    fs::remove_all(tmp);
    throw;
  }
  finish_folder(tmp, out_dir);
}

}  // namespace moeforge::models
