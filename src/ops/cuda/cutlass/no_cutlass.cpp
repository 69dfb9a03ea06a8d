// Built when CUTLASS was not found: ragged grouped GEMMs stay on cuBLAS's grouped call.
#include "core/error.h"
#include "ops/cuda/cutlass/grouped_gemm_cutlass.h"

namespace moeforge::cuda::cutlass_grouped {

bool usable(const std::vector<GroupedProduct>&, DType, DType) { return false; }
void run(const std::vector<GroupedProduct>&, DType, DType, float) {
  MF_THROW("this moeforge was built without CUTLASS (scripts/install-cutlass.sh)");
}

bool ragged_weight_grad_usable(const RaggedWeightGradArgs&, DType, DType) { return false; }
int64_t ragged_weight_grad_square_slots(const RaggedWeightGradArgs&) { return 0; }
void ragged_weight_grad(const RaggedWeightGradArgs&, DType) {
  MF_THROW("this moeforge was built without CUTLASS (scripts/install-cutlass.sh)");
}

}  // namespace moeforge::cuda::cutlass_grouped
