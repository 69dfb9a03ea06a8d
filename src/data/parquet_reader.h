// Reading a Parquet file's rows as JSON objects, for datasets (data/dataset.h): the footer, the
// schema (nested groups, LIST and MAP annotations in their three- and two-level forms), every
// page kind (dictionary, data v1 and v2), the codecs of data/parquet_codecs.h and the encodings of
// data/parquet_values.h, and the records assembled from their repetition and definition levels
// (Dremel's scheme), so that a row reads as the JSON a jsonl line would hold: a string column is a
// string, a list<int64> a list, a list<struct<role, content>> a list of objects.
//
// Only the top-level fields asked for are decoded (a dataset's other columns may have types this
// reader does not know). Sizes and counts are checked against the file before anything is
// allocated for them; every error names the file, and the column and row group where there is one.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "data/file_bytes.h"
#include "data/parquet_format.h"
#include "data/parquet_values.h"

namespace moeforge::data::parquet {

class ParquetFile {
 public:
  static ParquetFile open(const std::string& path);
  // The same from bytes in memory (`name` stands for the file in errors): tests and the fuzzer.
  static ParquetFile from_bytes(std::string bytes, const std::string& name);

  int64_t num_rows() const { return meta_.num_rows; }
  std::vector<std::string> top_level_fields() const;
  // Calls fn(row, object) for every row in order (row counted from 0), the object holding those of
  // `fields` that the file has and that are not null in that row.
  void for_each_row(const std::vector<std::string>& fields, const std::function<void(int64_t, Json&&)>& fn) const;

  struct Node {
    const SchemaElement* element = nullptr;
    std::vector<int> children;
    int def_level = 0, rep_level = 0;  // of this node, counted from the root
    int leaf = -1;                     // column index for leaves
  };

 private:
  ParquetFile() = default;
  void read_footer();
  void build_schema();

  FileBytes file_;
  FileMetaData meta_;
  std::vector<Node> nodes_;       // nodes_[0] is the root
  std::vector<std::vector<int>> leaf_paths_;  // per column: node indices from its top-level field down
};

}  // namespace moeforge::data::parquet
