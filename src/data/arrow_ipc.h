// Reading an Arrow IPC file's rows as JSON objects, for datasets (data/dataset.h): the files that
// Hugging Face `datasets` writes with `save_to_disk` and keeps in its cache (the IPC *stream*
// format: a schema message, then record batches, each a FlatBuffers header and a body of buffers),
// and the IPC *file* format (Feather v2: "ARROW1", the same messages, a footer indexing them).
// A row reads as the JSON a jsonl line would hold, as pyarrow's to_pylist gives it: strings,
// numbers, booleans, lists, structs as objects, maps as [key, value] pairs, nulls inside values as
// null (a top-level null is an absent field).
//
// Only the top-level fields asked for are decoded; the others only have their buffers counted, so
// any type may sit beside them. Dictionary-encoded columns (their values from the dictionary
// batches: replacements and deltas, in either format) and string/binary views (inline or in the
// batch's variadic buffers, as polars writes text) are read as their values. Buffers compressed
// with LZ4_FRAME or ZSTD are read. Every length,
// offset and count is checked against the bytes it points into before it is used; every error names
// the file, and the column and record batch where there is one.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "data/file_bytes.h"
#include "data/flatbuffer_view.h"

namespace moeforge::data::arrow {

using Json = nlohmann::ordered_json;

// A field of the schema: its name, its type (the tag of Arrow's Type union and the parameters a
// reader needs) and its children.
struct Field {
  std::string name;
  uint8_t type = 0;
  int bit_width = 0;        // Int
  bool is_signed = false;   // Int
  int precision = 0;        // FloatingPoint: 0 half, 1 single, 2 double
  int32_t fixed_size = 0;   // FixedSizeList's list size, FixedSizeBinary's byte width
  int16_t union_mode = 0;   // Union: 0 sparse, 1 dense
  bool dictionary = false;  // dictionary-encoded (the values travel in dictionary batches)
  int64_t dictionary_id = 0;
  int index_width = 32;     // the dictionary indices' integer type
  bool index_signed = true;
  std::vector<Field> children;
};

class ArrowFile {
 public:
  static ArrowFile open(const std::string& path);
  // The same from bytes in memory (`name` stands for the file in errors): tests and the fuzzer.
  static ArrowFile from_bytes(std::string bytes, const std::string& name);

  int64_t num_rows() const { return rows_; }
  std::vector<std::string> top_level_fields() const;
  // Calls fn(row, object) for every row in order (row counted from 0), the object holding those of
  // `fields` that the file has and that are not null in that row.
  void for_each_row(const std::vector<std::string>& fields, const std::function<void(int64_t, Json&&)>& fn) const;

  // Where a record batch's message lies: its metadata (FlatBuffers) and its body.
  struct Batch {
    int64_t metadata_at = 0, metadata_size = 0, body_at = 0, body_size = 0;
  };
  // A dictionary batch: the values of the dictionary `id` (replacing the ones before, or appended
  // to them when a delta), in effect from record batch `from_batch` on (the stream format may
  // replace a dictionary between record batches; the file format's apply to all).
  struct DictionaryMessage {
    Batch at;
    int64_t id = 0;
    bool delta = false;
    size_t from_batch = 0;
  };

 private:
  ArrowFile() = default;
  void index();  // reads the schema and finds the record batches
  void read_schema(const flatbuf::Table& schema, int16_t version, const std::string& what);
  void add_batch(const Batch& m, const flatbuf::Table& message);  // a record batch's message, parsed
  void add_dictionary(const Batch& m, const flatbuf::Table& message, size_t from_batch);
  std::string message_name(int64_t at) const;                        // "FILE: message at byte N", for errors
  // The message at `at`: its metadata's position and size (and bytes, in `meta`), its body's
  // position and size; false at the end of the stream.
  bool message_at(int64_t at, Batch& m, std::vector<uint8_t>& meta) const;

  FileBytes file_;
  int16_t version_ = 0;  // the metadata version (V4 = 3, V5 = 4)
  std::vector<Field> fields_;
  std::vector<Batch> batches_;
  std::vector<DictionaryMessage> dictionaries_;
  int64_t rows_ = 0;
};

}  // namespace moeforge::data::arrow
