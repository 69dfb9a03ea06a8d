// Internal to ops/cuda/cutlass: the instantiated grouped GEMMs, one per .cu file, named by the
// expert product they serve (A/B/C as in GroupedProduct).
#pragma once
#include <vector>

#include "ops/cuda/grouped_product.h"

namespace moeforge::cuda::cutlass_grouped {

// Forward, Y = X W^T: A row-major, B transposed (W stored n x k). BF16 out.
void run_forward_bf16(const std::vector<GroupedProduct>& ps, float beta);
// Input gradient, dX = dY W: neither transposed. BF16 out.
void run_input_grad_bf16(const std::vector<GroupedProduct>& ps, float beta);
// Weight gradient, dW = dY^T X: A transposed. BF16 or F32 out (F32 grads under bf16-mixed).
void run_weight_grad_bf16(const std::vector<GroupedProduct>& ps, float beta);
void run_weight_grad_f32(const std::vector<GroupedProduct>& ps, float beta);

struct RaggedWeightGradArgs;
// The ragged-K weight gradient (ragged_weight_grad_kernel.cuh) into BF16 or F32.
void run_ragged_weight_grad_bf16(const RaggedWeightGradArgs& a);
void run_ragged_weight_grad_f32(const RaggedWeightGradArgs& a);

}  // namespace moeforge::cuda::cutlass_grouped
