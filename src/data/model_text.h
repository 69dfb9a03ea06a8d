// What turns a dataset's text into a model's tokens, found the way training and evaluation both
// need it: the tokenizer (the model folder's, or another folder), the chat template (a file given,
// else the tokenizer folder's own) and the end-of-sequence id appended to text rows
// (generation_config.json's first eos id, else config.json's).
#pragma once
#include <optional>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "hf/chat/chat_template.h"
#include "hf/tokenizer/tokenizer.h"

namespace moeforge::data {

struct ModelText {
  std::string tokenizer_dir;
  std::optional<hf::Tokenizer> tokenizer;   // when the folder has a tokenizer.json (pre-tokenized rows need none)
  std::optional<hf::ChatTemplate> chat;     // for messages rows
  std::optional<int64_t> eos_id;            // appended to text and completion rows (when asked)
  // The files the above were read from (what a tokenized-data cache is keyed by, data/token_cache.h).
  std::vector<std::string> sources;
};

// `tokenizer_dir` "" = the model's folder; `chat_template_file` "" = the tokenizer folder's
// template; `where` names the source of those settings in errors (a recipe, a flag).
ModelText load_model_text(const std::string& model_dir, const std::string& tokenizer_dir,
                          const std::string& chat_template_file, bool add_eos, const std::string& where);

// A dataset file, folder or glob in any of dataset.h's row forms, tokenized for the model; with
// `report_progress`, a line every 5 s while it reads (one rank of a job reports for all). `workers`:
// the threads that tokenize (DatasetOptions::workers; 0: the idle CPUs, at most 16).
Dataset load_model_dataset(const std::string& path, const ModelText& text, bool skip_bad_lines, bool report_progress = true,
                           int workers = 0);

}  // namespace moeforge::data
