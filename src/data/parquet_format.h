// The parts of Parquet's metadata (parquet.thrift) that reading a dataset needs: the footer's
// schema and row groups, each column chunk's metadata, and page headers. Fields this reader does
// not use are skipped; numbers are taken as written and checked by the reader that uses them.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "data/parquet_thrift.h"

namespace moeforge::data::parquet {

enum class PhysicalType : int32_t {
  Boolean = 0, Int32 = 1, Int64 = 2, Int96 = 3, Float = 4, Double = 5, ByteArray = 6, FixedLenByteArray = 7,
};
enum class Repetition : int32_t { Required = 0, Optional = 1, Repeated = 2 };
// ConvertedType values this reader looks at.
enum ConvertedType : int32_t {
  kUtf8 = 0, kMap = 1, kMapKeyValue = 2, kList = 3, kUint8 = 11, kUint16 = 12, kUint32 = 13, kUint64 = 14,
};
// The LogicalType union's members this reader looks at (their field ids).
enum LogicalType : int16_t { kLogicalString = 1, kLogicalMap = 2, kLogicalList = 3 };
enum class Codec : int32_t { Uncompressed = 0, Snappy = 1, Gzip = 2, Lzo = 3, Brotli = 4, Lz4 = 5, Zstd = 6, Lz4Raw = 7 };
enum class Encoding : int32_t {
  Plain = 0, PlainDictionary = 2, Rle = 3, BitPacked = 4, DeltaBinaryPacked = 5, DeltaLengthByteArray = 6,
  DeltaByteArray = 7, RleDictionary = 8, ByteStreamSplit = 9,
};
enum class PageType : int32_t { Data = 0, Index = 1, Dictionary = 2, DataV2 = 3 };

const char* codec_name(Codec c);
const char* encoding_name(Encoding e);

struct SchemaElement {
  std::optional<PhysicalType> type;  // leaves only
  int32_t type_length = 0;           // FIXED_LEN_BYTE_ARRAY
  std::optional<Repetition> repetition;  // absent on the root
  std::string name;
  int32_t num_children = 0;
  std::optional<int32_t> converted_type;
  std::optional<int16_t> logical_type;  // which member of the LogicalType union is set
};

struct ColumnMeta {
  PhysicalType type = PhysicalType::Boolean;
  std::vector<std::string> path;
  Codec codec = Codec::Uncompressed;
  int64_t num_values = 0, total_compressed_size = 0, data_page_offset = 0;
  std::optional<int64_t> dictionary_page_offset;
};

struct ColumnChunk {
  std::optional<std::string> file_path;  // set when the chunk lives in another file
  std::optional<ColumnMeta> meta;
};

struct RowGroup {
  std::vector<ColumnChunk> columns;
  int64_t num_rows = 0;
};

struct FileMetaData {
  std::vector<SchemaElement> schema;  // depth-first, the root first
  int64_t num_rows = 0;
  std::vector<RowGroup> row_groups;
};

struct DataPageHeader {
  int32_t num_values = 0;
  Encoding encoding = Encoding::Plain, definition_level_encoding = Encoding::Rle, repetition_level_encoding = Encoding::Rle;
};
struct DictionaryPageHeader {
  int32_t num_values = 0;
  Encoding encoding = Encoding::Plain;
};
struct DataPageHeaderV2 {
  int32_t num_values = 0, num_nulls = 0, num_rows = 0;
  Encoding encoding = Encoding::Plain;
  int32_t definition_levels_byte_length = 0, repetition_levels_byte_length = 0;
  bool is_compressed = true;
};

struct PageHeader {
  PageType type = PageType::Data;
  int32_t uncompressed_page_size = 0, compressed_page_size = 0;
  std::optional<DataPageHeader> data;
  std::optional<DictionaryPageHeader> dictionary;
  std::optional<DataPageHeaderV2> data_v2;
};

FileMetaData read_file_metadata(ThriftReader& r);
PageHeader read_page_header(ThriftReader& r);

}  // namespace moeforge::data::parquet
