#include "gpu/precision.h"

#include "core/error.h"

namespace moeforge::gpu {

Precision parse_precision(const std::string& name, const std::string& where) {
  if (name == "fp32") return Precision::FP32;
  if (name == "bf16-mixed") return Precision::BF16Mixed;
  if (name == "bf16") return Precision::BF16;
  MF_THROW(where, ": precision '", name, "' is not one of fp32, bf16-mixed, bf16");
}

const char* precision_name(Precision p) {
  switch (p) {
    case Precision::FP32: return "fp32";
    case Precision::BF16Mixed: return "bf16-mixed";
    case Precision::BF16: return "bf16";
  }
  return "?";
}

DType compute_dtype(Precision p) { return p == Precision::FP32 ? DType::F32 : DType::BF16; }

}  // namespace moeforge::gpu
