#include "data/parquet_thrift.h"

#include "core/error.h"

namespace moeforge::data::parquet {

namespace {
// Deeper than any Parquet structure (a page header is three levels): bounds a hostile nesting.
constexpr int kMaxDepth = 32;
int64_t unzigzag(uint64_t v) { return static_cast<int64_t>(v >> 1) ^ -static_cast<int64_t>(v & 1); }
}  // namespace

ThriftReader::ThriftReader(const uint8_t* data, size_t size, std::string what)
    : data_(data), size_(size), what_(std::move(what)) {}

void ThriftReader::fail(const std::string& why) const { MF_THROW(what_, ": ", why, " (at byte ", pos_, ")"); }

uint8_t ThriftReader::byte() {
  if (pos_ >= size_) fail("ends inside its Thrift metadata");
  return data_[pos_++];
}

uint64_t ThriftReader::varint() {
  uint64_t v = 0;
  for (int shift = 0; shift < 64; shift += 7) {
    const uint8_t b = byte();
    v |= static_cast<uint64_t>(b & 0x7f) << shift;
    if (!(b & 0x80)) return v;
  }
  fail("a Thrift varint longer than 10 bytes");
}

void ThriftReader::begin_struct() {
  if (last_ids_.size() >= static_cast<size_t>(kMaxDepth)) fail("Thrift structs nested deeper than 32");
  last_ids_.push_back(0);
}

void ThriftReader::end_struct() { last_ids_.pop_back(); }

bool ThriftReader::next_field(int16_t& id, ThriftType& type) {
  const uint8_t h = byte();
  if (h == 0) return false;
  type = static_cast<ThriftType>(h & 0x0f);
  if (static_cast<uint8_t>(type) > 12) fail("unknown Thrift type " + std::to_string(h & 0x0f));
  const int delta = h >> 4;
  const int64_t next = delta ? last_ids_.back() + delta : unzigzag(varint());
  if (next < -32768 || next > 32767) fail("a Thrift field id out of range");
  id = static_cast<int16_t>(next);
  last_ids_.back() = id;
  return true;
}

int32_t ThriftReader::read_i32() {
  const int64_t v = unzigzag(varint());
  if (v < INT32_MIN || v > INT32_MAX) fail("a 32-bit Thrift integer out of range");
  return static_cast<int32_t>(v);
}

int64_t ThriftReader::read_i64() { return unzigzag(varint()); }

bool ThriftReader::read_bool(ThriftType field_type) {
  if (field_type == ThriftType::True) return true;
  if (field_type == ThriftType::False) return false;
  fail("a Thrift bool field of another type");
}

std::string ThriftReader::read_binary() {
  const uint64_t n = varint();
  if (n > size_ - pos_) fail("a Thrift string of " + std::to_string(n) + " bytes runs past the end");
  std::string s(reinterpret_cast<const char*>(data_ + pos_), static_cast<size_t>(n));
  pos_ += static_cast<size_t>(n);
  return s;
}

size_t ThriftReader::read_list_header(ThriftType& element) {
  const uint8_t h = byte();
  element = static_cast<ThriftType>(h & 0x0f);
  uint64_t n = h >> 4;
  if (n == 15) n = varint();
  // Every element takes at least one byte, except bools... which also take one in a list.
  if (n > size_ - pos_) fail("a Thrift list of " + std::to_string(n) + " elements is longer than what is left");
  return static_cast<size_t>(n);
}

void ThriftReader::skip(ThriftType type) { skip_value(type, static_cast<int>(last_ids_.size())); }

void ThriftReader::skip_value(ThriftType type, int depth) {
  if (depth > kMaxDepth) fail("Thrift values nested deeper than 32");
  switch (type) {
    case ThriftType::True:
    case ThriftType::False: return;  // the value is the field's type code
    case ThriftType::Byte: byte(); return;
    case ThriftType::I16:
    case ThriftType::I32:
    case ThriftType::I64: varint(); return;
    case ThriftType::Double:
      if (size_ - pos_ < 8) fail("ends inside a Thrift double");
      pos_ += 8;
      return;
    case ThriftType::Binary: read_binary(); return;
    case ThriftType::List:
    case ThriftType::Set: {
      ThriftType e;
      const size_t n = read_list_header(e);
      for (size_t i = 0; i < n; ++i) {
        if (e == ThriftType::True || e == ThriftType::False) byte();  // a list's bools are a byte each
        else skip_value(e, depth + 1);
      }
      return;
    }
    case ThriftType::Map: {
      const uint64_t n = varint();
      if (n == 0) return;
      if (n > size_ - pos_) fail("a Thrift map longer than what is left");
      const uint8_t kv = byte();
      const auto element = [&](ThriftType t) {  // inside a container, a bool is a byte of its own
        if (t == ThriftType::True || t == ThriftType::False) byte();
        else skip_value(t, depth + 1);
      };
      for (uint64_t i = 0; i < n; ++i) {
        element(static_cast<ThriftType>(kv >> 4));
        element(static_cast<ThriftType>(kv & 0x0f));
      }
      return;
    }
    case ThriftType::Struct: {
      if (last_ids_.size() >= static_cast<size_t>(kMaxDepth)) fail("Thrift structs nested deeper than 32");
      begin_struct();
      int16_t id;
      ThriftType t;
      while (next_field(id, t)) skip_value(t, depth + 1);
      end_struct();
      return;
    }
    default: fail("unknown Thrift type " + std::to_string(static_cast<int>(type)));
  }
}

void ThriftReader::wrong_type(int16_t id, const char* in_struct, const char* expected) const {
  fail("field " + std::to_string(id) + " of " + in_struct + " is not " + expected);
}

}  // namespace moeforge::data::parquet
