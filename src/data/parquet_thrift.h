// Thrift's compact protocol, read-only, as Parquet writes its footer and page headers. Every read
// is bounded by the buffer and nesting by a fixed depth: a malformed or hostile file is one error
// naming the file and what was being read, never a read past the end.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace moeforge::data::parquet {

// The compact protocol's type codes (as they appear in field headers and list headers).
enum class ThriftType : uint8_t {
  Stop = 0, True = 1, False = 2, Byte = 3, I16 = 4, I32 = 5, I64 = 6, Double = 7, Binary = 8,
  List = 9, Set = 10, Map = 11, Struct = 12,
};

class ThriftReader {
 public:
  // `what` names the buffer in errors ("data.parquet: footer").
  ThriftReader(const uint8_t* data, size_t size, std::string what);
  size_t position() const { return pos_; }

  // Structs: begin, then next_field until it returns false (the struct's stop byte), then end.
  void begin_struct();
  bool next_field(int16_t& id, ThriftType& type);
  void end_struct();

  int32_t read_i32();
  int64_t read_i64();
  bool read_bool(ThriftType field_type);  // a field's bool lives in its type code
  std::string read_binary();
  // A list's (or set's) element type and length; the elements follow.
  size_t read_list_header(ThriftType& element);
  // Skips one value of `type` (unknown fields).
  void skip(ThriftType type);
  // Raises "<what>: field <id> of <in_struct> has type <type>, expected <expected>".
  [[noreturn]] void wrong_type(int16_t id, const char* in_struct, const char* expected) const;
  [[noreturn]] void fail(const std::string& why) const;

 private:
  uint8_t byte();
  uint64_t varint();
  void skip_value(ThriftType type, int depth);
  const uint8_t* data_;
  size_t size_, pos_ = 0;
  std::string what_;
  std::vector<int16_t> last_ids_;  // per open struct: the previous field id (ids are delta-coded)
};

}  // namespace moeforge::data::parquet
