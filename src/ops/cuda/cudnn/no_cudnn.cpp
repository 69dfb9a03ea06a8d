// Built when cuDNN was not found: attention always takes the native kernels.
#include "core/error.h"
#include "ops/cuda/cudnn/attention_cudnn.h"

namespace moeforge::cuda::cudnn_attention {

bool usable(const Tensor&, int64_t, const Tensor*) { return false; }
void forward(const Tensor&, const Tensor&, const Tensor&, float, int64_t, Tensor&, Tensor&) {
  MF_THROW("this moeforge was built without cuDNN (scripts/install-cudnn.sh)");
}
void backward(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, float, int64_t,
              Tensor&, Tensor&, Tensor&) {
  MF_THROW("this moeforge was built without cuDNN (scripts/install-cudnn.sh)");
}

}  // namespace moeforge::cuda::cudnn_attention
