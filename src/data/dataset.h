// Training data from jsonl files (one row per line), Parquet files (one row per row, its columns
// read as the fields below: a Hugging Face dataset's parquet shards as they are) or Arrow IPC files
// (.arrow: a folder written by `datasets`' save_to_disk, or its cache's files), in any of these forms
//   {"input_ids": [...], "labels": [...]?}   pre-tokenized (labels default to input_ids, -100 = no loss)
//   {"text": "..."}                          every token trained
//   {"prompt": "...", "completion": "..."}   loss on the completion only
//   {"messages": [{"role": ..., "content": ...}, ...], "tools": [...]?, "chat_template_kwargs": {...}?}
//                                            rendered by the chat template; loss on assistant tokens
//   {"conversations": [{"from", "value"}, ...]} (ShareGPT) and {"instruction", "input"?, "output"}
//   (Alpaca): read as conversations (data/row_formats.h); a row with "text" or "prompt" is that kind

// `path` is a file, a folder (every *.jsonl, *.parquet and *.arrow in it, sorted; a save_to_disk
// folder's files in its state.json order) or a glob. Malformed rows are fatal, or skipped and
// counted when `skip_bad_lines`; every error names file:line (a Parquet or Arrow file: "file: row
// N", N counted from 1). Columns other than the fields above are not read.
#pragma once
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "data/token_jsonl.h"

namespace moeforge::hf {
class Tokenizer;
class ChatTemplate;
}

namespace moeforge::data {

// How far a load has come (DatasetOptions::on_progress): rows read so far over every file, the
// file being read (counted from 1), and the seconds since the load began.
struct LoadProgress {
  std::string file;
  size_t file_number = 0, files = 0;
  int64_t rows = 0, skipped = 0;
  double seconds = 0;
};

struct DatasetOptions {
  std::string path;
  const hf::Tokenizer* tokenizer = nullptr;  // needed for text, prompt/completion and messages rows
  const hf::ChatTemplate* chat_template = nullptr;  // needed for messages rows
  std::string chat_template_origin;  // where a template was looked for, for the error when there is none
  bool skip_bad_lines = false;
  std::optional<int64_t> eos_id;  // appended to text and completion rows when set
  // Called at most every progress_seconds while rows are read (tokenizing and rendering a large
  // dataset takes minutes), and not at all for loads that end sooner.
  std::function<void(const LoadProgress&)> on_progress;
  double progress_seconds = 5;
  // Threads that parse and tokenize rows (0: the idle CPUs, core::idle_cpus, at most 16); the rows,
  // errors and skipped counts are the same for any number.
  int workers = 0;
};

struct Dataset {
  std::vector<TokenRow> rows;  // labels unset where every token is trained
  std::vector<std::string> files;
  int64_t skipped_lines = 0;
  // Where a row came from, as errors name it: "file:line", or "file: row N" for Parquet and Arrow.
  std::string where(const TokenRow& r) const;
};

Dataset load_dataset(const DatasetOptions& opts);
// The files a dataset path names, in the order they are read: a file; a folder's *.jsonl, *.parquet
// and *.arrow files, sorted (a folder holding several splits by its file names is refused with the
// glob that picks one); a save_to_disk folder's files in its state.json's order (a DatasetDict's
// folder is refused with the split to name); or a glob's matches, sorted.
std::vector<std::string> dataset_files(const std::string& path);
// One line of a dataset file as a row (labels set); `where` is "file:line" for errors.
TokenRow parse_dataset_line(const std::string& line, const std::string& where, const DatasetOptions& opts);

// Validation rows held out of a training set (the recipe's eval_split): round(fraction x rows),
// at least one, chosen by a seeded draw of our own (the same rows on every machine and every
// resume), both parts in their file order. Errors when no training row would be left.
struct HeldOut {
  std::vector<TokenRow> train, eval;
};
HeldOut hold_out(std::vector<TokenRow> rows, double fraction, uint64_t seed, const std::string& where);
// The same split of rows 0..n-1 as indices (rows held in a TokenStore).
struct HeldOutRows {
  std::vector<int64_t> train, eval;
};
HeldOutRows hold_out_rows(int64_t n, double fraction, uint64_t seed, const std::string& where);

// Data parallelism: each optimizer step takes `global_batch` consecutive rows of the shuffled
// stream; rank r of `world` trains rows [offset, offset + count) of them. The stream does not
// depend on the world size, so a run resumes on a different number of ranks at the same place.
struct RankSlice {
  int64_t offset = 0, count = 0;
};
RankSlice rank_slice(int64_t global_batch, int64_t rank, int64_t world);

}  // namespace moeforge::data
