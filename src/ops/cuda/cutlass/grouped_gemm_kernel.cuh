// Internal to ops/cuda/cutlass: the one template behind every CUTLASS grouped-GEMM instantiation.
// Each instantiation lives in its own .cu file because a Hopper CUTLASS kernel takes minutes to
// compile; separate files let the build compile them in parallel.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"

#include "core/error.h"
#include "core/tensor.h"
#include "ops/cuda/check.h"
#include "ops/cuda/grouped_product.h"
#include "ops/cuda/ops_cuda.h"
#include "ops/cuda/runtime.h"

namespace moeforge::cuda::cutlass_grouped {

// LayoutA/LayoutB in CUTLASS's terms (A is M x K, B is K x N): RowMajor A is K-contiguous,
// ColumnMajor B is K-contiguous. The tile (128 x 256 x 64, two consumer warp groups sharing it) is
// the shape that reaches dense-GEMM speed on H100 for BF16; experts with few rows waste part of a
// tile, which the persistent scheduler absorbs by handing the next tile to whichever SM is free.
template <class LayoutA, class LayoutB, class ElementD>
struct GroupedGemm {
  using ElementAB = cutlass::bfloat16_t;
  using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;
  using TileShape = cute::Shape<cute::_128, cute::_256, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  static constexpr int kAlignAB = 8;                             // 16 bytes of BF16
  static constexpr int kAlignD = 16 / static_cast<int>(sizeof(ElementD));

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, ElementD, cutlass::layout::RowMajor*, kAlignD,
      ElementD, cutlass::layout::RowMajor*, kAlignD, cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
      cutlass::epilogue::fusion::LinearCombination<ElementD, float>>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementAB, LayoutA*, kAlignAB, ElementAB, LayoutB*, kAlignAB,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
  using Shape3 = typename ProblemShape::UnderlyingProblemShape;

  // Each stride has one unit mode (the contiguous one) and one dynamic mode, the row stride.
  template <class S>
  static S with_row_stride(int64_t ld) {
    S s{};
    if constexpr (cute::is_static<cute::remove_cvref_t<decltype(cute::get<0>(s))>>::value)
      cute::get<1>(s) = ld;
    else
      cute::get<0>(s) = ld;
    return s;
  }

  static void run(const std::vector<GroupedProduct>& ps, float beta) {
    const size_t g = ps.size();
    // Everything the kernel reads per group goes to the device in one copy: shapes, the four
    // pointer arrays (C is D: the epilogue reads it only when beta != 0), and the strides.
    struct Layout {
      size_t shapes, a, b, d, sa, sb, sd, total;
    } at{};
    size_t off = 0;
    const auto place = [&](size_t bytes) {
      const size_t here = off;
      off += (bytes + 15) / 16 * 16;
      return here;
    };
    at.shapes = place(g * sizeof(Shape3));
    at.a = place(g * sizeof(void*));
    at.b = place(g * sizeof(void*));
    at.d = place(g * sizeof(void*));
    at.sa = place(g * sizeof(StrideA));
    at.sb = place(g * sizeof(StrideB));
    at.sd = place(g * sizeof(StrideD));
    at.total = off;

    std::vector<unsigned char> host(at.total);
    std::vector<Shape3> host_shapes(g);
    const auto slot = [&](size_t base, size_t i, size_t size) { return host.data() + base + i * size; };
    for (size_t i = 0; i < g; ++i) {
      const GroupedProduct& p = ps[i];
      host_shapes[i] = Shape3{static_cast<int>(p.m), static_cast<int>(p.n), static_cast<int>(p.k)};
      const StrideA sa = with_row_stride<StrideA>(p.lda);
      const StrideB sb = with_row_stride<StrideB>(p.ldb);
      const StrideD sd = with_row_stride<StrideD>(p.ldc);
      std::memcpy(slot(at.shapes, i, sizeof(Shape3)), &host_shapes[i], sizeof(Shape3));
      std::memcpy(slot(at.a, i, sizeof(void*)), &p.a, sizeof(void*));
      std::memcpy(slot(at.b, i, sizeof(void*)), &p.b, sizeof(void*));
      std::memcpy(slot(at.d, i, sizeof(void*)), &p.c, sizeof(void*));
      std::memcpy(slot(at.sa, i, sizeof(StrideA)), &sa, sizeof(StrideA));
      std::memcpy(slot(at.sb, i, sizeof(StrideB)), &sb, sizeof(StrideB));
      std::memcpy(slot(at.sd, i, sizeof(StrideD)), &sd, sizeof(StrideD));
    }
    Tensor dev = empty({static_cast<int64_t>(at.total)}, DType::U8, "CUTLASS grouped GEMM problem arrays");
    MF_CUDA_CHECK(cudaMemcpyAsync(dev.raw(), host.data(), at.total, cudaMemcpyHostToDevice, current_stream()));
    auto* base = static_cast<unsigned char*>(dev.raw());
    const auto as = [&](size_t o) { return static_cast<void*>(base + o); };

    typename Gemm::Arguments args;
    args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
    args.problem_shape = {static_cast<int>(g), static_cast<Shape3*>(as(at.shapes)), host_shapes.data()};
    args.mainloop = {static_cast<const ElementAB**>(as(at.a)), static_cast<StrideA*>(as(at.sa)),
                     static_cast<const ElementAB**>(as(at.b)), static_cast<StrideB*>(as(at.sb))};
    args.epilogue.thread.alpha = 1.f;
    args.epilogue.thread.beta = beta;
    args.epilogue.ptr_C = static_cast<const ElementD**>(as(at.d));
    args.epilogue.dC = static_cast<StrideD*>(as(at.sd));
    args.epilogue.ptr_D = static_cast<ElementD**>(as(at.d));
    args.epilogue.dD = static_cast<StrideD*>(as(at.sd));
    args.hw_info.device_id = 0;
    MF_CUDA_CHECK(cudaGetDevice(&args.hw_info.device_id));
    args.hw_info.sm_count = cuda::sm_count();

    Gemm gemm;
    const cutlass::Status ok = gemm.can_implement(args);
    MF_CHECK(ok == cutlass::Status::kSuccess, "CUTLASS grouped GEMM cannot run these ", g,
             " products: ", cutlassGetStatusString(ok));
    const size_t ws_bytes = Gemm::get_workspace_size(args);
    Tensor ws = empty({static_cast<int64_t>(ws_bytes > 0 ? ws_bytes : 1)}, DType::U8, "CUTLASS grouped GEMM workspace");
    cutlass::Status st = gemm.initialize(args, ws.raw(), current_stream());
    MF_CHECK(st == cutlass::Status::kSuccess, "CUTLASS grouped GEMM initialize: ", cutlassGetStatusString(st));
    st = gemm.run(current_stream());
    MF_CHECK(st == cutlass::Status::kSuccess, "CUTLASS grouped GEMM launch: ", cutlassGetStatusString(st));
    MF_CUDA_CHECK_LAUNCH("the CUTLASS grouped GEMM");
  }
};

}  // namespace moeforge::cuda::cutlass_grouped
