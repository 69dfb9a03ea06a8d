#include "data/flatbuffer_view.h"

#include "core/error.h"
#include "data/file_bytes.h"

namespace moeforge::data::flatbuf {

namespace {

// Arrow's schemas nest a table per field level; far deeper than any dataset's types.
constexpr int kMaxDepth = 96;

}  // namespace

Table::Table(const uint8_t* data, size_t size, size_t pos, const std::string* what, int depth)
    : data_(data), size_(size), pos_(pos), what_(what), depth_(depth) {
  MF_CHECK(depth <= kMaxDepth, *what, ": metadata nested deeper than ", kMaxDepth, " tables");
  MF_CHECK(pos <= size && size - pos >= 4, *what, ": a metadata table outside its buffer");
  const int64_t vt = static_cast<int64_t>(pos) - read_le<int32_t>(data + pos);
  MF_CHECK(vt >= 0 && static_cast<size_t>(vt) <= size && size - static_cast<size_t>(vt) >= 4, *what,
           ": a metadata table's vtable lies outside its buffer");
  vtable_ = static_cast<size_t>(vt);
  vtable_size_ = read_le<uint16_t>(data + vtable_);
  table_size_ = read_le<uint16_t>(data + vtable_ + 2);
  MF_CHECK(vtable_size_ >= 4 && vtable_size_ % 2 == 0 && vtable_size_ <= size - vtable_, *what,
           ": a metadata vtable runs past its buffer");
  MF_CHECK(table_size_ >= 4 && table_size_ <= size - pos, *what, ": a metadata table runs past its buffer");
}

Table Table::root(const uint8_t* data, size_t size, const std::string& what) {
  MF_CHECK(size >= 8, what, ": metadata of ", size, " bytes is too short");
  return Table(data, size, read_le<uint32_t>(data), &what, 0);
}

uint16_t Table::field_offset(int field) const {
  const size_t slot = 4 + 2 * static_cast<size_t>(field);
  if (field < 0 || slot + 2 > vtable_size_) return 0;
  return read_le<uint16_t>(data_ + vtable_ + slot);
}

size_t Table::field_pos(int field, size_t width) const {
  const uint16_t off = field_offset(field);
  MF_CHECK(off + width <= table_size_, *what_, ": a metadata field runs past its table");
  return pos_ + off;
}

int64_t Table::i64(int field, int64_t fallback) const {
  return present(field) ? read_le<int64_t>(data_ + field_pos(field, 8)) : fallback;
}
int32_t Table::i32(int field, int32_t fallback) const {
  return present(field) ? read_le<int32_t>(data_ + field_pos(field, 4)) : fallback;
}
int16_t Table::i16(int field, int16_t fallback) const {
  return present(field) ? read_le<int16_t>(data_ + field_pos(field, 2)) : fallback;
}
uint8_t Table::u8(int field, uint8_t fallback) const { return present(field) ? data_[field_pos(field, 1)] : fallback; }

Table Table::table_from(size_t offset_pos) const {
  const size_t target = offset_pos + read_le<uint32_t>(data_ + offset_pos);
  MF_CHECK(target >= offset_pos && target < size_, *what_, ": a metadata offset points outside its buffer");
  return Table(data_, size_, target, what_, depth_ + 1);
}

Table Table::table(int field) const {
  MF_CHECK(present(field), *what_, ": a required metadata table is missing");
  return table_from(field_pos(field, 4));
}

Table::Vector Table::vector(int field, size_t element_size) const {
  if (!present(field)) return {};
  const size_t at = field_pos(field, 4);
  const size_t start = at + read_le<uint32_t>(data_ + at);
  MF_CHECK(start >= at && start <= size_ && size_ - start >= 4, *what_, ": a metadata vector lies outside its buffer");
  const uint32_t n = read_le<uint32_t>(data_ + start);
  MF_CHECK(element_size == 0 || n <= (size_ - start - 4) / element_size, *what_,
           ": a metadata vector of ", n, " elements runs past its buffer");
  return {data_ + start + 4, n};
}

std::string_view Table::string(int field) const {
  const Vector v = vector(field, 1);
  return {reinterpret_cast<const char*>(v.data), v.length};
}

Table Table::table_at(const Vector& v, uint32_t i) const {
  MF_CHECK(i < v.length, *what_, ": metadata vector index ", i, " of ", v.length);
  return table_from(static_cast<size_t>(v.data - data_) + 4 * static_cast<size_t>(i));
}

}  // namespace moeforge::data::flatbuf
