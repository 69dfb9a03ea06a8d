// Internal to ops/cuda/cutlass: the experts' weight gradients as one ragged-K kernel of our own.
//
// dW[e] (n x k) = dY[rows of e]^T X[rows of e], where the experts' rows are consecutive ranges of
// the same two tensors. CUTLASS's kernel for arrays of problems treats every expert as its own
// problem: on every change of expert a CTA rewrites the TMA descriptors of A, B and D in global
// memory and fences them, and at q30 shapes (96 tiles per expert, 132 SMs) nearly every tile is a
// change (docs/perf-notes.md, sessions 15-16). Here there is one descriptor per operand for all
// experts: dY and X are described whole (rows = the reduction), and an expert's tile walks
// ceil(rows / 64) k tiles starting at its first row (TMA boxes start at any row); the last k tile
// can hold rows of the next experts, which each consumer warp group zeroes in its part of A (dY)
// in shared memory before its tensor-core MMAs read it. D is dW as a batch of E matrices (one
// descriptor, L = E). Experts without rows have no tiles (the caller zeroes or flags them).
//
// Building blocks are CUTLASS's Hopper collectives (the mainloop's shared-memory layouts and TMA
// descriptors, the TMA epilogue); the kernel body (roles, the producer's loads from each expert's
// first row, persistent CTAs taking tiles longest expert first from a counter, the masked consumer
// loop) is ours. Overwrites dW (beta = 0); accumulating into a gradient keeps the grouped path.
// Optionally each tile also leaves dW's sum of squares in partial sums (RaggedWeightGradArgs::
// squares), from the accumulators as the epilogue rounds them, for the gradient norm.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cute/tensor.hpp"
#include "cutlass/arch/barrier.h"
#include "cutlass/arch/reg_reconfig.h"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/pipeline/pipeline.hpp"

#include "core/error.h"
#include "core/tensor.h"
#include "ops/cuda/check.h"
#include "ops/cuda/cutlass/grouped_gemm_cutlass.h"
#include "ops/cuda/cutlass/tile_queue.cuh"
#include "ops/cuda/ops_cuda.h"
#include "ops/cuda/runtime.h"

namespace moeforge::cuda::cutlass_grouped {

// One expert's rows and the k tiles that cover them, in the order the tiles are handed out.
struct ExpertRowSpan {
  int32_t expert;
  int32_t row_begin, row_end;
  int32_t k_tile_count;  // ceil((row_end - row_begin) / 64)
};

template <class ElementD_>
struct RaggedWeightGrad {
  using ElementD = ElementD_;
  using ElementAB = cutlass::bfloat16_t;
  using TileShape = cute::Shape<cute::_128, cute::_256, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  static constexpr int kTileM = kRaggedTileM, kTileN = kRaggedTileN, kTileK = 64;
  static constexpr int kAlignAB = 8;  // 16 bytes of BF16
  static constexpr int kAlignD = 16 / static_cast<int>(sizeof(ElementD));

  // A = dY^T (M = n, K = rows, M contiguous), B = X (N = k, K = rows, N contiguous), D = dW (row
  // major per expert, L = experts). C is void: the gradient is written, never read.
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, cutlass::layout::RowMajor, kAlignD, ElementD,
      cutlass::layout::RowMajor, kAlignD, cutlass::epilogue::TmaWarpSpecializedCooperative,
      cutlass::epilogue::fusion::LinearCombination<ElementD, float>>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementAB, cutlass::layout::ColumnMajor, kAlignAB, ElementAB,
      cutlass::layout::RowMajor, kAlignAB, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;

  using TiledMma = typename Mainloop::TiledMma;
  using MainloopPipeline = typename Mainloop::MainloopPipeline;
  using PipelineState = typename Mainloop::PipelineState;
  using EpiLoadPipeline = typename Epilogue::LoadPipeline;
  using EpiStorePipeline = typename Epilogue::StorePipeline;
  // Tiles are handed out at run time (tile_queue.cuh), longest expert first: with native
  // routing's skew the tiles differ in length by 100x, and a static stride over that order would
  // give the first CTAs the longest tile of every wave.
  using Queue = TileQueue<4>;
  static constexpr int kMmaThreads = 256;  // two consumer warp groups share a 128 x 256 tile
  static constexpr int kThreads = 384;     // plus one producer warp group
  static_assert(cute::size(TiledMma{}) == kMmaThreads, "two consumer warp groups");

  struct SharedStorage {
    struct Pipelines : cute::aligned_struct<16, cute::_1> {
      alignas(16) typename Mainloop::PipelineStorage mainloop;
      alignas(16) typename Epilogue::PipelineStorage epi_load;
      alignas(16) typename Queue::SharedStorage queue;
    } pipelines;
    struct Tensors : cute::aligned_struct<128, cute::_1> {
      typename Epilogue::TensorStorage epilogue;
      typename Mainloop::TensorStorage mainloop;
    } tensors;
  };

  struct Params {
    typename Mainloop::Params mainloop;
    typename Epilogue::Params epilogue;
    const ExpertRowSpan* spans;
    float* squares;  // null, or kRaggedSquaresPerTile partial sums per tile
    int* next_tile;  // zero at launch; tiles after the first gridDim.x are taken from it
    int m, n, rows, experts;
    int spans_count;  // experts with rows
    int m_tiles, n_tiles;
  };

  // Zeroes, in this warp group's rows of A (dY^T: m_base .. m_base + 63) in `stage`, the k rows of
  // the expert's k tile `k_tile` past its last row (they belong to the next experts), then makes
  // the writes visible to the tensor cores (async proxy) before any thread of the warp group issues
  // its MMAs. The condition is the same for the whole group; full k tiles return at once.
  template <class SmemA>
  static __device__ void mask_rows(SmemA& sA, int stage, int k_tile, const ExpertRowSpan& span, int m_base,
                                   int wg_thread, int warp_group_idx) {
    const int first_row = span.row_begin + k_tile * kTileK;
    const int hi = min(span.row_end - first_row, kTileK);
    if (hi == kTileK) return;
    constexpr int kWgRows = kTileM / 2;
    for (int i = wg_thread; i < (kTileK - hi) * kWgRows; i += cutlass::NumThreadsPerWarpGroup)
      sA(m_base + i % kWgRows, hi + i / kWgRows, stage) = ElementAB(0.f);
    cutlass::arch::fence_view_async_shared();
    cutlass::arch::NamedBarrier::sync(cutlass::NumThreadsPerWarpGroup, static_cast<uint32_t>(warp_group_idx));
  }

  // The producer's loads of one tile: the collective's TMA copies, but over dY and X with their k
  // axis shifted to the expert's first row. Called by the whole producer warp; one lane issues.
  template <class TensorA, class TensorB>
  static __device__ void load_tile(const Params& params, MainloopPipeline& pipeline, PipelineState write,
                                   const TensorA& mA, const TensorB& mB, int m_blk, int n_blk, const ExpertRowSpan& span,
                                   typename Mainloop::TensorStorage& smem) {
    using namespace cute;
    using X = Underscore;
    if (!cute::elect_one_sync()) return;
    cute::Tensor sA = make_tensor(make_smem_ptr(smem.smem_A.data()), typename Mainloop::SmemLayoutA{});
    cute::Tensor sB = make_tensor(make_smem_ptr(smem.smem_B.data()), typename Mainloop::SmemLayoutB{});
    cute::Tensor gA = local_tile(domain_offset(make_coord(0, span.row_begin, 0), mA), TileShape{}, make_coord(_, _, _),
                                 Step<_1, X, _1>{})(_, _, m_blk, _, 0);  // (BLK_M, BLK_K, k)
    cute::Tensor gB = local_tile(domain_offset(make_coord(0, span.row_begin, 0), mB), TileShape{}, make_coord(_, _, _),
                                 Step<X, _1, _1>{})(_, _, n_blk, _, 0);  // (BLK_N, BLK_K, k)
    auto tma_a = params.mainloop.tma_load_a.get_slice(0);
    auto tma_b = params.mainloop.tma_load_b.get_slice(0);
    cute::Tensor tAgA = tma_a.partition_S(gA);
    cute::Tensor tAsA = tma_a.partition_D(sA);
    cute::Tensor tBgB = tma_b.partition_S(gB);
    cute::Tensor tBsB = tma_b.partition_D(sB);
    for (int k = 0; k < span.k_tile_count; ++k) {
      pipeline.producer_acquire(write);
      auto* barrier = pipeline.producer_get_barrier(write);
      const int stage = write.index();
      copy(params.mainloop.tma_load_a.with(*barrier, 0), tAgA(_, _, _, k), tAsA(_, _, _, stage));
      copy(params.mainloop.tma_load_b.with(*barrier, 0), tBgB(_, _, _, k), tBsB(_, _, _, stage));
      ++write;
    }
  }

  // The consumer's mainloop: the collective's pipelined WGMMA loop (one batch in flight, a stage
  // released as soon as the MMAs after it are issued) with the boundary rows masked. Consumes and
  // releases all `span.k_tile_count` stages, advancing `read`.
  template <class Accum>
  static __device__ void mma(MainloopPipeline& pipeline, PipelineState& read, Accum& accum, const ExpertRowSpan& span,
                             int mma_thread_idx, typename Mainloop::TensorStorage& smem) {
    using namespace cute;
    cute::Tensor sA = make_tensor(make_smem_ptr(smem.smem_A.data()), typename Mainloop::SmemLayoutA{});  // (M, K, PIPE)
    cute::Tensor sB = make_tensor(make_smem_ptr(smem.smem_B.data()), typename Mainloop::SmemLayoutB{});  // (N, K, PIPE)
    const int warp_group_idx = __shfl_sync(0xffffffff, mma_thread_idx / cutlass::NumThreadsPerWarpGroup, 0);
    const int wg_thread = mma_thread_idx % cutlass::NumThreadsPerWarpGroup;
    TiledMma tiled_mma;
    auto thread_mma = tiled_mma.get_slice(warp_group_idx * cutlass::NumThreadsPerWarpGroup);
    cute::Tensor tCsA = thread_mma.partition_A(sA);
    cute::Tensor tCsB = thread_mma.partition_B(sB);
    cute::Tensor tCrA = thread_mma.make_fragment_A(tCsA);
    cute::Tensor tCrB = thread_mma.make_fragment_B(tCsB);
    // This warp group's rows of A: 64 consecutive m from the first of its (m, k) coordinates.
    cute::Tensor tCcA = thread_mma.partition_A(make_identity_tensor(make_shape(Int<kTileM>{}, Int<kTileK>{})));
    static_assert(decltype(size(tCcA))::value == kTileM / 2 * kTileK, "a warp group holds half of A's rows");
    const int m_base = get<0>(tCcA(0));

    PipelineState release = read;
    int k_tile = 0;
    int remaining = span.k_tile_count;

    warpgroup_fence_operand(accum);
    {
      pipeline.consumer_wait(read, pipeline.consumer_try_wait(read));
      const int stage = read.index();
      mask_rows(sA, stage, k_tile, span, m_base, wg_thread, warp_group_idx);
      warpgroup_arrive();
      tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
      CUTLASS_PRAGMA_UNROLL
      for (int k_block = 0; k_block < size<2>(tCrA); ++k_block) {
        cute::gemm(tiled_mma, tCrA(_, _, k_block, stage), tCrB(_, _, k_block, stage), accum);
        tiled_mma.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();
      ++read;
      ++k_tile;
      --remaining;
    }
    warpgroup_fence_operand(accum);
    CUTLASS_PRAGMA_NO_UNROLL
    for (; remaining > 0; --remaining) {
      pipeline.consumer_wait(read, pipeline.consumer_try_wait(read));
      const int stage = read.index();
      mask_rows(sA, stage, k_tile, span, m_base, wg_thread, warp_group_idx);
      warpgroup_fence_operand(accum);
      warpgroup_arrive();
      cute::gemm(tiled_mma, tCrA(_, _, _, stage), tCrB(_, _, _, stage), accum);
      warpgroup_commit_batch();
      warpgroup_wait<1>();  // the previous stage's MMAs are done: give it back to the producer
      warpgroup_fence_operand(accum);
      pipeline.consumer_release(release);
      ++read;
      ++release;
      ++k_tile;
    }
    warpgroup_wait<0>();
    warpgroup_fence_operand(accum);
    pipeline.consumer_release(release);
  }

  // This tile's share of dW's sum of squares: each consumer warp squares its threads' accumulators as
  // the epilogue stores them (rounded to ElementD by the same cvt.rn) and leaves one partial sum
  // (fixed order: the same bits every run). Positions past dW's n rows or k columns hold zeros (TMA
  // fills what lies outside dY and X with zeros, and rows of other experts are masked), so the
  // tile's sum is its stored elements'. The accumulators are only read: the epilogue follows.
  template <class Accum>
  static __device__ void store_squares(float* squares, int tile, const Accum& accum, int mma_thread_idx) {
    static_assert(kMmaThreads / cutlass::NumThreadsPerWarp == kRaggedSquaresPerTile, "one partial per consumer warp");
    float s = 0.f;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < cute::size(accum); ++i) {
      const float v = static_cast<float>(ElementD(accum(i)));
      s += v * v;
    }
    CUTLASS_PRAGMA_UNROLL
    for (int offset = 16; offset > 0; offset /= 2) s += __shfl_xor_sync(0xffffffff, s, offset);
    if (mma_thread_idx % cutlass::NumThreadsPerWarp == 0)
      squares[static_cast<int64_t>(tile) * kRaggedSquaresPerTile + mma_thread_idx / cutlass::NumThreadsPerWarp] = s;
  }

  static __device__ void device(const Params& params, char* smem_buf) {
    using namespace cute;
    SharedStorage& smem = *reinterpret_cast<SharedStorage*>(smem_buf);
    const int thread_idx = static_cast<int>(threadIdx.x);
    const int warp_idx = cutlass::canonical_warp_idx_sync();
    const int warp_group = cutlass::canonical_warp_group_idx();
    const int warp_in_group = warp_idx % cutlass::NumWarpsPerWarpGroup;
    const int lane_idx = cutlass::canonical_lane_idx();
    const int mma_thread_idx = thread_idx % kMmaThreads;  // as CUTLASS's cooperative kernel numbers them
    const bool producer_group = warp_group == 0;

    if (warp_idx == 0 && cute::elect_one_sync()) {
      Mainloop::prefetch_tma_descriptors(params.mainloop);
      Epilogue::prefetch_tma_descriptors(params.epilogue);
    }

    typename MainloopPipeline::Params mp;
    if (producer_group && warp_in_group == 0) mp.role = MainloopPipeline::ThreadCategory::Producer;
    if (!producer_group) mp.role = MainloopPipeline::ThreadCategory::Consumer;
    mp.is_leader = thread_idx % cutlass::NumThreadsPerWarpGroup == 0;
    mp.num_consumers = kMmaThreads;
    mp.transaction_bytes = params.mainloop.tma_transaction_bytes;
    MainloopPipeline pipeline(smem.pipelines.mainloop, mp, ClusterShape{});

    // The epilogue's load pipeline carries C, which this kernel never reads; its store takes it.
    typename EpiLoadPipeline::Params lp;
    if (!producer_group) lp.role = EpiLoadPipeline::ThreadCategory::Consumer;
    lp.dst_blockid = cute::block_rank_in_cluster();
    lp.producer_arv_count = cutlass::NumThreadsPerWarp;
    lp.consumer_arv_count = kMmaThreads;
    lp.transaction_bytes = params.epilogue.tma_transaction_bytes;
    EpiLoadPipeline epi_load(smem.pipelines.epi_load, lp);
    typename EpiStorePipeline::Params sp;
    sp.always_wait = true;
    EpiStorePipeline epi_store(sp);
    auto queue = Queue::make(smem.pipelines.queue, producer_group && warp_in_group == 0, !producer_group, kMmaThreads);
    __syncthreads();  // barriers initialised before anyone waits on them

    const auto epilogue_shape = make_shape(params.m, params.n, params.rows, params.experts);
    const int tiles_per_expert = params.m_tiles * params.n_tiles;
    const int tiles = tiles_per_expert * params.spans_count;
    const auto tile_of = [&](int t, int& m_blk, int& n_blk) -> const ExpertRowSpan& {
      const int within = t % tiles_per_expert;
      m_blk = within % params.m_tiles;
      n_blk = within / params.m_tiles;
      return params.spans[t / tiles_per_expert];
    };
    Mainloop mainloop;

    if (producer_group) {
      cutlass::arch::warpgroup_reg_dealloc<40>();
      if (warp_in_group != 0) return;
      auto mA = params.mainloop.tma_load_a.get_tma_tensor(make_shape(params.m, params.rows, 1));  // (M, K, L)
      auto mB = params.mainloop.tma_load_b.get_tma_tensor(make_shape(params.n, params.rows, 1));  // (N, K, L)
      PipelineState write = cutlass::make_producer_start_state<MainloopPipeline>();
      typename Queue::State published = cutlass::make_producer_start_state<typename Queue::Pipeline>();
      for (int t = static_cast<int>(blockIdx.x);; t = Queue::next(params.next_tile, lane_idx)) {
        Queue::publish(queue, smem.pipelines.queue, published, t, lane_idx);  // past the last: the end
        if (t >= tiles) break;
        int m_blk, n_blk;
        const ExpertRowSpan span = tile_of(t, m_blk, n_blk);
        load_tile(params, pipeline, write, mA, mB, m_blk, n_blk, span, smem.tensors.mainloop);
        write.advance(span.k_tile_count);
      }
      mainloop.load_tail(pipeline, write);
      return;
    }

    cutlass::arch::warpgroup_reg_alloc<232>();
    Epilogue epilogue(params.epilogue, smem.tensors.epilogue);
    TiledMma tiled_mma;
    PipelineState read;
    typename Epilogue::LoadPipelineState epi_load_state;
    typename Epilogue::StorePipelineState epi_store_state = cutlass::make_producer_start_state<EpiStorePipeline>();
    bool stored = false;
    typename Queue::State taken;
    for (;;) {
      const int t = Queue::take(queue, smem.pipelines.queue, taken);
      if (t >= tiles) break;
      int m_blk, n_blk;
      const ExpertRowSpan span = tile_of(t, m_blk, n_blk);
      auto accum = partition_fragment_C(tiled_mma, take<0, 2>(TileShape{}));
      mma(pipeline, read, accum, span, mma_thread_idx, smem.tensors.mainloop);
      if (params.squares) store_squares(params.squares, t, accum, mma_thread_idx);
      auto [load_next, store_next] =
          epilogue.store(epi_load, epi_load_state, epi_store, epi_store_state, epilogue_shape, TileShape{},
                         make_coord(m_blk, n_blk, _, span.expert), accum, tiled_mma, mma_thread_idx, smem.tensors.epilogue);
      epi_load_state = load_next;
      epi_store_state = store_next;
      stored = true;
    }
    if (stored) epilogue.store_tail(epi_load, epi_load_state, epi_store, epi_store_state);
  }

  // Host side: the spans (longest first, so the last wave is of short tiles), the descriptors, one
  // launch of at most one CTA per SM.
  static void run(const RaggedWeightGradArgs& a) {
    using namespace cute;
    const int experts = static_cast<int>(a.offsets.size()) - 1;
    // Experts without rows are not tiles here: the caller zeroes their blocks at bandwidth (a tile
    // of zeros through the epilogue cost ~5 us, most of a skewed layer's launch, session 20).
    std::vector<ExpertRowSpan> spans;
    for (int e = 0; e < experts; ++e) {
      const int b = static_cast<int>(a.offsets[e]), r = static_cast<int>(a.offsets[e + 1]);
      if (r == b) continue;
      spans.push_back({e, b, r, (r - b + kTileK - 1) / kTileK});
    }
    if (spans.empty()) return;
    std::stable_sort(spans.begin(), spans.end(),
                     [](const ExpertRowSpan& x, const ExpertRowSpan& y) { return x.k_tile_count > y.k_tile_count; });
    // One upload: the tile counter (zero) in the first 16 bytes, the spans after it.
    std::vector<unsigned char> host(16 + spans.size() * sizeof(ExpertRowSpan), 0);
    std::memcpy(host.data() + 16, spans.data(), spans.size() * sizeof(ExpertRowSpan));
    moeforge::Tensor dev = empty({static_cast<int64_t>(host.size())}, DType::U8, "ragged weight-gradient spans");
    MF_CUDA_CHECK(cudaMemcpyAsync(dev.raw(), host.data(), host.size(), cudaMemcpyHostToDevice, current_stream()));

    const int m = static_cast<int>(a.n), n = static_cast<int>(a.k), rows = static_cast<int>(a.rows);
    typename Mainloop::Arguments ml{};
    ml.ptr_A = static_cast<const ElementAB*>(a.dy);
    get<1>(ml.dA) = a.ld_dy;
    get<2>(ml.dA) = a.ld_dy * a.rows;
    ml.ptr_B = static_cast<const ElementAB*>(a.x);
    get<1>(ml.dB) = a.ld_x;
    get<2>(ml.dB) = a.ld_x * a.rows;
    typename Epilogue::Arguments ep{};
    ep.thread.alpha = 1.f;
    ep.thread.beta = 0.f;
    ep.ptr_C = nullptr;
    ep.ptr_D = static_cast<ElementD*>(a.dw);
    get<0>(ep.dD) = a.k;
    get<2>(ep.dD) = a.n * a.k;
    const auto mainloop_shape = make_shape(m, n, rows, 1);
    const auto epilogue_shape = make_shape(m, n, rows, experts);
    MF_CHECK(Mainloop::can_implement(mainloop_shape, ml) && Epilogue::can_implement(epilogue_shape, ep),
             "ragged weight gradient: shapes or strides not aligned for TMA (n ", a.n, ", k ", a.k, ")");

    Params p{};
    p.mainloop = Mainloop::to_underlying_arguments(mainloop_shape, ml, nullptr);
    p.epilogue = Epilogue::to_underlying_arguments(epilogue_shape, ep, nullptr);
    p.next_tile = static_cast<int*>(dev.raw());
    p.spans = reinterpret_cast<const ExpertRowSpan*>(static_cast<unsigned char*>(dev.raw()) + 16);
    p.squares = a.squares;
    p.m = m;
    p.n = n;
    p.rows = rows;
    p.experts = experts;
    p.spans_count = static_cast<int>(spans.size());
    p.m_tiles = (m + kTileM - 1) / kTileM;
    p.n_tiles = (n + kTileN - 1) / kTileN;
    const int tiles = p.m_tiles * p.n_tiles * p.spans_count;
    MF_CHECK(!a.squares || ragged_weight_grad_square_slots(a) == static_cast<int64_t>(tiles) * kRaggedSquaresPerTile,
             "internal: ragged weight gradient: square slots and tiles disagree");
    const int grid = std::min(tiles, cuda::sm_count());
    launch(p, grid);
    MF_CUDA_CHECK_LAUNCH("the ragged weight-gradient kernel");
  }

  static void launch(const Params& p, int grid);
};

template <class Op>
__global__ void __launch_bounds__(Op::kThreads, 1) ragged_weight_grad_kernel(const __grid_constant__ typename Op::Params params) {
  extern __shared__ char smem[];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  Op::device(params, smem);
#else
  (void)params;
  (void)smem;
#endif
}

template <class ElementD>
void RaggedWeightGrad<ElementD>::launch(const Params& p, int grid) {
  constexpr int smem_bytes = static_cast<int>(sizeof(SharedStorage));
  static const bool attributes_set = [] {
    MF_CUDA_CHECK(cudaFuncSetAttribute(ragged_weight_grad_kernel<RaggedWeightGrad<ElementD>>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
    return true;
  }();
  (void)attributes_set;
  ragged_weight_grad_kernel<RaggedWeightGrad<ElementD>><<<grid, kThreads, smem_bytes, current_stream()>>>(p);
}

}  // namespace moeforge::cuda::cutlass_grouped
