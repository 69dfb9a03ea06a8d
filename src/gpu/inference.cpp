#include "gpu/inference.h"

#include "core/error.h"
#include "gpu/device_params.h"
#include "gpu/precision.h"

namespace moeforge::gpu {

std::unique_ptr<nn::ParamAccess> upload_for_inference(const nn::ParamStore& host, const std::string& precision,
                                                      const std::string& where) {
  const Precision p = parse_precision(precision, where);
  // bf16-mixed would keep F32 masters for an optimizer that inference never runs.
  MF_CHECK(p != Precision::BF16Mixed, where, ": inference takes bf16 or fp32 weights, not bf16-mixed");
  return std::make_unique<DeviceParams>(host, p);
}

}  // namespace moeforge::gpu
