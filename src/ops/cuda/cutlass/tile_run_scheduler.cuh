// Internal to ops/cuda/cutlass: a persistent tile scheduler for the grouped (ptr-array) GEMMs
// that hands each SM runs of consecutive tiles, so that consecutive tiles of one SM mostly belong
// to one group.
//
// Why: CUTLASS's group scheduler gives SM c the tiles c, c + grid, c + 2 grid, ... of the tiles of
// all groups laid end to end. An expert's weight gradient at q30 shapes has 96 tiles (a 1536 x 2048
// dW in 128 x 256 tiles), fewer than the 132 SMs, so every tile an SM takes belongs to a new group;
// and on every change of group the kernel rewrites the TMA descriptors of A, B and D in global
// memory and fences them before the next load or store (docs/perf-notes.md: the weight gradient at
// 56% of DRAM bandwidth, its warps waiting on global loads 34% of the time). With runs of Run
// consecutive tiles per SM the group changes Run times less often.
//
// Order: step s of SM c takes tile (r * grid + c) * Run + j with r = s / Run, j = s % Run, for as
// many whole rounds (grid * Run tiles) as the problem has; the tiles left after the last whole
// round go round-robin, one at a time, as in CUTLASS's scheduler, so that the end of the launch is
// as balanced as before. Every SM's sequence of tiles increases, which the group lookup it inherits
// needs (it only searches forward from the group of the previous tile).
//
// Opt-in (MOEFORGE_CUTLASS_TILE_RUNS, grouped_gemm_cutlass.cpp) until its speed is measured.
#pragma once
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/sm90_tile_scheduler_group.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"

namespace moeforge::cuda::cutlass_grouped {

// The grouped problem shape, as its own type so that the kernel built over it picks the scheduler
// below (CUTLASS chooses the scheduler from the problem shape's type, among others).
template <int Run>
struct TileRunProblemShape : cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>> {};

template <class GroupProblemShape, int Stages, int Run>
class TileRunScheduler : public cutlass::gemm::kernel::detail::PersistentTileSchedulerSm90Group<GroupProblemShape, Stages> {
  using Base = cutlass::gemm::kernel::detail::PersistentTileSchedulerSm90Group<GroupProblemShape, Stages>;
  static_assert(Run >= 1);

 public:
  using typename Base::Params;
  using typename Base::SchedulerResponse;
  using typename Base::WorkTileInfo;

  TileRunScheduler() = default;

  CUTLASS_DEVICE TileRunScheduler(Params const& params, SchedulerResponse* response) : Base(params, response) {
#if defined(__CUDA_ARCH__)
    // The same SM numbering as the base (a 1 x 1 cluster: the grid is 1-D along the raster order).
    cta_ = params.raster_order_ == Base::RasterOrder::AlongN ? uint64_t(blockIdx.x) + uint64_t(blockIdx.y) * gridDim.x
                                                             : uint64_t(blockIdx.x) * gridDim.y + uint64_t(blockIdx.y);
    grid_ = uint64_t(gridDim.x) * gridDim.y * gridDim.z;
    // With host shapes (always, in grouped_gemm_kernel.cuh) the total is known; without, treat
    // every tile as part of whole rounds (the base's lookup ends the launch past the last group).
    const uint64_t total = params.pre_processed_problem_shapes ? params.blocks_across_problem_ : ~uint64_t(0) / 2;
    whole_rounds_ = total / (grid_ * Run);
#endif
  }

  template <class ClusterShape>
  CUTLASS_DEVICE WorkTileInfo initial_work_tile_info(ClusterShape) {
    return this->get_current_work_for_linear_idx(linear_index(0));
  }

  template <typename Pipeline, typename PipelineState>
  CUTLASS_DEVICE auto advance_to_next_work(Pipeline& pipeline, PipelineState producer_state, uint32_t advance_count = 1) {
    step_ += advance_count;
    WorkTileInfo work = this->get_current_work_for_linear_idx(linear_index(step_));
    pipeline.producer_acquire(producer_state);
    if (cute::elect_one_sync()) {
      this->response_ptr_[producer_state.index()] = work;
      cutlass::arch::fence_view_async_shared();
      pipeline.producer_commit(producer_state);
    }
    return cute::make_tuple(work, true);
  }

 private:
  CUTLASS_DEVICE uint64_t linear_index(uint64_t step) const {
    const uint64_t round = step / Run;
    if (round < whole_rounds_) return (round * grid_ + cta_) * Run + step % Run;
    const uint64_t past = step - whole_rounds_ * Run;  // the remainder, one tile per SM at a time
    return whole_rounds_ * grid_ * Run + past * grid_ + cta_;
  }

  uint64_t cta_ = 0, grid_ = 1, step_ = 0, whole_rounds_ = 0;
};

}  // namespace moeforge::cuda::cutlass_grouped

namespace cutlass::gemm::kernel::detail {

// A kernel over TileRunProblemShape<Run> gets the scheduler above (more specialised than
// CUTLASS's own choice for grouped problems, which stays for every other problem shape).
template <class TileShape, class ClusterShape, uint32_t Stages, int Run>
struct TileSchedulerSelector<GroupScheduler, arch::Sm90, TileShape, ClusterShape, Stages,
                             moeforge::cuda::cutlass_grouped::TileRunProblemShape<Run>> {
  static_assert(cute::size(ClusterShape{}) == 1, "tile runs assume a 1 x 1 cluster");
  using Scheduler = moeforge::cuda::cutlass_grouped::TileRunScheduler<
      moeforge::cuda::cutlass_grouped::TileRunProblemShape<Run>, static_cast<int>(Stages), Run>;
};

}  // namespace cutlass::gemm::kernel::detail
