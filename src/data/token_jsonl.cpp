#include "data/token_jsonl.h"

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "hf/fs_util.h"

namespace moeforge::data {

namespace {
std::vector<TokenId> int_list(const nlohmann::ordered_json& j, const char* field, const std::string& where) {
  MF_CHECK(j.is_array(), where, ": field '", field, "' must be a list of integers");
  std::vector<TokenId> v;
  v.reserve(j.size());
  for (const auto& x : j) {
    MF_CHECK(x.is_number_integer(), where, ": field '", field, "' must be a list of integers, found ", x.dump());
    const bool fits = x.is_number_unsigned() ? x.get<uint64_t>() <= static_cast<uint64_t>(INT32_MAX)
                                             : x.get<int64_t>() >= INT32_MIN && x.get<int64_t>() <= INT32_MAX;
    MF_CHECK(fits, where, ": field '", field, "' holds ", x.dump(), ", outside the range of token ids");
    v.push_back(static_cast<TokenId>(x.get<int64_t>()));
  }
  return v;
}
}  // namespace

TokenRow parse_token_line(const std::string& text, const std::string& where) {
  nlohmann::ordered_json j;
  hf::check_json_depth(text, where);
  try {
    j = nlohmann::ordered_json::parse(text);
  } catch (const nlohmann::ordered_json::exception& e) {
    MF_THROW(where, ": invalid JSON (", e.what(), ")");
  }
  return token_row_of(j, where);
}

TokenRow token_row_of(const nlohmann::ordered_json& j, const std::string& where) {
  MF_CHECK(j.is_object(), where, ": each line must be a JSON object");
  MF_CHECK(j.contains("input_ids"), where, ": missing field 'input_ids'");
  TokenRow row;
  row.input_ids = int_list(j["input_ids"], "input_ids", where);
  MF_CHECK(!row.input_ids.empty(), where, ": field 'input_ids' is empty");
  if (j.contains("labels") && !j["labels"].is_null()) {
    row.labels = int_list(j["labels"], "labels", where);
    MF_CHECK(row.labels->size() == row.input_ids.size(), where, ": field 'labels' has ", row.labels->size(),
             " entries but 'input_ids' has ", row.input_ids.size());
  }
  return row;
}

std::vector<TokenRow> read_token_jsonl(const std::string& path) {
  std::ifstream in(path);
  MF_CHECK(in.good(), path, ": cannot open (", std::strerror(errno), ")");
  std::vector<TokenRow> rows;
  std::string line;
  int64_t n = 0;
  while (std::getline(in, line)) {
    ++n;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    TokenRow r = parse_token_line(line, path + ":" + std::to_string(n));
    r.line = n;
    rows.push_back(std::move(r));
  }
  MF_CHECK(!rows.empty(), path, ": no rows");
  return rows;
}

}  // namespace moeforge::data
