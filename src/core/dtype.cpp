#include "core/dtype.h"

#include <cmath>

#include "core/error.h"

namespace moeforge {

namespace {
struct DTypeInfo {
  DType type;
  size_t size;
  const char* safetensors;
  const char* torch;
};
constexpr DTypeInfo kInfo[] = {
    {DType::F64, 8, "F64", "float64"},       {DType::F32, 4, "F32", "float32"},
    {DType::F16, 2, "F16", "float16"},       {DType::BF16, 2, "BF16", "bfloat16"},
    {DType::I64, 8, "I64", "int64"},         {DType::I32, 4, "I32", "int32"},
    {DType::I16, 2, "I16", "int16"},         {DType::I8, 1, "I8", "int8"},
    {DType::U8, 1, "U8", "uint8"},           {DType::Bool, 1, "BOOL", "bool"},
    {DType::F8_E4M3, 1, "F8_E4M3", "float8_e4m3fn"}, {DType::F8_E5M2, 1, "F8_E5M2", "float8_e5m2"},
};
const DTypeInfo& info(DType t) { return kInfo[static_cast<int>(t)]; }
}  // namespace

size_t dtype_size(DType t) { return info(t).size; }
std::string_view dtype_name(DType t) { return info(t).safetensors; }

std::optional<DType> dtype_from_name(std::string_view name) {
  for (const auto& i : kInfo)
    if (name == i.safetensors) return i.type;
  return std::nullopt;
}

std::optional<DType> dtype_from_torch_name(std::string_view name) {
  if (name.rfind("torch.", 0) == 0) name.remove_prefix(6);
  for (const auto& i : kInfo)
    if (name == i.torch) return i.type;
  if (name == "float") return DType::F32;
  if (name == "half") return DType::F16;
  return std::nullopt;
}

bool is_floating(DType t) {
  switch (t) {
    case DType::F64: case DType::F32: case DType::F16: case DType::BF16:
    case DType::F8_E4M3: case DType::F8_E5M2:
      return true;
    default:
      return false;
  }
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = (h >> 15) & 1, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  float v;
  if (exp == 0) v = std::ldexp(static_cast<float>(mant), -24);
  else if (exp == 31) v = mant ? NAN : INFINITY;
  else v = std::ldexp(static_cast<float>(mant | 0x400), static_cast<int>(exp) - 25);
  return sign ? -v : v;
}

uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000;
  uint32_t a = u & 0x7fffffff;
  if (a > 0x7f800000) return static_cast<uint16_t>(sign | 0x7e00);     // NaN
  if (a >= 0x477ff000) return static_cast<uint16_t>(sign | 0x7c00);    // overflow -> inf
  if (a < 0x38800000) {                                                // subnormal or zero
    float af;
    std::memcpy(&af, &a, 4);
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(af * 16777216.0f)));
  }
  a += 0xc8000fff + ((a >> 13) & 1);  // rebias exponent (-112 << 23) and round to nearest even
  return static_cast<uint16_t>(sign | (a >> 13));
}

}  // namespace moeforge
