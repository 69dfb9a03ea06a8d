// Column moves of latent attention on the device (CPU references in ops/cpu/columns.cpp): split
// and join projections, broadcast the shared rotary key over heads and sum its gradient back,
// DeepSeek's interleaved RoPE pairs. Memory-bound gathers, one thread per element written.
#include "ops/cuda/check.h"
#include "ops/cuda/kernel_util.cuh"
#include "ops/cuda/ops_cuda.h"
#include "ops/cuda/runtime.h"

namespace moeforge::cuda {

using namespace detail;

namespace {

template <typename S, typename D>
__global__ void copy_columns_kernel(const S* src, int64_t src_width, int64_t src_c0, int64_t src_row_div, D* dst,
                                    int64_t dst_width, int64_t dst_c0, int64_t n, int64_t rows, bool add) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < rows * n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / n, c = i % n;
    const float v = load(src, (r / src_row_div) * src_width + src_c0 + c);
    const int64_t o = r * dst_width + dst_c0 + c;
    store(dst, o, add ? load(dst, o) + v : v);
  }
}

template <typename T>
__global__ void sum_row_groups_kernel(const T* src, int64_t src_width, int64_t src_c0, int64_t n, int64_t group,
                                      T* out, int64_t rows) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < rows * n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / n, c = i % n;
    float s = 0.f;
    for (int64_t g = 0; g < group; ++g) s += load(src, (r * group + g) * src_width + src_c0 + c);
    store(out, i, s);
  }
}

// forward: out[r, i] = x[r, 2i], out[r, half + i] = x[r, 2i + 1]; backward the other way.
template <typename T>
__global__ void pairs_kernel(const T* x, T* out, int64_t rows, int64_t d, bool deinterleave) {
  const int64_t half = d / 2;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < rows * half; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / half, j = i % half;
    if (deinterleave) {
      store(out, r * d + j, load(x, r * d + 2 * j));
      store(out, r * d + half + j, load(x, r * d + 2 * j + 1));
    } else {
      store(out, r * d + 2 * j, load(x, r * d + j));
      store(out, r * d + 2 * j + 1, load(x, r * d + half + j));
    }
  }
}

Tensor pairs(const Tensor& x, int64_t d, bool deinterleave) {
  require_float(x, "interleave_pairs");
  MF_CHECK(d % 2 == 0 && x.numel() % d == 0, "interleave_pairs: rows of ", d, " values");
  Tensor out = empty(x.shape(), x.dtype(), "RoPE pairs");
  const int64_t rows = x.numel() / d;
  if (rows == 0) return out;
  dispatch_float(x.dtype(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    pairs_kernel<<<grid_stride_blocks(rows * d / 2), kGridStrideThreads, 0, current_stream()>>>(x.data<T>(), out.data<T>(),
                                                                                                rows, d, deinterleave);
  });
  MF_CUDA_CHECK_LAUNCH("interleave_pairs");
  return out;
}

}  // namespace

void copy_columns(const Tensor& src, int64_t src_width, int64_t src_c0, int64_t src_row_div, Tensor& dst,
                  int64_t dst_width, int64_t dst_c0, int64_t n, bool add) {
  require_float(src, "copy_columns");
  require_float(dst, "copy_columns");
  const int64_t rows = dst.numel() / dst_width;
  MF_CHECK(src_c0 + n <= src_width && dst_c0 + n <= dst_width && src_row_div >= 1 &&
               src.numel() >= (rows / src_row_div) * src_width,
           "copy_columns: columns [", src_c0, ", ", src_c0 + n, ") of width ", src_width, " into [", dst_c0, ", ",
           dst_c0 + n, ") of width ", dst_width);
  if (rows * n == 0) return;
  dispatch_float(src.dtype(), [&](auto* ts) {
    using S = std::remove_pointer_t<decltype(ts)>;
    dispatch_float(dst.dtype(), [&](auto* td) {
      using D = std::remove_pointer_t<decltype(td)>;
      copy_columns_kernel<<<grid_stride_blocks(rows * n), kGridStrideThreads, 0, current_stream()>>>(
          src.data<S>(), src_width, src_c0, src_row_div, dst.data<D>(), dst_width, dst_c0, n, rows, add);
    });
  });
  MF_CUDA_CHECK_LAUNCH("copy_columns");
}

Tensor sum_row_groups(const Tensor& src, int64_t src_width, int64_t src_c0, int64_t n, int64_t group) {
  require_float(src, "sum_row_groups");
  const int64_t rows = src.numel() / src_width / group;
  Tensor out = empty({rows, n}, src.dtype(), "row group sums");
  if (rows * n == 0) return out;
  dispatch_float(src.dtype(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    sum_row_groups_kernel<<<grid_stride_blocks(rows * n), kGridStrideThreads, 0, current_stream()>>>(
        src.data<T>(), src_width, src_c0, n, group, out.data<T>(), rows);
  });
  MF_CUDA_CHECK_LAUNCH("sum_row_groups");
  return out;
}

Tensor deinterleave_pairs(const Tensor& x, int64_t d) { return pairs(x, d, true); }
Tensor interleave_pairs(const Tensor& x, int64_t d) { return pairs(x, d, false); }

}  // namespace moeforge::cuda
