#include "models/expert_shards.h"

#include "core/error.h"
#include "models/registry.h"

namespace moeforge::models {

ShardedModel shard_experts(const CausalLM& full, const Parallel& par) {
  ShardedModel out;
  out.model = build_model(full.config(), par);
  const int ep = par.ep ? par.ep->size() : 1, ep_rank = par.ep ? par.ep->rank() : 0;
  for (auto& p : out.model->params().all()) {
    const nn::Param* src = full.params().find(p.name);
    MF_CHECK(src && src->value.defined(), "internal: parameter ", p.name, " is missing from the full model");
    const bool split = !p.shape.empty() && p.shape != src->value.shape() && p.shape[0] * ep == src->value.size(0);
    MF_CHECK(split || p.shape == src->value.shape(), "internal: ", p.name, " is ", shape_str(p.shape), " here and ",
             shape_str(src->value.shape()), " in the full model");
    p.value = split ? src->value.slice0(ep_rank * p.shape[0], p.shape[0]).clone() : src->value.clone();
    out.sharded.push_back(split);
  }
  return out;
}

void gather_experts(const ShardedModel& part, const Parallel& par, CausalLM& full) {
  const auto& params = part.model->params().all();
  for (size_t i = 0; i < params.size(); ++i) {
    const nn::Param& p = params[i];
    nn::Param* dst = full.params().find(p.name);
    MF_CHECK(dst, "internal: parameter ", p.name, " is missing from the full model");
    // Fresh storage: the full model's values may be a read-only mapping of its checkpoint.
    if (part.sharded[i]) {
      MF_CHECK(par.ep, "internal: a sharded parameter without an expert-parallel group");
      Tensor all = Tensor::empty(dst->value.shape(), p.value.dtype());
      par.ep->all_gather(p.value, all);  // shards in rank order = expert order
      dst->value = all;
    } else {
      dst->value = p.value.clone();
    }
  }
}

}  // namespace moeforge::models
