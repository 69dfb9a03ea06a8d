// libFuzzer target: arbitrary bytes as a Parquet dataset file (footer, schema, page headers,
// codecs, level and value encodings, record assembly), every top-level field asked for. The file
// must read or throw moeforge::Error; nothing else is acceptable (no crash, no read out of bounds,
// no allocation the file's size does not justify).
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/error.h"
#include "data/parquet_reader.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const auto f = moeforge::data::parquet::ParquetFile::from_bytes(std::string(reinterpret_cast<const char*>(data), size),
                                                                   "fuzz.parquet");
    size_t rows = 0;
    f.for_each_row(f.top_level_fields(), [&](int64_t, moeforge::data::parquet::Json&&) { ++rows; });
  } catch (const moeforge::Error&) {
  }
  return 0;
}
