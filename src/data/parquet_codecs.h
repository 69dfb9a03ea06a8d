// Page decompression for Parquet: UNCOMPRESSED, SNAPPY, LZ4_RAW and LZ4 (decoders of our own), GZIP
// (zlib), ZSTD (libzstd) and BROTLI (libbrotlidec); and LZ4 frames for Arrow IPC buffers. The output must be exactly the
// header's uncompressed size; a stream that is shorter, longer or malformed is an error naming `what`.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "data/parquet_format.h"

namespace moeforge::data::parquet {

std::vector<uint8_t> decompress(Codec codec, const uint8_t* in, size_t in_size, size_t out_size, const std::string& what);

// The decoders of our own, for tests.
std::vector<uint8_t> snappy_decompress(const uint8_t* in, size_t in_size, size_t out_size, const std::string& what);
std::vector<uint8_t> lz4_block_decompress(const uint8_t* in, size_t in_size, size_t out_size, const std::string& what);
// LZ4's frame format (Arrow IPC's LZ4_FRAME buffers), blocks linked or independent.
// Parquet's deprecated LZ4 codec: Hadoop-framed blocks, else one bare block (as Arrow reads it).
std::vector<uint8_t> lz4_hadoop_decompress(const uint8_t* in, size_t in_size, size_t out_size, const std::string& what);
std::vector<uint8_t> lz4_frame_decompress(const uint8_t* in, size_t in_size, size_t out_size, const std::string& what);

}  // namespace moeforge::data::parquet
