// The few structured values that ops take or return besides tensors, shared by ops/ops.h and the
// two implementations (ops/cpu/cpu_ops.h, ops/cuda/ops_cuda.h). C++17-clean: CUDA units include it.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "core/tensor.h"
#include "ops/adamw_math.h"

namespace moeforge::ops {

// Where every (token, slot) pair of a routing goes in the permuted buffer: grouped by expert and in
// token order inside an expert (deterministic). dest_row lives on the device of the routing's
// indices; the offsets are always on the host, since the grouped GEMMs take them there.
struct RoutingPlan {
  Tensor dest_row;               // [T,k] I64: row of (t, j) in the permuted buffer
  std::vector<int64_t> offsets;  // [E+1] on the host (after finish(), ops::finish_plan)
  int64_t num_experts = 0, top_k = 0;
  // Set while the offsets are still on their way from the GPU (ops::plan_routing_started): the
  // device's own work on the plan (dest_row, permute) can be queued before the host waits for them.
  std::function<void(RoutingPlan&)> finish_offsets;
  // Waits for the offsets and fills them in, once (nothing when they are there already).
  void finish() {
    if (!finish_offsets) return;
    const auto fill = std::move(finish_offsets);
    finish_offsets = nullptr;
    fill(*this);
  }
};

// One parameter of a multi-tensor AdamW step (ops::adamw_multi_tensor).
struct AdamWTensors {
  Tensor param, grad, exp_avg, exp_avg_sq;
  float weight_decay_mul = 1.f;  // 1 - lr * weight_decay, or 1 where no decay applies
  Tensor param_bf16_copy;        // optional: the BF16 copy of an F32 `param` that the model computes with
  // Optional U8 [rows] (grad viewed as [rows, numel / rows]): 1 for the rows its sites wrote; the
  // others were left unwritten (nn::ParamAccess::written_rows) and count as zeros, never read.
  Tensor grad_written_rows;
  // Optional, only with grad_written_rows (the same rows): U8 [rows] kept across steps by the
  // optimizer, 1 where every moment of the row is known to be +0 (nothing has reached the row
  // yet: an expert no token was routed to, an embedding row of a token the data never held). A
  // flagged row whose gradient is unwritten again keeps its moments, so they are not read or
  // written; a written row's flag is cleared by the update. A hint: the result is the full
  // update's either way.
  Tensor zero_moment_rows;
};

// The gradients ops::ssm_scan_backward returns (F32): of x [T,H,P], of the raw dt [T,H] and the
// dt bias [H], of A_log [H], of B and C [T,G,N], and of D [H].
struct SsmScanGrads {
  Tensor dx, ddt_raw, ddt_bias, da_log, db, dc, dd;
};

}  // namespace moeforge::ops
