// Element types: the compute types (f32, bf16, f16), integer types, and the storage-only types that
// checkpoints carry (f64, fp8, i8/i16, ...), so any safetensors file can be read and written back.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>

namespace moeforge {

enum class DType : uint8_t { F64, F32, F16, BF16, I64, I32, I16, I8, U8, Bool, F8_E4M3, F8_E5M2 };

size_t dtype_size(DType t);
// The safetensors spelling ("F32", "BF16", "BOOL", "F8_E4M3", ...).
std::string_view dtype_name(DType t);
std::optional<DType> dtype_from_name(std::string_view name);
// The torch spelling used in config.json ("float32", "bfloat16", ...), when it has one.
std::optional<DType> dtype_from_torch_name(std::string_view name);
bool is_floating(DType t);

// bf16 <-> f32 with round-to-nearest-even, as torch does (NaN stays NaN).
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

}  // namespace moeforge
