// Measured alternatives to run_weight_grad_bf16's schedule (grouped_gemm_instances.h), chosen with
// MOEFORGE_CUTLASS_WGRAD: at small K (a few hundred rows per expert) the weight gradient's tiles
// are short, so loading the operands and storing the tile weigh as much as the math.
#include "ops/cuda/cutlass/grouped_gemm_instances.h"
#include "ops/cuda/cutlass/grouped_gemm_kernel.cuh"

namespace moeforge::cuda::cutlass_grouped {

// Two CTAs of a cluster take neighbouring m-tiles of one n-tile: X's tile is multicast to both.
void run_weight_grad_bf16_cluster2(const std::vector<GroupedProduct>& ps, float beta) {
  GroupedGemm<cutlass::layout::ColumnMajor, cutlass::layout::RowMajor, cutlass::bfloat16_t,
              cute::Shape<cute::_128, cute::_256, cute::_64>, cute::Shape<cute::_2, cute::_1, cute::_1>>::run(ps, beta);
}

// Ping-pong: each consumer warp group owns a 64 x 256 tile; one's epilogue runs under the other's math.
void run_weight_grad_bf16_pingpong(const std::vector<GroupedProduct>& ps, float beta) {
  GroupedGemm<cutlass::layout::ColumnMajor, cutlass::layout::RowMajor, cutlass::bfloat16_t,
              cute::Shape<cute::_64, cute::_256, cute::_64>, cute::Shape<cute::_1, cute::_1, cute::_1>,
              cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong,
              cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong>::run(ps, beta);
}

}  // namespace moeforge::cuda::cutlass_grouped
