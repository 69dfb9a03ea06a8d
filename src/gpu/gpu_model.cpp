#include "gpu/gpu_model.h"

#include "core/error.h"
#include "models/decoder/decoder.h"

namespace moeforge::gpu {

std::unique_ptr<GpuModel> make_decoder_gpu(const models::CausalLM& model, DeviceParams params, GpuParallel par);

std::unique_ptr<GpuModel> make_gpu_model(const models::CausalLM& model, DeviceParams params, GpuParallel par) {
  MF_CHECK(params.size() == model.params().all().size(), "make_gpu_model: ", params.size(), " device parameters for a model with ",
           model.params().all().size());
  if (dynamic_cast<const models::Decoder*>(&model)) return make_decoder_gpu(model, std::move(params), par);
  MF_THROW("model_type '", model.config().model_type, "' has no GPU training path yet (qwen3_moe has)");
}

}  // namespace moeforge::gpu
