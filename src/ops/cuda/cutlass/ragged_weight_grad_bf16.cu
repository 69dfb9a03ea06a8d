// The ragged-K expert weight gradient into BF16 (ragged_weight_grad_kernel.cuh).
#include "ops/cuda/cutlass/grouped_gemm_instances.h"
#include "ops/cuda/cutlass/ragged_weight_grad_kernel.cuh"

namespace moeforge::cuda::cutlass_grouped {

void run_ragged_weight_grad_bf16(const RaggedWeightGradArgs& a) { RaggedWeightGrad<cutlass::bfloat16_t>::run(a); }

}  // namespace moeforge::cuda::cutlass_grouped
