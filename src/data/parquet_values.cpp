#include "data/parquet_values.h"

#include <algorithm>

#include "core/error.h"
#include "data/file_bytes.h"

namespace moeforge::data::parquet {

namespace {

uint64_t uleb128(Bytes& in, const std::string& what) {
  uint64_t v = 0;
  for (int shift = 0; shift < 64; shift += 7) {
    MF_CHECK(in.p < in.end, what, ": ends inside a varint");
    const uint8_t b = *in.p++;
    v |= static_cast<uint64_t>(b & 0x7f) << shift;
    if (!(b & 0x80)) return v;
  }
  MF_THROW(what, ": a varint longer than 10 bytes");
}

int64_t zigzag(Bytes& in, const std::string& what) {
  const uint64_t v = uleb128(in, what);
  return static_cast<int64_t>(v >> 1) ^ -static_cast<int64_t>(v & 1);
}

// Value i of a run packed LSB first at `width` bits (width <= 64).
uint64_t unpack(const uint8_t* packed, int width, size_t i) {
  uint64_t v = 0;
  const size_t bit0 = i * static_cast<size_t>(width);
  for (int b = 0; b < width; ++b) {
    const size_t bit = bit0 + static_cast<size_t>(b);
    v |= static_cast<uint64_t>((packed[bit >> 3] >> (bit & 7)) & 1) << b;
  }
  return v;
}

Json integer(int64_t v, const LeafType& t) {
  if (!t.is_unsigned) return v;
  return t.physical == PhysicalType::Int32 ? Json(static_cast<uint32_t>(v)) : Json(static_cast<uint64_t>(v));
}

// A byte string as JSON: the bytes as they are (BYTE_ARRAY columns of a dataset are text).
Json bytes(const uint8_t* p, size_t n) { return Json(std::string(reinterpret_cast<const char*>(p), n)); }

// DELTA_BINARY_PACKED: a header (values per block, miniblocks per block, the total, the first
// value), then blocks of a minimum delta, one bit width per miniblock and the miniblocks packed at
// their widths; each value is the previous plus the minimum plus its packed number.
std::vector<int64_t> delta_binary_packed(Bytes& in, size_t count, const std::string& what) {
  const uint64_t block = uleb128(in, what), miniblocks = uleb128(in, what), total = uleb128(in, what);
  const int64_t first = zigzag(in, what);
  MF_CHECK(block > 0 && block % 128 == 0 && block <= (1u << 20) && miniblocks > 0 && block % miniblocks == 0 &&
               (block / miniblocks) % 32 == 0,
           what, ": malformed DELTA_BINARY_PACKED header (", block, " values per block in ", miniblocks, " miniblocks)");
  MF_CHECK(total == count, what, ": DELTA_BINARY_PACKED holds ", total, " values where ", count, " are expected");
  std::vector<int64_t> out;
  out.reserve(std::min<size_t>(count, in.left() * 8 + 1));
  if (count == 0) return out;
  out.push_back(first);
  uint64_t prev = static_cast<uint64_t>(first);  // deltas wrap as the writer's integers do
  const size_t per_mini = static_cast<size_t>(block / miniblocks);
  while (out.size() < count) {
    const uint64_t min_delta = static_cast<uint64_t>(zigzag(in, what));
    MF_CHECK(in.left() >= miniblocks, what, ": DELTA_BINARY_PACKED ends inside a block's bit widths");
    const uint8_t* widths = in.p;
    in.p += miniblocks;
    for (uint64_t m = 0; m < miniblocks && out.size() < count; ++m) {
      const int w = widths[m];
      MF_CHECK(w <= 64, what, ": DELTA_BINARY_PACKED bit width ", w, " is over 64");
      const size_t size = per_mini * static_cast<size_t>(w) / 8;
      MF_CHECK(in.left() >= size, what, ": DELTA_BINARY_PACKED ends inside a miniblock");
      for (size_t i = 0; i < per_mini && out.size() < count; ++i) {
        prev += min_delta + unpack(in.p, w, i);
        out.push_back(static_cast<int64_t>(prev));
      }
      in.p += size;
    }
  }
  return out;
}

// DELTA_LENGTH_BYTE_ARRAY: every length (DELTA_BINARY_PACKED), then the bytes one after another.
std::vector<std::string> delta_length_byte_array(Bytes& in, size_t count, const std::string& what) {
  const std::vector<int64_t> lengths = delta_binary_packed(in, count, what);
  std::vector<std::string> out;
  out.reserve(lengths.size());
  for (const int64_t n : lengths) {
    MF_CHECK(n >= 0 && static_cast<uint64_t>(n) <= in.left(), what, ": DELTA_LENGTH_BYTE_ARRAY runs past the page");
    out.emplace_back(reinterpret_cast<const char*>(in.p), static_cast<size_t>(n));
    in.p += n;
  }
  return out;
}

}  // namespace

int bit_width_of(int max_level) {
  int w = 0;
  while ((1 << w) <= max_level) ++w;
  return w;
}

void decode_hybrid(Bytes& in, int bit_width, size_t count, std::vector<uint32_t>& out, const std::string& what) {
  MF_CHECK(bit_width >= 0 && bit_width <= 32, what, ": bit width ", bit_width, " is over 32");
  const size_t value_bytes = static_cast<size_t>((bit_width + 7) / 8);
  size_t done = 0;
  while (done < count) {
    const uint64_t header = uleb128(in, what);
    if (header & 1) {  // bit-packed: groups of 8 values
      const uint64_t groups = header >> 1;
      MF_CHECK(groups <= in.left(), what, ": a bit-packed run longer than the page");
      const size_t values = static_cast<size_t>(groups) * 8, size = static_cast<size_t>(groups) * bit_width;
      MF_CHECK(size <= in.left(), what, ": a bit-packed run longer than the page");
      for (size_t i = 0; i < values && done < count; ++i, ++done)
        out.push_back(static_cast<uint32_t>(unpack(in.p, bit_width, i)));
      in.p += size;
    } else {  // a run of one value
      const uint64_t run = header >> 1;
      MF_CHECK(value_bytes <= in.left(), what, ": ends inside a run's value");
      uint32_t v = 0;
      for (size_t i = 0; i < value_bytes; ++i) v |= static_cast<uint32_t>(in.p[i]) << (8 * i);
      in.p += value_bytes;
      MF_CHECK(run > 0, what, ": an empty run in the RLE / bit-packed hybrid");
      const size_t take = static_cast<size_t>(std::min<uint64_t>(run, count - done));
      out.insert(out.end(), take, v);
      done += take;
    }
  }
}

namespace {
// The bytes of one value that BYTE_STREAM_SPLIT scatters over as many streams.
size_t byte_stream_split_width(const LeafType& type, const std::string& what) {
  switch (type.physical) {
    case PhysicalType::Int32:
    case PhysicalType::Float: return 4;
    case PhysicalType::Int64:
    case PhysicalType::Double: return 8;
    case PhysicalType::FixedLenByteArray:
      MF_CHECK(type.type_length > 0, what, ": BYTE_STREAM_SPLIT values of a zero-length FIXED_LEN_BYTE_ARRAY");
      return static_cast<size_t>(type.type_length);
    default:
      MF_THROW(what, ": BYTE_STREAM_SPLIT values of physical type ", static_cast<int>(type.physical),
               " (it applies to INT32, INT64, FLOAT, DOUBLE and FIXED_LEN_BYTE_ARRAY)");
  }
}
}  // namespace

void decode_values(Encoding encoding, const LeafType& type, Bytes& in, size_t count, std::vector<Json>& out,
                   const std::string& what) {
  // `count` little-endian values of type V (an integer or a float type), each given to `add`.
  const auto fixed = [&](auto type_tag, auto&& add) {
    using V = decltype(type_tag);
    MF_CHECK(count <= in.left() / sizeof(V), what, ": its values run past the page");  // without multiplying
    for (size_t i = 0; i < count; ++i, in.p += sizeof(V)) add(read_le<V>(in.p));
  };
  switch (encoding) {
    case Encoding::Plain:
      switch (type.physical) {
        case PhysicalType::Boolean:
          MF_CHECK((count + 7) / 8 <= in.left(), what, ": its values run past the page");
          for (size_t i = 0; i < count; ++i) out.emplace_back(((in.p[i >> 3] >> (i & 7)) & 1) != 0);
          in.p += (count + 7) / 8;
          return;
        case PhysicalType::Int32: fixed(int32_t{}, [&](int32_t v) { out.push_back(integer(v, type)); }); return;
        case PhysicalType::Int64: fixed(int64_t{}, [&](int64_t v) { out.push_back(integer(v, type)); }); return;
        case PhysicalType::Float: fixed(float{}, [&](float v) { out.emplace_back(v); }); return;
        case PhysicalType::Double: fixed(double{}, [&](double v) { out.emplace_back(v); }); return;
        case PhysicalType::ByteArray:
          for (size_t i = 0; i < count; ++i) {
            MF_CHECK(in.left() >= 4, what, ": its values run past the page");
            const uint32_t n = read_le<uint32_t>(in.p);
            in.p += 4;
            MF_CHECK(n <= in.left(), what, ": a string of ", n, " bytes runs past the page");
            out.push_back(bytes(in.p, n));
            in.p += n;
          }
          return;
        case PhysicalType::FixedLenByteArray: {
          const auto w = static_cast<size_t>(type.type_length);
          MF_CHECK(type.type_length >= 0 && (w == 0 || count <= in.left() / w), what, ": its values run past the page");
          for (size_t i = 0; i < count; ++i, in.p += w) out.push_back(bytes(in.p, w));
          return;
        }
        case PhysicalType::Int96:
          MF_THROW(what, ": INT96 values (legacy timestamps) are not read; a dataset's fields are text, numbers and lists");
      }
      MF_THROW(what, ": unknown physical type ", static_cast<int>(type.physical));
    case Encoding::Rle: {
      MF_CHECK(type.physical == PhysicalType::Boolean, what, ": RLE values that are not booleans");
      MF_CHECK(in.left() >= 4, what, ": ends inside the booleans' length");
      const uint32_t n = read_le<uint32_t>(in.p);
      in.p += 4;
      MF_CHECK(n <= in.left(), what, ": the booleans run past the page");
      Bytes run{in.p, in.p + n};
      std::vector<uint32_t> bits;
      decode_hybrid(run, 1, count, bits, what);
      for (const uint32_t b : bits) out.emplace_back(b != 0);
      in.p += n;
      return;
    }
    case Encoding::DeltaBinaryPacked: {
      MF_CHECK(type.physical == PhysicalType::Int32 || type.physical == PhysicalType::Int64, what,
               ": DELTA_BINARY_PACKED values that are not integers");
      for (const int64_t v : delta_binary_packed(in, count, what))
        out.push_back(integer(type.physical == PhysicalType::Int32 ? static_cast<int32_t>(v) : v, type));
      return;
    }
    case Encoding::DeltaLengthByteArray:
      MF_CHECK(type.physical == PhysicalType::ByteArray, what, ": DELTA_LENGTH_BYTE_ARRAY values that are not byte arrays");
      for (auto& s : delta_length_byte_array(in, count, what)) out.emplace_back(std::move(s));
      return;
    case Encoding::DeltaByteArray: {
      MF_CHECK(type.physical == PhysicalType::ByteArray || type.physical == PhysicalType::FixedLenByteArray, what,
               ": DELTA_BYTE_ARRAY values that are not byte arrays");
      // Each value is a prefix of the previous one plus a suffix of its own.
      const std::vector<int64_t> prefixes = delta_binary_packed(in, count, what);
      const std::vector<std::string> suffixes = delta_length_byte_array(in, count, what);
      std::string prev;
      for (size_t i = 0; i < count; ++i) {
        MF_CHECK(prefixes[i] >= 0 && static_cast<uint64_t>(prefixes[i]) <= prev.size(), what,
                 ": a DELTA_BYTE_ARRAY prefix longer than the value before it");
        std::string v = prev.substr(0, static_cast<size_t>(prefixes[i])) + suffixes[i];
        out.emplace_back(v);
        prev = std::move(v);
      }
      return;
    }
    case Encoding::ByteStreamSplit: {
      // Byte k of every value in stream k (streams of `count` bytes, back to back): the values'
      // bytes gathered back, then read as PLAIN.
      const size_t width = byte_stream_split_width(type, what);
      MF_CHECK(count <= in.left() / width, what, ": its values run past the page");  // without multiplying
      std::string joined(count * width, '\0');
      for (size_t k = 0; k < width; ++k)
        for (size_t i = 0; i < count; ++i) joined[i * width + k] = static_cast<char>(in.p[k * count + i]);
      in.p += count * width;
      Bytes plain_values{reinterpret_cast<const uint8_t*>(joined.data()),
                         reinterpret_cast<const uint8_t*>(joined.data()) + joined.size()};
      decode_values(Encoding::Plain, type, plain_values, count, out, what);
      return;
    }
    default:
      MF_THROW(what, ": values encoded as ", encoding_name(encoding),
               ", which moeforge does not read (PLAIN, dictionaries, RLE, the DELTA encodings and BYTE_STREAM_SPLIT are read)");
  }
}

}  // namespace moeforge::data::parquet
