// One CUTLASS grouped-GEMM instantiation (grouped_gemm_instances.h says which product): the same
// kernel as grouped_gemm_weight_grad_bf16.cu with each SM taking runs of 8 consecutive tiles
// (tile_run_scheduler.cuh).
#include "ops/cuda/cutlass/grouped_gemm_instances.h"
#include "ops/cuda/cutlass/grouped_gemm_kernel.cuh"

namespace moeforge::cuda::cutlass_grouped {

void run_weight_grad_bf16_runs(const std::vector<GroupedProduct>& ps, float beta) {
  GroupedGemm<cutlass::layout::ColumnMajor, cutlass::layout::RowMajor, cutlass::bfloat16_t, 8>::run(ps, beta);
}

}  // namespace moeforge::cuda::cutlass_grouped
