// Pre-tokenized jsonl: one {"input_ids": [...], "labels": [...]?} object per line. Blank lines are
// skipped; anything else malformed is an error naming file:line and the field.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace moeforge::data {

// A token id as a dataset holds it: 32 bits (every vocabulary is far smaller), so that a loaded
// dataset takes 4 bytes per token, or 8 with labels of its own, instead of 16.
using TokenId = int32_t;

struct TokenRow {
  int64_t line = 0;  // 1-based line number in the file (a Parquet or Arrow file: its row, from 1)
  int32_t file = 0;  // which of a dataset's files (data::Dataset::files) it came from
  std::vector<TokenId> input_ids;
  std::optional<std::vector<TokenId>> labels;  // unset: every token is trained (labels = input_ids)
};

std::vector<TokenRow> read_token_jsonl(const std::string& path);
// Parses one line (for tests and streaming readers); `where` is "file:line".
TokenRow parse_token_line(const std::string& text, const std::string& where);
// The same from a parsed object (a Parquet row, say).
TokenRow token_row_of(const nlohmann::ordered_json& j, const std::string& where);

}  // namespace moeforge::data
