#include "data/parquet_format.h"

namespace moeforge::data::parquet {

namespace {

using T = ThriftType;

void expect(ThriftReader& r, ThriftType got, ThriftType want, int16_t id, const char* in_struct, const char* what) {
  if (got != want) r.wrong_type(id, in_struct, what);
}

int32_t i32_field(ThriftReader& r, ThriftType t, int16_t id, const char* in_struct) {
  expect(r, t, T::I32, id, in_struct, "an i32");
  return r.read_i32();
}

int64_t i64_field(ThriftReader& r, ThriftType t, int16_t id, const char* in_struct) {
  expect(r, t, T::I64, id, in_struct, "an i64");
  return r.read_i64();
}

std::string binary_field(ThriftReader& r, ThriftType t, int16_t id, const char* in_struct) {
  expect(r, t, T::Binary, id, in_struct, "a string");
  return r.read_binary();
}

// Calls `element` once per element of a list field whose elements are `want`.
template <typename F>
void list_field(ThriftReader& r, ThriftType t, int16_t id, const char* in_struct, ThriftType want, F&& element) {
  expect(r, t, T::List, id, in_struct, "a list");
  ThriftType e;
  const size_t n = r.read_list_header(e);
  if (n > 0 && e != want) r.wrong_type(id, in_struct, "a list of the expected type");
  for (size_t i = 0; i < n; ++i) element();
}

// Struct fields: `on_field(id, type)` returns false for the ones it does not read (then skipped).
template <typename F>
void read_struct(ThriftReader& r, F&& on_field) {
  r.begin_struct();
  int16_t id;
  ThriftType t;
  while (r.next_field(id, t))
    if (!on_field(id, t)) r.skip(t);
  r.end_struct();
}

SchemaElement read_schema_element(ThriftReader& r) {
  SchemaElement s;
  const char* in = "SchemaElement";
  read_struct(r, [&](int16_t id, ThriftType t) {
    switch (id) {
      case 1: s.type = static_cast<PhysicalType>(i32_field(r, t, id, in)); return true;
      case 2: s.type_length = i32_field(r, t, id, in); return true;
      case 3: s.repetition = static_cast<Repetition>(i32_field(r, t, id, in)); return true;
      case 4: s.name = binary_field(r, t, id, in); return true;
      case 5: s.num_children = i32_field(r, t, id, in); return true;
      case 6: s.converted_type = i32_field(r, t, id, in); return true;
      case 10:
        expect(r, t, T::Struct, id, in, "a struct");
        read_struct(r, [&](int16_t member, ThriftType) {  // a union: the member set is the type
          s.logical_type = member;
          return false;
        });
        return true;
      default: return false;
    }
  });
  return s;
}

ColumnMeta read_column_meta(ThriftReader& r) {
  ColumnMeta m;
  const char* in = "ColumnMetaData";
  read_struct(r, [&](int16_t id, ThriftType t) {
    switch (id) {
      case 1: m.type = static_cast<PhysicalType>(i32_field(r, t, id, in)); return true;
      case 3: list_field(r, t, id, in, T::Binary, [&] { m.path.push_back(r.read_binary()); }); return true;
      case 4: m.codec = static_cast<Codec>(i32_field(r, t, id, in)); return true;
      case 5: m.num_values = i64_field(r, t, id, in); return true;
      case 7: m.total_compressed_size = i64_field(r, t, id, in); return true;
      case 9: m.data_page_offset = i64_field(r, t, id, in); return true;
      case 11: m.dictionary_page_offset = i64_field(r, t, id, in); return true;
      default: return false;
    }
  });
  return m;
}

ColumnChunk read_column_chunk(ThriftReader& r) {
  ColumnChunk c;
  const char* in = "ColumnChunk";
  read_struct(r, [&](int16_t id, ThriftType t) {
    switch (id) {
      case 1: c.file_path = binary_field(r, t, id, in); return true;
      case 3:
        expect(r, t, T::Struct, id, in, "a struct");
        c.meta = read_column_meta(r);
        return true;
      default: return false;
    }
  });
  return c;
}

RowGroup read_row_group(ThriftReader& r) {
  RowGroup g;
  const char* in = "RowGroup";
  read_struct(r, [&](int16_t id, ThriftType t) {
    switch (id) {
      case 1: list_field(r, t, id, in, T::Struct, [&] { g.columns.push_back(read_column_chunk(r)); }); return true;
      case 3: g.num_rows = i64_field(r, t, id, in); return true;
      default: return false;
    }
  });
  return g;
}

DataPageHeader read_data_page_header(ThriftReader& r) {
  DataPageHeader d;
  const char* in = "DataPageHeader";
  read_struct(r, [&](int16_t id, ThriftType t) {
    switch (id) {
      case 1: d.num_values = i32_field(r, t, id, in); return true;
      case 2: d.encoding = static_cast<Encoding>(i32_field(r, t, id, in)); return true;
      case 3: d.definition_level_encoding = static_cast<Encoding>(i32_field(r, t, id, in)); return true;
      case 4: d.repetition_level_encoding = static_cast<Encoding>(i32_field(r, t, id, in)); return true;
      default: return false;
    }
  });
  return d;
}

DictionaryPageHeader read_dictionary_page_header(ThriftReader& r) {
  DictionaryPageHeader d;
  const char* in = "DictionaryPageHeader";
  read_struct(r, [&](int16_t id, ThriftType t) {
    switch (id) {
      case 1: d.num_values = i32_field(r, t, id, in); return true;
      case 2: d.encoding = static_cast<Encoding>(i32_field(r, t, id, in)); return true;
      default: return false;
    }
  });
  return d;
}

DataPageHeaderV2 read_data_page_header_v2(ThriftReader& r) {
  DataPageHeaderV2 d;
  const char* in = "DataPageHeaderV2";
  read_struct(r, [&](int16_t id, ThriftType t) {
    switch (id) {
      case 1: d.num_values = i32_field(r, t, id, in); return true;
      case 2: d.num_nulls = i32_field(r, t, id, in); return true;
      case 3: d.num_rows = i32_field(r, t, id, in); return true;
      case 4: d.encoding = static_cast<Encoding>(i32_field(r, t, id, in)); return true;
      case 5: d.definition_levels_byte_length = i32_field(r, t, id, in); return true;
      case 6: d.repetition_levels_byte_length = i32_field(r, t, id, in); return true;
      case 7: d.is_compressed = r.read_bool(t); return true;
      default: return false;
    }
  });
  return d;
}

}  // namespace

const char* codec_name(Codec c) {
  switch (c) {
    case Codec::Uncompressed: return "UNCOMPRESSED";
    case Codec::Snappy: return "SNAPPY";
    case Codec::Gzip: return "GZIP";
    case Codec::Lzo: return "LZO";
    case Codec::Brotli: return "BROTLI";
    case Codec::Lz4: return "LZ4 (Hadoop framing)";
    case Codec::Zstd: return "ZSTD";
    case Codec::Lz4Raw: return "LZ4_RAW";
  }
  return "an unknown codec";
}

const char* encoding_name(Encoding e) {
  switch (e) {
    case Encoding::Plain: return "PLAIN";
    case Encoding::PlainDictionary: return "PLAIN_DICTIONARY";
    case Encoding::Rle: return "RLE";
    case Encoding::BitPacked: return "BIT_PACKED";
    case Encoding::DeltaBinaryPacked: return "DELTA_BINARY_PACKED";
    case Encoding::DeltaLengthByteArray: return "DELTA_LENGTH_BYTE_ARRAY";
    case Encoding::DeltaByteArray: return "DELTA_BYTE_ARRAY";
    case Encoding::RleDictionary: return "RLE_DICTIONARY";
    case Encoding::ByteStreamSplit: return "BYTE_STREAM_SPLIT";
  }
  return "an unknown encoding";
}

FileMetaData read_file_metadata(ThriftReader& r) {
  FileMetaData f;
  const char* in = "FileMetaData";
  read_struct(r, [&](int16_t id, ThriftType t) {
    switch (id) {
      case 2: list_field(r, t, id, in, T::Struct, [&] { f.schema.push_back(read_schema_element(r)); }); return true;
      case 3: f.num_rows = i64_field(r, t, id, in); return true;
      case 4: list_field(r, t, id, in, T::Struct, [&] { f.row_groups.push_back(read_row_group(r)); }); return true;
      default: return false;
    }
  });
  return f;
}

PageHeader read_page_header(ThriftReader& r) {
  PageHeader h;
  const char* in = "PageHeader";
  const auto sub = [&](ThriftType t, int16_t id) { expect(r, t, T::Struct, id, in, "a struct"); };
  read_struct(r, [&](int16_t id, ThriftType t) {
    switch (id) {
      case 1: h.type = static_cast<PageType>(i32_field(r, t, id, in)); return true;
      case 2: h.uncompressed_page_size = i32_field(r, t, id, in); return true;
      case 3: h.compressed_page_size = i32_field(r, t, id, in); return true;
      case 5: sub(t, id); h.data = read_data_page_header(r); return true;
      case 7: sub(t, id); h.dictionary = read_dictionary_page_header(r); return true;
      case 8: sub(t, id); h.data_v2 = read_data_page_header_v2(r); return true;
      default: return false;
    }
  });
  return h;
}

}  // namespace moeforge::data::parquet
