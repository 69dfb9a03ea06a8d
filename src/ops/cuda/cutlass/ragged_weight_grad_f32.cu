// The ragged-K expert weight gradient into F32 (ragged_weight_grad_kernel.cuh).
#include "ops/cuda/cutlass/grouped_gemm_instances.h"
#include "ops/cuda/cutlass/ragged_weight_grad_kernel.cuh"

namespace moeforge::cuda::cutlass_grouped {

void run_ragged_weight_grad_f32(const RaggedWeightGradArgs& a) { RaggedWeightGrad<float>::run(a); }

}  // namespace moeforge::cuda::cutlass_grouped
