// Precision policies (DESIGN.md): what the GPU computes in and what the optimizer keeps.
//   fp32        F32 weights, gradients and moments (the CPU reference's arithmetic).
//   bf16-mixed  BF16 weights and activations for compute, F32 master weights and AdamW moments
//               (the GPU default); BF16 gradients.
//   bf16        BF16 weights, gradients and AdamW moments: what torch AdamW does on a BF16 model,
//               the policy to compare with Transformers like for like.
// Norm weights keep F32 gradients under every policy (their kernels accumulate in F32; they are tiny).
#pragma once
#include <string>

#include "core/dtype.h"

namespace moeforge::gpu {

enum class Precision { FP32, BF16Mixed, BF16 };

// Parses "fp32" | "bf16-mixed" | "bf16"; `where` names the source in the error.
Precision parse_precision(const std::string& name, const std::string& where);
const char* precision_name(Precision p);
// The dtype of weights and activations in compute.
DType compute_dtype(Precision p);

}  // namespace moeforge::gpu
