// Training data from jsonl files: one row per line, in any of these forms
//   {"input_ids": [...], "labels": [...]?}   pre-tokenized (labels default to input_ids, -100 = no loss)
//   {"text": "..."}                          every token trained
//   {"prompt": "...", "completion": "..."}   loss on the completion only
// ("messages" rows need chat templates, which are not implemented yet: they are refused by name.)
// `path` is a file, a folder (every *.jsonl in it, sorted) or a glob. Malformed lines are fatal, or
// skipped and counted when `skip_bad_lines`; every error names file:line.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "data/token_jsonl.h"

namespace moeforge::hf {
class Tokenizer;
}

namespace moeforge::data {

struct DatasetOptions {
  std::string path;
  const hf::Tokenizer* tokenizer = nullptr;  // needed for text and prompt/completion rows
  bool skip_bad_lines = false;
  std::optional<int64_t> eos_id;  // appended to text and completion rows when set
};

struct Dataset {
  std::vector<TokenRow> rows;  // labels always set
  std::vector<std::string> files;
  int64_t skipped_lines = 0;
};

Dataset load_dataset(const DatasetOptions& opts);

}  // namespace moeforge::data
