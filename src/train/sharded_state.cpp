#include "train/sharded_state.h"

#include "core/error.h"

namespace moeforge::train {

namespace {

// The parameters of the sharded and the full model are registered in the same order.
void check_same_layout(const models::ShardedModel& part, size_t full_count) {
  MF_CHECK(part.model->params().all().size() == full_count && part.sharded.size() == full_count,
           "internal: the sharded model has ", part.model->params().all().size(), " parameters, the full one ", full_count);
}

}  // namespace

void gather_optimizer(const models::ShardedModel& part, const AdamW& part_opt, const models::Parallel& par,
                      AdamW& full) {
  const size_t n = full.state().size() / 2;
  check_same_layout(part, n);
  for (size_t i = 0; i < n; ++i) {
    for (const bool second : {false, true}) {
      const Tensor& src = second ? part_opt.exp_avg_sq(i) : part_opt.exp_avg(i);
      Tensor& dst = second ? full.exp_avg_sq(i) : full.exp_avg(i);
      if (part.sharded[i]) {
        MF_CHECK(par.ep, "internal: a sharded moment without an expert-parallel group");
        Tensor all = Tensor::empty(dst.shape(), DType::F32);
        par.ep->all_gather(src, all);
        dst = all;
      } else {
        dst = src.clone();
      }
    }
  }
  full.set_steps(part_opt.steps());
}

void slice_optimizer(const models::ShardedModel& part, const AdamW& full, const models::Parallel& par, AdamW& part_opt) {
  const size_t n = full.state().size() / 2;
  check_same_layout(part, n);
  const int ep_rank = par.ep ? par.ep->rank() : 0;
  for (size_t i = 0; i < n; ++i) {
    for (const bool second : {false, true}) {
      const Tensor& src = second ? full.exp_avg_sq(i) : full.exp_avg(i);
      Tensor& dst = second ? part_opt.exp_avg_sq(i) : part_opt.exp_avg(i);
      const int64_t rows = dst.size(0);
      dst = part.sharded[i] ? src.slice0(ep_rank * rows, rows).clone() : src.clone();
    }
  }
  part_opt.set_steps(full.steps());
}

}  // namespace moeforge::train
