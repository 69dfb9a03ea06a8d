#include "data/model_text.h"

#include <algorithm>
#include <filesystem>

#include "core/error.h"
#include "core/logging.h"
#include "hf/fs_util.h"
#include "hf/generation_config.h"

namespace moeforge::data {

namespace fs = std::filesystem;

ModelText load_model_text(const std::string& model_dir, const std::string& tokenizer_dir,
                          const std::string& chat_template_file, bool add_eos, const std::string& where) {
  ModelText t;
  t.tokenizer_dir = tokenizer_dir.empty() ? model_dir : tokenizer_dir;
  if (fs::exists(fs::path(t.tokenizer_dir) / "tokenizer.json") || !tokenizer_dir.empty())
    t.tokenizer = hf::Tokenizer::load(t.tokenizer_dir);
  if (!chat_template_file.empty()) {
    MF_CHECK(fs::exists(chat_template_file), where, ": chat_template ", chat_template_file, ": no such file");
    t.chat = hf::ChatTemplate::from_source(hf::read_text_file(chat_template_file), chat_template_file, t.tokenizer_dir);
  } else if (fs::is_directory(t.tokenizer_dir)) {
    t.chat = hf::ChatTemplate::load(t.tokenizer_dir);
  }
  if (t.tokenizer && add_eos) {
    const hf::GenerationConfig g = hf::load_generation_config(model_dir);
    if (!g.eos_token_ids.empty()) t.eos_id = g.eos_token_ids.front();
  }
  // Every file that could change a row's tokens (a superset: what is there of the tokenizer
  // folder's files, the template given, the model's eos sources).
  for (const char* name : {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                           "chat_template.jinja", "chat_template.json"})
    if (const fs::path p = fs::path(t.tokenizer_dir) / name; fs::is_regular_file(p)) t.sources.push_back(p.string());
  if (!chat_template_file.empty()) t.sources.push_back(chat_template_file);
  if (t.eos_id)
    for (const char* name : {"generation_config.json", "config.json"})
      if (const fs::path p = fs::path(model_dir) / name; fs::is_regular_file(p)) t.sources.push_back(p.string());
  return t;
}

Dataset load_model_dataset(const std::string& path, const ModelText& text, bool skip_bad_lines, bool report_progress,
                           int workers) {
  DatasetOptions o;
  o.workers = workers;
  o.path = path;
  o.tokenizer = text.tokenizer ? &*text.tokenizer : nullptr;
  o.chat_template = text.chat ? &*text.chat : nullptr;
  o.chat_template_origin = text.tokenizer_dir;
  o.skip_bad_lines = skip_bad_lines;
  o.eos_id = text.eos_id;
  if (report_progress)
    o.on_progress = [](const LoadProgress& p) {
      log::info("data: ", p.rows, " rows in ", static_cast<int64_t>(p.seconds), " s (",
                static_cast<int64_t>(p.rows / std::max(p.seconds, 1e-9)), " rows/s), reading ", p.file, " (file ",
                p.file_number, " of ", p.files, ")", p.skipped ? ", " + std::to_string(p.skipped) + " skipped" : "");
    };
  return load_dataset(o);
}

}  // namespace moeforge::data
