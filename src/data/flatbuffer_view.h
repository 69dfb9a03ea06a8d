// Reading FlatBuffers (the encoding of Arrow's IPC metadata) in place, every access bounds-checked:
// a table is a signed offset to its vtable followed by its fields; the vtable lists each field's
// position in the table (0: absent, the schema's default applies); strings, vectors and sub-tables
// are reached through unsigned 32-bit offsets relative to where the offset is stored. A malformed
// buffer (an offset or length outside it, a vtable running past it, nesting deeper than a limit)
// is an error naming `what`, never a read outside the bytes.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace moeforge::data::flatbuf {

class Table {
 public:
  // The root table of a buffer.
  static Table root(const uint8_t* data, size_t size, const std::string& what);

  bool present(int field) const { return field_offset(field) != 0; }
  // Scalars (little-endian); `fallback` when the field is absent.
  int64_t i64(int field, int64_t fallback = 0) const;
  int32_t i32(int field, int32_t fallback = 0) const;
  int16_t i16(int field, int16_t fallback = 0) const;
  uint8_t u8(int field, uint8_t fallback = 0) const;
  bool boolean(int field, bool fallback = false) const { return u8(field, fallback ? 1 : 0) != 0; }
  std::string_view string(int field) const;  // "" when absent
  Table table(int field) const;              // the field must be present
  // A vector: its length and where its elements start (each element `element_size` bytes, all
  // within the buffer). Absent: length 0.
  struct Vector {
    const uint8_t* data = nullptr;
    uint32_t length = 0;
  };
  Vector vector(int field, size_t element_size) const;
  // Element i of a vector of tables.
  Table table_at(const Vector& v, uint32_t i) const;

  const std::string& what() const { return *what_; }

 private:
  Table(const uint8_t* data, size_t size, size_t pos, const std::string* what, int depth);
  uint16_t field_offset(int field) const;
  size_t field_pos(int field, size_t width) const;  // where a present field of `width` bytes lies
  Table table_from(size_t offset_pos) const;        // the table an offset stored at offset_pos points to

  const uint8_t* data_ = nullptr;
  size_t size_ = 0, pos_ = 0, vtable_ = 0;
  uint16_t vtable_size_ = 0, table_size_ = 0;
  const std::string* what_ = nullptr;
  int depth_ = 0;
};

}  // namespace moeforge::data::flatbuf
