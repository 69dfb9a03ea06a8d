#include "data/token_store.h"

#include "core/error.h"
#include "data/table_files.h"

namespace moeforge::data {

std::shared_ptr<const TokenStore> TokenStore::from_rows(std::vector<TokenRow> rows, std::vector<std::string> files,
                                                        int64_t skipped_lines) {
  std::shared_ptr<TokenStore> s(new TokenStore());
  size_t total = 0;
  for (const TokenRow& r : rows) total += r.input_ids.size() * (r.labels ? 2 : 1);
  s->owned_tokens_.reserve(total);
  s->owned_rows_.reserve(rows.size());
  for (TokenRow& r : rows) {
    MF_CHECK(!r.labels || r.labels->size() == r.input_ids.size(), "internal: a row of line ", r.line,
             " has labels of another length than its input_ids");
    s->owned_rows_.push_back({r.line, r.file, r.labels ? 1u : 0u, s->owned_tokens_.size(), r.input_ids.size()});
    s->owned_tokens_.insert(s->owned_tokens_.end(), r.input_ids.begin(), r.input_ids.end());
    if (r.labels) s->owned_tokens_.insert(s->owned_tokens_.end(), r.labels->begin(), r.labels->end());
    std::vector<TokenId>().swap(r.input_ids);
    r.labels.reset();
  }
  s->rows_ = s->owned_rows_;
  s->tokens_ = s->owned_tokens_;
  s->files_ = std::move(files);
  s->skipped_lines_ = skipped_lines;
  return s;
}

std::shared_ptr<const TokenStore> TokenStore::over(std::shared_ptr<const void> owner, std::span<const Row> rows,
                                                   std::span<const TokenId> tokens, std::vector<std::string> files,
                                                   int64_t skipped_lines) {
  std::shared_ptr<TokenStore> s(new TokenStore());
  s->owner_ = std::move(owner);
  s->rows_ = rows;
  s->tokens_ = tokens;
  s->files_ = std::move(files);
  s->skipped_lines_ = skipped_lines;
  return s;
}

std::vector<int64_t> TokenStore::every_row() const {
  std::vector<int64_t> v(size());
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<int64_t>(i);
  return v;
}

std::string TokenStore::where(size_t i) const {
  const Row& r = rows_[i];
  if (r.file < 0 || static_cast<size_t>(r.file) >= files_.size()) return "row " + std::to_string(i + 1);
  return where_in_file(files_[static_cast<size_t>(r.file)], r.line);
}

}  // namespace moeforge::data
