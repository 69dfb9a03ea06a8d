// A dataset's tokens as training reads them: every row's input ids (and labels, where it has its
// own) in one flat array, with a table of rows into it. Either owned (made from loaded rows) or
// mapped read-only from a tokenized-data cache file (data/token_cache.h), where the ranks of a node
// share one copy in the page cache instead of holding one each, and nothing is copied at start-up.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "data/token_jsonl.h"

namespace moeforge::data {

class TokenStore {
 public:
  // One row: where it came from, and its tokens at tokens()[offset, offset + length), its labels
  // (when has_labels) right after them. The layout of a cache file's row table.
  struct Row {
    int64_t line;
    int32_t file;
    uint32_t has_labels;
    uint64_t offset;
    uint64_t length;
  };
  static_assert(sizeof(Row) == 32, "a cache file's row record");

  // From loaded rows (each freed as it is copied, so the peak is one copy and a row).
  static std::shared_ptr<const TokenStore> from_rows(std::vector<TokenRow> rows, std::vector<std::string> files = {},
                                                     int64_t skipped_lines = 0);
  // Over memory another object keeps alive (a mapped file): the table and tokens are not copied.
  // The caller has checked every row against `tokens`' length.
  static std::shared_ptr<const TokenStore> over(std::shared_ptr<const void> owner, std::span<const Row> rows,
                                                std::span<const TokenId> tokens, std::vector<std::string> files,
                                                int64_t skipped_lines);

  size_t size() const { return rows_.size(); }
  const Row& row(size_t i) const { return rows_[i]; }
  std::span<const TokenId> input_ids(size_t i) const { return tokens_.subspan(rows_[i].offset, rows_[i].length); }
  // The row's labels, or its input ids when it has none (every token trained).
  std::span<const TokenId> labels(size_t i) const {
    const Row& r = rows_[i];
    return tokens_.subspan(r.offset + (r.has_labels ? r.length : 0), r.length);
  }
  std::span<const Row> rows() const { return rows_; }
  std::span<const TokenId> tokens() const { return tokens_; }
  const std::vector<std::string>& files() const { return files_; }
  int64_t skipped_lines() const { return skipped_lines_; }
  bool mapped() const { return owner_ != nullptr; }
  // 0, 1, ..., size() - 1: every row, for TokenBatches.
  std::vector<int64_t> every_row() const;
  // Where row i came from, as errors name it (Dataset::where's form).
  std::string where(size_t i) const;

 private:
  TokenStore() = default;
  std::vector<Row> owned_rows_;
  std::vector<TokenId> owned_tokens_;
  std::shared_ptr<const void> owner_;
  std::span<const Row> rows_;
  std::span<const TokenId> tokens_;
  std::vector<std::string> files_;
  int64_t skipped_lines_ = 0;
};

}  // namespace moeforge::data
