// One CUTLASS grouped-GEMM instantiation (grouped_gemm_instances.h says which product).
#include "ops/cuda/cutlass/grouped_gemm_instances.h"
#include "ops/cuda/cutlass/grouped_gemm_kernel.cuh"

namespace moeforge::cuda::cutlass_grouped {

void run_input_grad_bf16(const std::vector<GroupedProduct>& ps, float beta) {
  GroupedGemm<cutlass::layout::RowMajor, cutlass::layout::RowMajor, cutlass::bfloat16_t>::run(ps, beta);
}

}  // namespace moeforge::cuda::cutlass_grouped
