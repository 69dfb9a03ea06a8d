// Built instead of src/gpu/*.cpp when there is no CUDA backend: asking for the GPU is an error.
#include "core/error.h"
#include "gpu/fast_paths.h"
#include "gpu/inference.h"
#include "train/backend.h"

namespace moeforge::train {

std::unique_ptr<StepBackend> make_gpu_backend(models::CausalLM&, AdamW&, const std::string&, RankGroups*) {
  MF_THROW("device: cuda needs the CUDA backend, and this moeforge was built without it");
}

}  // namespace moeforge::train

namespace moeforge::gpu {

std::unique_ptr<nn::ParamAccess> upload_for_inference(const nn::ParamStore&, const std::string&, const std::string& where) {
  MF_THROW(where, ": cuda needs the CUDA backend, and this moeforge was built without it");
}

}  // namespace moeforge::gpu

namespace moeforge::gpu {

std::vector<std::string> fast_path_notes(const hf::ModelConfig&, bool, bool) { return {}; }

}  // namespace moeforge::gpu
