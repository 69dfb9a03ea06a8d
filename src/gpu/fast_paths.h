// What a GPU run will not get at full speed, said once at its start: a kernel path this build or
// this model falls back from (no cuDNN fused attention, cuBLAS instead of CUTLASS grouped GEMMs, a
// head dimension or dtype the fused attention does not take, packed documents), each with how to
// get the fast path. Empty when everything is on it (and in a build without CUDA).
#pragma once
#include <string>
#include <vector>

#include "hf/config.h"

namespace moeforge::gpu {

// `bf16`: the compute dtype is BF16 (the fused attention takes no F32); `packed`: rows pack documents.
std::vector<std::string> fast_path_notes(const hf::ModelConfig& cfg, bool bf16, bool packed);

}  // namespace moeforge::gpu
