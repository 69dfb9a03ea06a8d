// A tokenized dataset kept on disk, so that a second run over the same data (a resume, the next
// experiment, every rank of a node after the first) maps tokens instead of tokenizing again: a
// 10 GB conversation set takes minutes to render and tokenize, and a mapped file is read as the
// batches touch it, one copy in the page cache for all the ranks of a node.
//
// A cache file answers for exactly one load: its key (token_cache_key) names every input the
// tokens depend on (each data file by path, size and modification time; the tokenizer, chat
// template and config files by their contents; the end-of-sequence id; skip_bad_lines; the
// moeforge build itself, whose tokenizer could change), and is stored whole in the file and
// compared on read, so a changed input is a miss, never a stale hit. Files are written under a
// temporary name and renamed; processes that load the same data at once take turns through an
// advisory lock on `<key hash>.lock`, so one tokenizes and the rest read what it wrote.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "data/model_text.h"
#include "data/token_store.h"

namespace moeforge::data {

// Where caches go when a recipe names no folder: $MOEFORGE_CACHE_DIR/datasets, else
// $XDG_CACHE_HOME/moeforge/datasets, else $HOME/.cache/moeforge/datasets; "" when none is set.
std::string default_token_cache_dir();

// Everything a tokenized load of `files` depends on, as text (one "name value" line each).
std::string token_cache_key(const std::vector<std::string>& files, const ModelText& text, bool skip_bad_lines);
// The file a key is cached in, inside `dir`: a hash of the key, `<16 hex digits>.mftok`.
std::string token_cache_path(const std::string& dir, const std::string& key);

// Writes a store under `key` (temporary name, then renamed over `path`). The file's layout:
// "MFTOKC02", the key, the data file names, the skipped count, the row and token counts, then
// (8-byte aligned) TokenStore::Row records and the int32 tokens they point into, and "MFTOKEND".
void write_token_cache(const std::string& path, const std::string& key, const TokenStore& store);
// The store cached at `path`, mapped read-only (nothing copied), when the file holds `key`; null
// when there is no file or it was written for another key. A damaged file (truncated, not a
// cache, a row pointing outside its tokens) throws naming it.
std::shared_ptr<const TokenStore> map_token_cache(const std::string& path, const std::string& key);

// What a cache folder holds (moeforge cache): each file's key (its inputs, one per line), its row
// and token counts and size, and when it was last written or mapped (a hit touches the file). A
// file that cannot be read is listed with `error` set.
struct TokenCacheEntry {
  std::string path, key, error;
  uint64_t rows = 0, tokens = 0, bytes = 0;  // tokens: the rows' input ids
  int64_t last_used = 0;  // seconds since the epoch
};
std::vector<TokenCacheEntry> list_token_caches(const std::string& dir);
// Removes a cache file and its lock, unless a process holds the lock now (it is writing or
// waiting): false then, and nothing removed.
bool remove_token_cache(const std::string& path);

// A dataset file, folder or glob tokenized for the model (load_model_dataset), through a cache in
// `cache_dir` (created when missing; "" = no cache): mapped when a file for the same inputs is
// there, else loaded, written for the next run, and mapped. The cache only ever saves time: a
// damaged file is loaded over, and a folder that cannot be written or locked is a warning.
std::shared_ptr<const TokenStore> load_model_tokens(const std::string& path, const ModelText& text, bool skip_bad_lines,
                                                    bool report_progress, int workers, const std::string& cache_dir);

}  // namespace moeforge::data
