// Model FLOPs per token as shared/BENCHMARKS.md counts them (a multiply-add is 2 FLOPs; causal
// attention counts half the square; training = 3 x forward). Counted from the config, never
// measured, so every implementation is scored by the same yardstick.
#pragma once
#include <cstdint>

#include "hf/config.h"

namespace moeforge::models {

struct FlopsPerToken {
  double forward = 0;   // all layers + LM head, one token at sequence length `seq`
  double training = 0;  // 3 x forward
};
FlopsPerToken flops_per_token(const hf::ModelConfig& cfg, int64_t seq);

}  // namespace moeforge::models
