#include "train/gradients.h"

#include <cmath>
#include <cstdlib>
#include <string>

#include "ops/ops.h"

namespace moeforge::train {

namespace {

// The parameters that take gradients (buffers and LoRA-frozen weights have none).
std::vector<size_t> every_param(const nn::ParamAccess& ps) {
  std::vector<size_t> idx;
  for (size_t i = 0; i < ps.size(); ++i)
    if (ps.trainable(i)) idx.push_back(i);
  return idx;
}

double squared(const std::vector<Tensor>& grads, const std::vector<Tensor>& written_rows,
               const std::vector<Tensor>& partial_squares = {}) {
  if (grads.empty() && partial_squares.empty()) return 0.0;
  const double n = ops::global_grad_norm(grads, written_rows, partial_squares);
  return n * n;
}

// MOEFORGE_CLIP_IN_PLACE=1: clipping scales the gradients in place even where the optimizer could
// apply it as it reads them (the pass the deferred form saves, for `run.sh envab` to measure).
bool clip_in_place_forced() {
  static const bool yes = [] {
    const char* v = std::getenv("MOEFORGE_CLIP_IN_PLACE");
    return v && std::string(v) == "1";
  }();
  return yes;
}

// Each gradient of `idx` this rank holds: its ZeRO-3 block, or the whole.
std::vector<Tensor> held_gradients(nn::ParamAccess& ps, const std::vector<size_t>& idx) {
  std::vector<Tensor> grads;
  for (const size_t i : idx) grads.push_back(ps.block_grad(i) ? *ps.block_grad(i) : ps.grad(i));
  return grads;
}

}  // namespace

void sum_gradients(RankGroups* g, nn::ParamAccess& ps, const std::vector<size_t>& idx, GradSquares* sq) {
  if (!g && !sq) return;
  const bool device = !ps.device().is_cpu();
  // A list summed over ranks needs its gradients whole (an all-reduce reads every row); one that is
  // only squared keeps unwritten rows unwritten (the norm reads them as zeros).
  auto summed = [&](bool experts) {
    if (!g) return false;
    parallel::Communicator& group = experts ? (device ? *g->dev_edp : *g->edp) : (device ? *g->dev_world : *g->world_group);
    return group.size() > 1;
  };
  const bool sum_dense = summed(false), sum_experts = summed(true);
  std::vector<Tensor> dense, experts, blocks, dense_rows, expert_rows, dense_squares, expert_squares;
  for (const size_t i : idx) {
    if (!ps.trainable(i)) continue;
    if (Tensor* b = ps.block_grad(i)) {
      blocks.push_back(*b);
      continue;
    }
    const bool expert = g && g->expert_sharded.at(i);
    const bool sum = expert ? sum_experts : sum_dense;
    // A gradient whose writer left its sum of squares (and that no collective will change) is not
    // read again for the norm.
    if (sq && !sum)
      if (const Tensor* s = ps.grad_squares(i)) {
        (expert ? expert_squares : dense_squares).push_back(*s);
        continue;
      }
    std::vector<Tensor>& list = expert ? experts : dense;
    std::vector<Tensor>& rows = expert ? expert_rows : dense_rows;
    Tensor written;
    list.push_back(sum ? ps.grad(i) : ps.grad_as_written(i, written));
    rows.push_back(written);
  }
  if (g) {
    // One collective per group for all of them (per-tensor collectives cost a round trip each).
    parallel::Communicator& world = device ? *g->dev_world : *g->world_group;
    parallel::Communicator& edp = device ? *g->dev_edp : *g->edp;
    for (auto [list, group] : {std::pair{&dense, &world}, std::pair{&experts, &edp}}) {
      if (group->size() == 1 || list->empty()) continue;
      std::vector<Tensor*> ptrs;
      for (Tensor& t : *list) ptrs.push_back(&t);
      group->all_reduce_sum_many(ptrs);
    }
  }
  if (!sq) return;
  sq->dense += squared(dense, dense_rows, dense_squares);
  sq->experts += squared(experts, expert_rows, expert_squares);
  sq->blocks += squared(blocks, {});
}

double whole_norm(RankGroups* g, const GradSquares& sq) {
  if (!g) return std::sqrt(sq.dense + sq.experts + sq.blocks);
  // Dense squares count once; expert shards' add up over the expert-parallel group, ZeRO-3 blocks'
  // over the world (host F64 through gloo).
  auto sum_over = [](parallel::Communicator& group, double v) {
    Tensor t = Tensor::empty({1}, DType::F64);
    t.data<double>()[0] = v;
    group.all_reduce_sum(t);
    return t.data<double>()[0];
  };
  double total = sq.dense + sum_over(*g->ep, sq.experts);
  if (g->zero_stage == 3) total += sum_over(*g->world_group, sq.blocks);
  return std::sqrt(total);
}

double finish_gradients(RankGroups* g, nn::ParamAccess& ps, double max_norm, float* deferred_scale) {
  const std::vector<size_t> idx = every_param(ps);
  GradSquares sq;
  sum_gradients(g, ps, idx, &sq);
  const double norm = whole_norm(g, sq);
  const double coef = max_norm / (norm + 1e-6);
  const bool clip = max_norm > 0 && coef < 1.0;
  const bool defer = deferred_scale && !clip_in_place_forced();
  if (deferred_scale) *deferred_scale = clip && defer ? static_cast<float>(coef) : 1.f;
  if (clip && !defer) ops::scale_inplace(held_gradients(ps, idx), static_cast<float>(coef));
  return norm;
}

double clip_grad_norm(nn::ParamAccess& ps, double max_norm) { return finish_gradients(nullptr, ps, max_norm); }

double global_grad_norm(nn::ParamAccess& ps) { return finish_gradients(nullptr, ps, 0); }

}  // namespace moeforge::train
