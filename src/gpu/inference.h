// A model's weights on the GPU for inference (generate, eval): the host ParamStore uploaded once in
// the precision's compute dtype, no gradients or optimizer state. Without the CUDA backend the
// call is one error saying so.
#pragma once
#include <memory>
#include <string>

#include "nn/params.h"

namespace moeforge::gpu {

// `precision`: "bf16" (the default for inference) or "fp32"; `where` names its source in errors.
std::unique_ptr<nn::ParamAccess> upload_for_inference(const nn::ParamStore& host, const std::string& precision,
                                                      const std::string& where);

}  // namespace moeforge::gpu
