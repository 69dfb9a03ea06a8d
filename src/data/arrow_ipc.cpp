#include "data/arrow_ipc.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <set>

#include "core/error.h"
#include "data/flatbuffer_view.h"
#include "data/parquet_codecs.h"

namespace moeforge::data::arrow {

namespace {

// The tags of Arrow's Type union (format/Schema.fbs).
enum TypeTag : uint8_t {
  kNull = 1, kInt, kFloatingPoint, kBinary, kUtf8, kBool, kDecimal, kDate, kTime, kTimestamp, kInterval, kList,
  kStruct, kUnion, kFixedSizeBinary, kFixedSizeList, kMap, kDuration, kLargeBinary, kLargeUtf8, kLargeList,
  kRunEndEncoded, kBinaryView, kUtf8View, kListView, kLargeListView
};
// The MessageHeader union's tags, and metadata versions.
constexpr uint8_t kSchemaMessage = 1, kDictionaryBatch = 2, kRecordBatch = 3;
constexpr int16_t kV4 = 3, kV5 = 4;
constexpr int kMaxFieldDepth = 48;
constexpr int64_t kMaxMetadata = int64_t{1} << 26;  // far above any schema or batch header
constexpr int64_t kMaxBuffer = int64_t{1} << 34;    // a decompressed buffer (16 GiB)
constexpr int64_t kMaxValues = int64_t{1} << 40;    // values of one column in one batch
// Values one row may expand to (null and empty-struct children take no bytes, so their counts are
// not bounded by the file's size).
constexpr int64_t kMaxRowValues = int64_t{1} << 24;

const char* type_name(uint8_t t) {
  static const char* names[] = {"NONE", "null", "int", "floating point", "binary", "utf8", "bool", "decimal",
                                "date", "time", "timestamp", "interval", "list", "struct", "union",
                                "fixed-size binary", "fixed-size list", "map", "duration", "large binary",
                                "large utf8", "large list", "run-end encoded", "binary view", "utf8 view",
                                "list view", "large list view"};
  return t < sizeof(names) / sizeof(names[0]) ? names[t] : "unknown";
}


Field read_field(const flatbuf::Table& t, int depth) {
  MF_CHECK(depth <= kMaxFieldDepth, t.what(), ": the schema nests deeper than ", kMaxFieldDepth, " levels");
  Field f;
  f.name = std::string(t.string(0));
  f.type = t.u8(2);
  if (t.present(3)) {
    const flatbuf::Table type = t.table(3);
    switch (f.type) {
      case kInt:
        f.bit_width = type.i32(0);
        f.is_signed = type.boolean(1);
        break;
      case kFloatingPoint: f.precision = type.i16(0); break;
      case kFixedSizeList:
      case kFixedSizeBinary: f.fixed_size = type.i32(0); break;
      case kUnion: f.union_mode = type.i16(0); break;
      default: break;
    }
  }
  // An integer's width sizes every read of its values: it must be one the format has (a type table
  // missing from the field leaves it 0).
  MF_CHECK(f.type != kInt || f.bit_width == 8 || f.bit_width == 16 || f.bit_width == 32 || f.bit_width == 64, t.what(),
           ": field '", f.name, "' is an integer of ", f.bit_width, " bits");
  if (t.present(4)) {  // DictionaryEncoding: id, the indices' Int type (default int32), ordered, kind
    const flatbuf::Table enc = t.table(4);
    f.dictionary = true;
    f.dictionary_id = enc.i64(0);
    if (enc.present(1)) {
      const flatbuf::Table index = enc.table(1);
      f.index_width = index.i32(0);
      f.index_signed = index.boolean(1);
    }
    MF_CHECK(f.index_width == 8 || f.index_width == 16 || f.index_width == 32 || f.index_width == 64, t.what(),
             ": field '", f.name, "' has dictionary indices of ", f.index_width, " bits");
  }
  const auto children = t.vector(5, 4);
  for (uint32_t i = 0; i < children.length; ++i) f.children.push_back(read_field(t.table_at(children, i), depth + 1));
  return f;
}

// One record batch's nodes and buffers, walked in the schema's pre-order; buffers are taken from
// the body (decompressed when the batch says so) only for the fields being read.
class BatchReader {
 public:
  BatchReader(const flatbuf::Table& batch, const std::vector<uint8_t>& body, int16_t version, std::string where)
      : body_(body), version_(version), where_(std::move(where)) {
    length_ = batch.i64(0);
    nodes_ = batch.vector(1, 16);
    buffers_ = batch.vector(2, 16);
    if (batch.present(3)) {
      codec_ = batch.table(3).u8(0);  // LZ4_FRAME (0) or ZSTD (1); method 0: each buffer on its own
      MF_CHECK(codec_ <= 1 && batch.table(3).u8(1) == 0, where_, ": compressed with an unknown codec (", int(codec_), ")");
      compressed_ = true;
    }
    variadic_ = batch.vector(4, 8);
    MF_CHECK(length_ >= 0, where_, ": a record batch of ", length_, " rows");
  }
  int64_t length() const { return length_; }

  struct Node {
    int64_t length = 0, null_count = 0;
  };
  Node next_node(const std::string& column) {
    MF_CHECK(node_ < nodes_.length, where_, ": column '", column, "' has no field node left in the batch");
    const uint8_t* p = nodes_.data + 16 * static_cast<size_t>(node_++);
    Node n{read_le<int64_t>(p), read_le<int64_t>(p + 8)};
    MF_CHECK(n.length >= 0 && n.length <= kMaxValues && n.null_count >= 0 && n.null_count <= n.length, where_, ": column '", column,
             "' has a field node of ", n.length, " values with ", n.null_count, " nulls");
    return n;
  }
  // The next buffer's bytes (decompressed); `read` false: only counted.
  std::vector<uint8_t> next_buffer(const std::string& column, bool read) {
    MF_CHECK(buffer_ < buffers_.length, where_, ": column '", column, "' has no buffer left in the batch");
    const uint8_t* p = buffers_.data + 16 * static_cast<size_t>(buffer_++);
    const int64_t off = read_le<int64_t>(p), len = read_le<int64_t>(p + 8);
    const auto size = static_cast<int64_t>(body_.size());
    MF_CHECK(off >= 0 && len >= 0 && off <= size && len <= size - off, where_, ": column '", column, "' has a buffer (",
             off, " + ", len, " bytes) outside the batch's body of ", size, " bytes");
    if (!read) return {};
    const uint8_t* data = body_.data() + off;
    if (!compressed_ || len == 0) return std::vector<uint8_t>(data, data + len);
    MF_CHECK(len >= 8, where_, ": column '", column, "' has a compressed buffer of ", len, " bytes");
    const int64_t raw = read_le<int64_t>(data);
    if (raw == -1) return std::vector<uint8_t>(data + 8, data + len);  // left uncompressed by the writer
    // At most each codec's expansion (LZ4's ~255x, ZSTD's far larger for runs) with room to spare.
    const int64_t most = std::min(kMaxBuffer, (len - 8) * (codec_ == 0 ? 256 : 32768));
    MF_CHECK(raw >= 0 && raw <= most, where_, ": column '", column, "' claims a buffer of ", raw, " bytes from ", len - 8,
             " compressed");
    const std::string what = where_ + ": column '" + column + "'";
    return codec_ == 0 ? parquet::lz4_frame_decompress(data + 8, static_cast<size_t>(len - 8), static_cast<size_t>(raw), what)
                       : parquet::decompress(parquet::Codec::Zstd, data + 8, static_cast<size_t>(len - 8),
                                             static_cast<size_t>(raw), what);
  }
  int64_t next_variadic(const std::string& column) {
    MF_CHECK(variadic_index_ < variadic_.length, where_, ": column '", column, "' has no variadic buffer count");
    const int64_t n = read_le<int64_t>(variadic_.data + 8 * static_cast<size_t>(variadic_index_++));
    MF_CHECK(n >= 0 && n <= static_cast<int64_t>(buffers_.length), where_, ": column '", column, "' claims ", n,
             " variadic buffers");
    return n;
  }
  int16_t version() const { return version_; }
  const std::string& where() const { return where_; }

 private:
  const std::vector<uint8_t>& body_;
  int16_t version_;
  std::string where_;
  int64_t length_ = 0;
  flatbuf::Table::Vector nodes_, buffers_, variadic_;
  uint32_t node_ = 0, buffer_ = 0, variadic_index_ = 0;
  bool compressed_ = false;
  uint8_t codec_ = 0;
};

struct Column;
// The values of each dictionary in effect, by id: one column per dictionary batch (a replacement
// starts a new list, a delta appends), an index counting through them in order.
using Dictionaries = std::map<int64_t, std::vector<Column>>;

// A column of one batch, its buffers read, ready to give row i as JSON.
struct Column {
  const Field* field = nullptr;
  std::string path;  // a.b.c, for errors
  BatchReader::Node node;
  std::vector<uint8_t> validity, offsets, data;     // views: data holds the 16-byte views
  std::vector<std::vector<uint8_t>> variadic;       // views: the buffers long values point into
  const std::vector<Column>* dictionary = nullptr;  // dictionary-encoded: data holds the indices
  std::vector<Column> children;

  bool valid(int64_t i) const {
    if (validity.empty()) return true;
    return (validity[static_cast<size_t>(i >> 3)] >> (i & 7)) & 1;
  }
};

// Skips a field's nodes and buffers (a column not asked for): the counts per type of the format's
// buffer layout.
void skip_field(const Field& f, BatchReader& r) {
  r.next_node(f.name);
  const auto buffers = [&](int n) {
    for (int i = 0; i < n; ++i) r.next_buffer(f.name, false);
  };
  if (f.dictionary) {  // the indices: validity and values; the values come in dictionary batches
    buffers(2);
    return;
  }
  const bool pre_v5_union_validity = r.version() < kV5;
  switch (f.type) {
    case kNull: return;
    case kInt: case kFloatingPoint: case kBool: case kDecimal: case kDate: case kTime: case kTimestamp: case kInterval:
    case kFixedSizeBinary: case kDuration: buffers(2); return;
    case kBinary: case kUtf8: case kLargeBinary: case kLargeUtf8: buffers(3); return;
    case kBinaryView: case kUtf8View: {
      buffers(2);
      const int64_t n = r.next_variadic(f.name);
      for (int64_t i = 0; i < n; ++i) r.next_buffer(f.name, false);
      return;
    }
    case kList: case kLargeList: case kMap: buffers(2); break;
    case kListView: case kLargeListView: buffers(3); break;
    case kFixedSizeList: case kStruct: buffers(1); break;
    case kUnion: buffers((f.union_mode == 1 ? 2 : 1) + (pre_v5_union_validity ? 1 : 0)); break;
    case kRunEndEncoded: break;
    default: MF_THROW(r.where(), ": column '", f.name, "' has a type this reader does not know (tag ", int(f.type), ")");
  }
  for (const Field& c : f.children) skip_field(c, r);
}

// Reads a field's buffers for decoding, checking each against the values it must hold. A
// dictionary-encoded field reads its indices and finds its values in `dicts`; `as_values`: the
// field's own type (a dictionary batch's column).
Column read_column(const Field& f, const std::string& path, BatchReader& r, const Dictionaries& dicts,
                   bool as_values = false) {
  Column c;
  c.field = &f;
  c.path = path;
  c.node = r.next_node(path);
  const int64_t n = c.node.length;
  const std::string& where = r.where();
  const auto take_validity = [&] {
    c.validity = r.next_buffer(path, true);
    if (c.validity.empty())
      MF_CHECK(c.node.null_count == 0, where, ": column '", path, "' has ", c.node.null_count, " nulls but no validity bitmap");
    else
      MF_CHECK(static_cast<int64_t>(c.validity.size()) >= (n + 7) / 8, where, ": column '", path,
               "' has a validity bitmap too short for ", n, " values");
  };
  const auto take_offsets = [&](int width) {
    c.offsets = r.next_buffer(path, true);
    if (n == 0 && c.offsets.empty()) return;
    MF_CHECK(static_cast<int64_t>(c.offsets.size()) >= (n + 1) * width, where, ": column '", path,
             "' has an offsets buffer too short for ", n, " values");
  };
  if (f.dictionary && !as_values) {
    take_validity();
    c.data = r.next_buffer(path, true);
    MF_CHECK(static_cast<int64_t>(c.data.size()) >= n * (f.index_width / 8), where, ": column '", path,
             "' has a dictionary index buffer too short for ", n, " values");
    const auto d = dicts.find(f.dictionary_id);
    MF_CHECK(d != dicts.end(), where, ": column '", path, "' is dictionary-encoded, but no dictionary batch (id ",
             f.dictionary_id, ") comes before this record batch");
    c.dictionary = &d->second;
    return c;
  }
  switch (f.type) {
    case kNull: break;
    case kInt:
    case kFloatingPoint:
    case kBool: {
      take_validity();
      c.data = r.next_buffer(path, true);
      const int bits = f.type == kInt ? f.bit_width : f.type == kBool ? 1 : (f.precision == 0 ? 16 : f.precision == 1 ? 32 : 64);
      MF_CHECK(f.type != kFloatingPoint || (f.precision >= 0 && f.precision <= 2), where, ": column '", path,
               "' has an unknown floating-point precision ", f.precision);
      MF_CHECK(static_cast<int64_t>(c.data.size()) >= (n * bits + 7) / 8, where, ": column '", path,
               "' has a values buffer too short for ", n, " values");
      break;
    }
    case kBinary:
    case kUtf8:
    case kLargeBinary:
    case kLargeUtf8:
      take_validity();
      take_offsets(f.type == kLargeBinary || f.type == kLargeUtf8 ? 8 : 4);
      c.data = r.next_buffer(path, true);
      break;
    case kBinaryView:
    case kUtf8View: {
      take_validity();
      c.data = r.next_buffer(path, true);
      MF_CHECK(static_cast<int64_t>(c.data.size()) >= 16 * n, where, ": column '", path,
               "' has a views buffer too short for ", n, " values");
      const int64_t k = r.next_variadic(path);
      for (int64_t i = 0; i < k; ++i) c.variadic.push_back(r.next_buffer(path, true));
      break;
    }
    case kList:
    case kLargeList:
    case kMap:
      take_validity();
      take_offsets(f.type == kLargeList ? 8 : 4);
      MF_CHECK(f.children.size() == 1, where, ": column '", path, "' (a ", type_name(f.type), ") has ",
               f.children.size(), " child fields");
      MF_CHECK(f.type != kMap || (f.children[0].type == kStruct && f.children[0].children.size() == 2), where,
               ": column '", path, "' is a map whose entries are not (key, value) structs");
      c.children.push_back(read_column(f.children[0], path + "." + f.children[0].name, r, dicts));
      break;
    case kFixedSizeList:
      take_validity();
      MF_CHECK(f.children.size() == 1 && f.fixed_size >= 0, where, ": column '", path, "' is a malformed fixed-size list");
      c.children.push_back(read_column(f.children[0], path + "." + f.children[0].name, r, dicts));
      MF_CHECK(c.children[0].node.length / std::max<int64_t>(1, f.fixed_size) >= n || f.fixed_size == 0, where,
               ": column '", path, "' holds fewer values than its ", n, " lists of ", f.fixed_size);
      break;
    case kStruct:
      take_validity();
      for (const Field& ch : f.children) {
        c.children.push_back(read_column(ch, path + "." + ch.name, r, dicts));
        MF_CHECK(c.children.back().node.length >= n, where, ": column '", path + "." + ch.name, "' has ",
                 c.children.back().node.length, " values for ", n, " structs");
      }
      break;
    default:
      MF_THROW(where, ": column '", path, "' has type ", type_name(f.type),
               ", which a dataset row does not hold (text, numbers, booleans, lists, structs, maps, string views "
               "and dictionary-encoded columns of these are read)");
  }
  return c;
}

int64_t offset_at(const Column& c, int64_t i, int width) {
  return width == 8 ? read_le<int64_t>(c.offsets.data() + 8 * i) : read_le<int32_t>(c.offsets.data() + 4 * i);
}

// fn(the little-endian integer at p, as its own type): 8-64 bits, signed or not (a column's values
// and a dictionary's indices).
template <class Fn>
auto with_integer(const uint8_t* p, int bits, bool is_signed, Fn&& fn) {
  switch (bits) {
    case 8: return is_signed ? fn(static_cast<int8_t>(*p)) : fn(*p);
    case 16: return is_signed ? fn(read_le<int16_t>(p)) : fn(read_le<uint16_t>(p));
    case 32: return is_signed ? fn(read_le<int32_t>(p)) : fn(read_le<uint32_t>(p));
    default: return is_signed ? fn(read_le<int64_t>(p)) : fn(read_le<uint64_t>(p));
  }
}

float half_to_float(uint16_t h) {
  const int sign = h >> 15, exp = (h >> 10) & 31, mant = h & 1023;
  float v;
  if (exp == 0) v = std::ldexp(static_cast<float>(mant), -24);
  else if (exp == 31) v = mant ? NAN : INFINITY;
  else v = std::ldexp(static_cast<float>(mant + 1024), exp - 25);
  return sign ? -v : v;
}

// `depth`: values nest no deeper than the schema does, except through dictionaries, whose values may
// hold dictionary-encoded fields again; a file whose dictionaries refer to each other in a cycle
// would recurse without end.
Json value_of(const Column& c, int64_t i, const std::string& where, int64_t& budget, int depth = 0) {
  const Field& f = *c.field;
  MF_CHECK(--budget >= 0, where, ": a row of column '", c.path, "' holds more than ", kMaxRowValues, " values");
  MF_CHECK(depth <= 2 * kMaxFieldDepth, where, ": a value of column '", c.path, "' nests deeper than ",
           2 * kMaxFieldDepth, " levels (dictionaries that refer to each other?)");
  if (f.type == kNull || !c.valid(i)) return nullptr;
  if (c.dictionary) {
    const int64_t index = with_integer(c.data.data() + i * (f.index_width / 8), f.index_width, f.index_signed,
                                       [](auto v) { return static_cast<int64_t>(v); });
    int64_t k = index, size = 0;
    for (const Column& chunk : *c.dictionary) {
      if (k >= 0 && k < chunk.node.length) return value_of(chunk, k, where, budget, depth + 1);
      k -= chunk.node.length;
      size += chunk.node.length;
    }
    MF_THROW(where, ": column '", c.path, "' has dictionary index ", index, " outside its dictionary of ", size, " values");
  }
  const auto range = [&](int width, int64_t limit) {
    const int64_t a = offset_at(c, i, width), b = offset_at(c, i + 1, width);
    MF_CHECK(a >= 0 && a <= b && b <= limit, where, ": column '", c.path, "' has offsets ", a, "..", b,
             " outside its ", limit, " values");
    return std::pair<int64_t, int64_t>(a, b);
  };
  switch (f.type) {
    case kBool: return static_cast<bool>((c.data[static_cast<size_t>(i >> 3)] >> (i & 7)) & 1);
    case kInt:
      return with_integer(c.data.data() + i * (f.bit_width / 8), f.bit_width, f.is_signed, [](auto v) { return Json(v); });
    case kFloatingPoint:
      if (f.precision == 0) return half_to_float(read_le<uint16_t>(c.data.data() + 2 * i));
      if (f.precision == 1) return read_le<float>(c.data.data() + 4 * i);
      return read_le<double>(c.data.data() + 8 * i);
    case kBinary:
    case kUtf8:
    case kLargeBinary:
    case kLargeUtf8: {
      const auto [a, b] = range(f.type == kLargeBinary || f.type == kLargeUtf8 ? 8 : 4, static_cast<int64_t>(c.data.size()));
      return std::string(reinterpret_cast<const char*>(c.data.data() + a), static_cast<size_t>(b - a));
    }
    case kBinaryView:
    case kUtf8View: {
      // A view: its length, then up to 12 bytes inline, or a 4-byte prefix, a buffer index and an
      // offset into that variadic buffer.
      const uint8_t* v = c.data.data() + 16 * i;
      const int32_t len = read_le<int32_t>(v);
      MF_CHECK(len >= 0, where, ": column '", c.path, "' has a view of ", len, " bytes");
      if (len <= 12) return std::string(reinterpret_cast<const char*>(v + 4), static_cast<size_t>(len));
      const int32_t buf = read_le<int32_t>(v + 8), off = read_le<int32_t>(v + 12);
      MF_CHECK(buf >= 0 && static_cast<size_t>(buf) < c.variadic.size() && off >= 0 &&
                   static_cast<int64_t>(off) + len <= static_cast<int64_t>(c.variadic[static_cast<size_t>(buf)].size()),
               where, ": column '", c.path, "' has a view of ", len, " bytes at ", off, " in buffer ", buf,
               " outside its ", c.variadic.size(), " data buffers");
      return std::string(reinterpret_cast<const char*>(c.variadic[static_cast<size_t>(buf)].data() + off),
                         static_cast<size_t>(len));
    }
    case kList:
    case kLargeList:
    case kMap: {
      const Column& child = c.children[0];
      const auto [a, b] = range(f.type == kLargeList ? 8 : 4, child.node.length);
      Json out = Json::array();
      for (int64_t k = a; k < b; ++k) {
        if (f.type != kMap) {
          out.push_back(value_of(child, k, where, budget, depth + 1));
          continue;
        }
        MF_CHECK(child.valid(k), where, ": column '", c.path, "' has a null map entry");
        out.push_back(Json::array({value_of(child.children[0], k, where, budget, depth + 1), value_of(child.children[1], k, where, budget, depth + 1)}));
      }
      return out;
    }
    case kFixedSizeList: {
      Json out = Json::array();
      for (int64_t k = i * f.fixed_size; k < (i + 1) * f.fixed_size; ++k) out.push_back(value_of(c.children[0], k, where, budget, depth + 1));
      return out;
    }
    case kStruct: {
      Json out = Json::object();
      for (const Column& ch : c.children) out[ch.field->name] = value_of(ch, i, where, budget, depth + 1);
      return out;
    }
    default: MF_THROW(where, ": column '", c.path, "' has type ", type_name(f.type));
  }
}

// The field (anywhere in the schema) whose dictionary is `id`; null when none is.
const Field* dictionary_field(const std::vector<Field>& fields, int64_t id) {
  for (const Field& f : fields) {
    if (f.dictionary && f.dictionary_id == id) return &f;
    if (const Field* c = dictionary_field(f.children, id)) return c;
  }
  return nullptr;
}

// The dictionaries a field's values need: its own and those inside it (a dictionary's values may
// themselves hold dictionary-encoded fields).
void dictionaries_of(const Field& f, std::set<int64_t>& ids) {
  if (f.dictionary) ids.insert(f.dictionary_id);
  for (const Field& c : f.children) dictionaries_of(c, ids);
}

}  // namespace

ArrowFile ArrowFile::open(const std::string& path) {
  ArrowFile f;
  f.file_ = FileBytes::open(path);
  f.index();
  return f;
}

ArrowFile ArrowFile::from_bytes(std::string bytes, const std::string& name) {
  ArrowFile f;
  f.file_ = FileBytes::from_bytes(std::move(bytes), name);
  f.index();
  return f;
}

// A message: 0xFFFFFFFF, the metadata's length (4 bytes; before Arrow 0.15 the length alone), the
// metadata (a FlatBuffers Message, padded to 8 bytes), then the body. A length of 0 ends the stream.
bool ArrowFile::message_at(int64_t at, Batch& m, std::vector<uint8_t>& meta) const {
  if (at == file_.size()) return false;  // a stream may end without its end-of-stream marker
  auto word = file_.read_at(at, 4, "a message's length");
  int64_t start = at + 4;
  uint32_t len = read_le<uint32_t>(word.data());
  if (len == 0xFFFFFFFFu) {
    word = file_.read_at(start, 4, "a message's length");
    len = read_le<uint32_t>(word.data());
    start += 4;
  }
  if (len == 0) return false;
  MF_CHECK(len <= kMaxMetadata, file_.name(), ": a message at byte ", at, " claims ", len, " bytes of metadata");
  m.metadata_at = start;
  m.metadata_size = len;
  meta = file_.read_at(start, len, "a message's metadata");
  const std::string what = message_name(at);
  const auto msg = flatbuf::Table::root(meta.data(), meta.size(), what);
  m.body_size = msg.i64(3);
  m.body_at = start + len;
  MF_CHECK(m.body_size >= 0 && m.body_at <= file_.size() && m.body_size <= file_.size() - m.body_at, what, ": its body of ",
           m.body_size, " bytes runs past the file");
  return true;
}

void ArrowFile::read_schema(const flatbuf::Table& schema, int16_t version, const std::string& what) {
  MF_CHECK(version >= kV4, what, ": Arrow metadata version ", version + 1,
           " (before Arrow 0.8) is not read; rewrite the file with a current pyarrow");
  MF_CHECK(schema.i16(0) == 0, what, ": a big-endian Arrow file is not read");
  const auto fields = schema.vector(1, 4);
  for (uint32_t i = 0; i < fields.length; ++i) fields_.push_back(read_field(schema.table_at(fields, i), 0));
  version_ = version;
}

std::string ArrowFile::message_name(int64_t at) const { return file_.name() + ": message at byte " + std::to_string(at); }

void ArrowFile::add_batch(const Batch& m, const flatbuf::Table& msg) {
  const std::string& what = msg.what();
  MF_CHECK(msg.u8(1) == kRecordBatch, what, ": not a record batch");
  const int64_t rows = msg.table(2).i64(0);
  MF_CHECK(rows >= 0 && rows <= (int64_t{1} << 40) - rows_, what, ": a record batch of ", rows, " rows");
  rows_ += rows;
  batches_.push_back(m);
}

void ArrowFile::add_dictionary(const Batch& m, const flatbuf::Table& msg, size_t from_batch) {
  const std::string& what = msg.what();
  MF_CHECK(msg.u8(1) == kDictionaryBatch, what, ": not a dictionary batch");
  const flatbuf::Table header = msg.table(2);  // DictionaryBatch: id, data (a record batch), isDelta
  DictionaryMessage d;
  d.at = m;
  d.id = header.i64(0);
  d.delta = header.boolean(2);
  d.from_batch = from_batch;
  MF_CHECK(dictionary_field(fields_, d.id), what, ": a dictionary batch for id ", d.id, ", which no field of the schema uses");
  dictionaries_.push_back(d);
}

void ArrowFile::index() {
  MF_CHECK(file_.size() >= 8, file_.name(), ": not an Arrow IPC file (", file_.size(), " bytes)");
  const auto head = file_.read_at(0, 8, "its start");
  if (std::memcmp(head.data(), "ARROW1", 6) == 0) {
    // The file format: "ARROW1", padding, the stream's messages, a footer (FlatBuffers: version,
    // schema, dictionary and record batch blocks), its length (4 bytes) and "ARROW1". The footer's
    // blocks say where each record batch lies (a writer need not end the stream part with its
    // end-of-stream marker).
    MF_CHECK(file_.size() >= 18, file_.name(), ": an Arrow file of ", file_.size(), " bytes has no room for its footer");
    const auto tail = file_.read_at(file_.size() - 10, 10, "its footer's length");
    MF_CHECK(std::memcmp(tail.data() + 4, "ARROW1", 6) == 0, file_.name(), ": an Arrow file without ARROW1 at its end (cut short?)");
    const int64_t len = read_le<int32_t>(tail.data());
    MF_CHECK(len > 0 && len <= file_.size() - 18 && len <= kMaxMetadata, file_.name(), ": its footer length ", len, " does not fit the file");
    const auto bytes = file_.read_at(file_.size() - 10 - len, len, "its footer");
    const std::string what = file_.name() + ": footer";
    const auto footer = flatbuf::Table::root(bytes.data(), bytes.size(), what);
    read_schema(footer.table(1), footer.i16(0), what);
    // Blocks: offset (8), metadata length (4), padding (4), body length (8); the dictionaries'
    // (field 2) apply to every record batch (the file format has no replacements), in order.
    for (const int kind : {2, 3}) {
      const auto blocks = footer.vector(kind, 24);
      const char* name = kind == 2 ? "dictionary block " : "record batch block ";
      for (uint32_t i = 0; i < blocks.length; ++i) {
        const uint8_t* b = blocks.data + 24 * static_cast<size_t>(i);
        const int64_t offset = read_le<int64_t>(b);
        const int64_t meta = read_le<int32_t>(b + 8), body = read_le<int64_t>(b + 16);
        Batch m;
        std::vector<uint8_t> message;
        MF_CHECK(offset >= 8 && offset < file_.size() && message_at(offset, m, message), what, ": ", name, i,
                 " points at no message (byte ", offset, ")");
        MF_CHECK(m.body_at == offset + meta && m.body_size == body, what, ": ", name, i,
                 " disagrees with the message it points at");
        const std::string message_what = message_name(offset);
        const auto parsed = flatbuf::Table::root(message.data(), message.size(), message_what);
        if (kind == 2)
          add_dictionary(m, parsed, 0);
        else
          add_batch(m, parsed);
      }
    }
    return;
  }
  MF_CHECK(read_le<uint32_t>(head.data()) == 0xFFFFFFFFu || read_le<uint32_t>(head.data()) < kMaxMetadata, file_.name(),
           ": not an Arrow IPC file (neither the ARROW1 magic nor a stream message at its start)");
  // The stream format: the schema first, then dictionary and record batches, up to the
  // end-of-stream marker (or the end of the file).
  bool have_schema = false;
  Batch m;
  std::vector<uint8_t> meta;
  int64_t at = 0;
  while (message_at(at, m, meta)) {
    const std::string what = message_name(at);
    const auto msg = flatbuf::Table::root(meta.data(), meta.size(), what);
    const uint8_t kind = msg.u8(1);
    if (kind == kSchemaMessage) {
      MF_CHECK(!have_schema, what, ": a second schema");
      read_schema(msg.table(2), msg.i16(0), what);
      have_schema = true;
    } else if (kind == kRecordBatch) {
      MF_CHECK(have_schema, what, ": a record batch before the schema");
      add_batch(m, msg);
    } else {
      MF_CHECK(kind == kDictionaryBatch, what, ": a message of unknown kind ", int(kind), " (tensors are not read)");
      MF_CHECK(have_schema, what, ": a dictionary batch before the schema");
      add_dictionary(m, msg, batches_.size());
    }
    at = m.body_at + m.body_size;
  }
  MF_CHECK(have_schema, file_.name(), ": not an Arrow IPC file (no schema message)");
}

std::vector<std::string> ArrowFile::top_level_fields() const {
  std::vector<std::string> out;
  for (const Field& f : fields_) out.push_back(f.name);
  return out;
}

void ArrowFile::for_each_row(const std::vector<std::string>& fields, const std::function<void(int64_t, Json&&)>& fn) const {
  const bool any = std::any_of(fields_.begin(), fields_.end(), [&](const Field& f) {
    return std::find(fields.begin(), fields.end(), f.name) != fields.end();
  });
  MF_CHECK(any, file_.name(), ": has none of the columns ", [&] {
    std::string list;
    for (const auto& f : fields) list += (list.empty() ? "" : ", ") + f;
    return list;
  }(), " (its columns: ", [&] {
    std::string list;
    for (const auto& f : fields_) list += (list.empty() ? "" : ", ") + f.name;
    return list;
  }(), ")");
  // The dictionaries the asked-for columns need, decoded as their batches come into effect.
  std::set<int64_t> needed;
  for (const Field& f : fields_)
    if (std::find(fields.begin(), fields.end(), f.name) != fields.end()) dictionaries_of(f, needed);
  Dictionaries dicts;
  size_t next_dictionary = 0;
  const auto apply_dictionaries = [&](size_t batch) {
    for (; next_dictionary < dictionaries_.size() && dictionaries_[next_dictionary].from_batch <= batch; ++next_dictionary) {
      const DictionaryMessage& d = dictionaries_[next_dictionary];
      if (!needed.count(d.id)) continue;
      const std::string where = message_name(d.at.metadata_at) + " (dictionary " + std::to_string(d.id) + ")";
      const auto meta = file_.read_at(d.at.metadata_at, d.at.metadata_size, "a dictionary batch's metadata");
      const auto body = file_.read_at(d.at.body_at, d.at.body_size, "a dictionary batch's body");
      const auto msg = flatbuf::Table::root(meta.data(), meta.size(), where);
      BatchReader reader(msg.table(2).table(1), body, version_, where);
      const Field& f = *dictionary_field(fields_, d.id);
      Column values = read_column(f, f.name + " (dictionary)", reader, dicts, /*as_values=*/true);
      MF_CHECK(values.node.length == reader.length(), where, ": ", values.node.length, " values in a batch of ",
               reader.length());
      std::vector<Column>& chunks = dicts[d.id];
      if (!d.delta) chunks.clear();
      chunks.push_back(std::move(values));
    }
  };
  int64_t row = 0;
  for (size_t b = 0; b < batches_.size(); ++b) {
    apply_dictionaries(b);
    const Batch& m = batches_[b];
    const std::string where = file_.name() + ": record batch " + std::to_string(b);
    const auto meta = file_.read_at(m.metadata_at, m.metadata_size, "a record batch's metadata");
    const auto body = file_.read_at(m.body_at, m.body_size, "a record batch's body");
    const auto msg = flatbuf::Table::root(meta.data(), meta.size(), where);
    BatchReader reader(msg.table(2), body, version_, where);
    // Every row takes at least a bit of some buffer, unless all its columns are of the null type.
    MF_CHECK(reader.length() <= std::max<int64_t>(8 * m.body_size, int64_t{1} << 20), where, ": ", reader.length(),
             " rows in a body of ", m.body_size, " bytes");
    std::vector<Column> columns;
    for (const Field& f : fields_) {
      if (std::find(fields.begin(), fields.end(), f.name) == fields.end()) {
        skip_field(f, reader);
        continue;
      }
      columns.push_back(read_column(f, f.name, reader, dicts));
      MF_CHECK(columns.back().node.length >= reader.length(), where, ": column '", f.name, "' has ",
               columns.back().node.length, " values for ", reader.length(), " rows");
    }
    for (int64_t i = 0; i < reader.length(); ++i, ++row) {
      Json obj = Json::object();
      int64_t budget = kMaxRowValues;
      for (const Column& c : columns) {
        if (c.field->type == kNull || !c.valid(i)) continue;
        Json v = value_of(c, i, where, budget);
        if (!v.is_null()) obj[c.field->name] = std::move(v);  // a null dictionary value: absent, as a null
      }
      fn(row, std::move(obj));
    }
  }
}

}  // namespace moeforge::data::arrow
