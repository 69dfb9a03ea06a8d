#include "gpu/fast_paths.h"

#include <cstdlib>
#include <cstring>

namespace moeforge::gpu {

std::vector<std::string> fast_path_notes(const hf::ModelConfig& cfg, bool bf16, bool packed) {
  std::vector<std::string> notes;
  const char* attn_env = std::getenv("MOEFORGE_ATTENTION");
  const int64_t qk_dim = cfg.mla ? cfg.mla->qk_nope_head_dim + cfg.mla->qk_rope_head_dim : cfg.head_dim;
#ifndef MOEFORGE_HAVE_CUDNN
  notes.push_back("attention runs on moeforge's native CUDA kernels: this build has no cuDNN (configure with "
                  "-DMOEFORGE_CUDNN=ON, or run scripts/install-cudnn.sh, and rebuild; DeepSeek's latent attention "
                  "measured 0.33x Transformers' speed without it)");
#else
  if (attn_env && std::strcmp(attn_env, "native") == 0)
    notes.push_back("attention forced onto the native kernels (MOEFORGE_ATTENTION=native)");
  else if (!bf16)
    notes.push_back("attention runs on the native kernels: cuDNN's fused attention takes bf16, this run computes in "
                    "fp32 (precision: bf16-mixed or bf16 for the fast path)");
  else if (qk_dim % 8 != 0 || qk_dim > 256)
    notes.push_back("attention runs on the native kernels: head dimension " + std::to_string(qk_dim) +
                    " has no cuDNN fused kernel (multiples of 8 up to 256)");
  else if (packed)
    notes.push_back("attention over packed documents runs on the native kernels (cuDNN's ragged layout is not wired "
                    "yet); without packing: the fused kernel");
#endif
  if (cfg.num_experts > 0) {
#ifndef MOEFORGE_HAVE_CUTLASS
    notes.push_back("expert GEMMs run as cuBLAS grouped calls: this build has no CUTLASS (scripts/install-cutlass.sh, "
                    "then rebuild)");
#else
    if (const char* g = std::getenv("MOEFORGE_GROUPED_GEMM"))
      notes.push_back(std::string("expert GEMMs forced onto '") + g + "' (MOEFORGE_GROUPED_GEMM)");
#endif
  }
  return notes;
}

}  // namespace moeforge::gpu
