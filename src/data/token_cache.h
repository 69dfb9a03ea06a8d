// A tokenized dataset kept on disk, so that a second run over the same data (a resume, the next
// experiment, every rank of a node after the first) reads tokens instead of tokenizing again: a
// 10 GB conversation set takes minutes to render and tokenize and seconds to read back.
//
// A cache file answers for exactly one load: its key (token_cache_key) names every input the
// tokens depend on (each data file by path, size and modification time; the tokenizer, chat
// template and config files by their contents; the end-of-sequence id; skip_bad_lines; the
// moeforge build itself, whose tokenizer could change), and is stored whole in the file and
// compared on read, so a changed input is a miss, never a stale hit. Files are written under a
// temporary name and renamed; processes that load the same data at once take turns through an
// advisory lock on `<key hash>.lock`, so one tokenizes and the rest read what it wrote.
#pragma once
#include <optional>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "data/model_text.h"

namespace moeforge::data {

// Where caches go when a recipe names no folder: $MOEFORGE_CACHE_DIR/datasets, else
// $XDG_CACHE_HOME/moeforge/datasets, else $HOME/.cache/moeforge/datasets; "" when none is set.
std::string default_token_cache_dir();

// Everything a tokenized load of `files` depends on, as text (one "name value" line each).
std::string token_cache_key(const std::vector<std::string>& files, const ModelText& text, bool skip_bad_lines);
// The file a key is cached in, inside `dir`: a hash of the key, `<16 hex digits>.mftok`.
std::string token_cache_path(const std::string& dir, const std::string& key);

// Writes `d` under `key` (temporary name, then renamed over `path`).
void write_token_cache(const std::string& path, const std::string& key, const Dataset& d);
// The dataset cached at `path` when the file holds `key`; nullopt when there is no file or it was
// written for another key. A damaged file (truncated, not a cache) throws naming it.
std::optional<Dataset> read_token_cache(const std::string& path, const std::string& key);

// load_model_dataset through a cache in `cache_dir` (created when missing): read when a file for
// the same inputs is there, else loaded, then written for the next run. The cache only ever saves
// time: a damaged file is loaded over, and a folder that cannot be written or locked is a warning.
Dataset load_model_dataset_cached(const std::string& path, const ModelText& text, bool skip_bad_lines,
                                  bool report_progress, int workers, const std::string& cache_dir);

}  // namespace moeforge::data
