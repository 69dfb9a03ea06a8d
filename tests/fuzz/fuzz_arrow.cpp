// libFuzzer target: arbitrary bytes as an Arrow IPC dataset file (stream or file format: message
// framing, FlatBuffers metadata, schema, record batches, compressed buffers, nested values), every
// top-level field asked for. The file must read or throw moeforge::Error; nothing else is
// acceptable (no crash, no read out of bounds, no allocation the file's size does not justify).
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/error.h"
#include "data/arrow_ipc.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const auto f = moeforge::data::arrow::ArrowFile::from_bytes(std::string(reinterpret_cast<const char*>(data), size),
                                                               "fuzz.arrow");
    size_t rows = 0;
    f.for_each_row(f.top_level_fields(), [&](int64_t, moeforge::data::arrow::Json&&) { ++rows; });
  } catch (const moeforge::Error&) {
  }
  return 0;
}
