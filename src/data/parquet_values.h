// Parquet's value and level encodings: the RLE / bit-packed hybrid (repetition and definition
// levels, dictionary indices, booleans), PLAIN, and the DELTA encodings, decoded into JSON values
// (a dataset row is JSON once read). Every read is bounded by its buffer; errors name `what`.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "data/parquet_format.h"

namespace moeforge::data::parquet {

using Json = nlohmann::ordered_json;

// A bounded cursor over one decoded page.
struct Bytes {
  const uint8_t* p;
  const uint8_t* end;
  size_t left() const { return static_cast<size_t>(end - p); }
};

// How a leaf's physical values become JSON: the physical type, a FIXED_LEN_BYTE_ARRAY's width, and
// whether integers are unsigned (UINT_* converted types).
struct LeafType {
  PhysicalType physical = PhysicalType::ByteArray;
  int32_t type_length = 0;
  bool is_unsigned = false;
};

// `count` values of the RLE / bit-packed hybrid at `bit_width` (0-32) bits; reads only what they take.
void decode_hybrid(Bytes& in, int bit_width, size_t count, std::vector<uint32_t>& out, const std::string& what);
// `count` values of `encoding` (PLAIN, RLE for booleans, the DELTA encodings, BYTE_STREAM_SPLIT)
// appended to `out`.
void decode_values(Encoding encoding, const LeafType& type, Bytes& in, size_t count, std::vector<Json>& out,
                   const std::string& what);
// The bits needed for levels up to `max_level`.
int bit_width_of(int max_level);

}  // namespace moeforge::data::parquet
