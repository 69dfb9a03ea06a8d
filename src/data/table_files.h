// The columnar files a dataset (or a prompts file) may be: Parquet (.parquet: a hub dataset's
// shards) and Arrow IPC (.arrow: what `datasets` writes with save_to_disk and keeps in its cache;
// .feather: the IPC file format), read row by row as the JSON objects a jsonl line would hold.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace moeforge::data {

bool is_table_file(const std::string& path);
// A row of a dataset file as errors name it: "file:line", or "file: row N" for Parquet and Arrow.
std::string where_in_file(const std::string& file, int64_t line);
// fn(row, object) for every row in order (row counted from 0), the object holding those of
// `fields` that the file has and that are not null in that row.
void for_each_table_row(const std::string& path, const std::vector<std::string>& fields,
                        const std::function<void(int64_t, nlohmann::ordered_json&&)>& fn);

}  // namespace moeforge::data
