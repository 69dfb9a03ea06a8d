// Bias rows and their gradient, the clip_qkv clamp and the shared expert's sigmoid gate on the
// device (CPU references in ops/cpu/bias_clamp_gate.cpp). All memory-bound: one read and at most one
// write of the activation; the bias gradients reduce rows in chunks, then the chunks in order.
#include "ops/cuda/check.h"
#include "ops/cuda/kernel_util.cuh"
#include "ops/cuda/ops_cuda.h"
#include "ops/cuda/runtime.h"

namespace moeforge::cuda {

using namespace detail;

namespace {

// Bias gradients are deterministic (the same bits on every run, which the parity tests rely on):
// rows are cut into chunks that never cross an expert boundary, each chunk's column sums go to its
// own row of a scratch buffer, and a second pass adds each expert's chunks in order.
constexpr int kBiasRowsPerChunk = 256;

// `chunk_rows` [2 * chunks] holds each chunk's [begin, end) rows; null: one group of `rows`, cut
// every kBiasRowsPerChunk (bias_grad, which then needs no upload and no host synchronisation).
// A block takes 32 packs of V columns (16 bytes where the width and address allow) of one chunk;
// its 8 warps each sum every 8th row of the chunk (row group g: rows r0 + g, r0 + g + 8, ...), and
// the 8 partial sums of a column are added in group order. A thread per column walking all 256 rows
// (the first form) was bound by that chain of dependent loads: 0.90 ms per GPT-OSS L4 step
// against a ~0.42 ms floor; packs alone made the chain no shorter (1.18 ms); this form 0.62 ms
// (docs/perf-notes.md).
constexpr int kBiasRowGroups = 8;

template <typename T, int V>
__global__ void chunk_column_sums_kernel(const T* dy, const int64_t* chunk_rows, int64_t rows, float* partial,
                                         int64_t n) {
  using P = Pack<T, V>;
  __shared__ float group_sums[kBiasRowGroups][32 * V];
  const int lane = threadIdx.x & 31, g = threadIdx.x >> 5;
  const int64_t pack = blockIdx.x * 32LL + lane, c = blockIdx.y;
  const int64_t r0 = chunk_rows ? chunk_rows[2 * c] : c * kBiasRowsPerChunk;
  const int64_t r1 = chunk_rows ? chunk_rows[2 * c + 1] : min(rows, r0 + kBiasRowsPerChunk);
  float s[V];
#pragma unroll
  for (int e = 0; e < V; ++e) s[e] = 0.f;
  if (pack * V < n) {
#pragma unroll 4
    for (int64_t r = r0 + g; r < r1; r += kBiasRowGroups) {
      const P p = reinterpret_cast<const P*>(dy + r * n)[pack];
#pragma unroll
      for (int e = 0; e < V; ++e) s[e] += load(p.v, e);
    }
  }
#pragma unroll
  for (int e = 0; e < V; ++e) group_sums[g][lane * V + e] = s[e];
  __syncthreads();
  for (int i = threadIdx.x; i < 32 * V; i += blockDim.x) {
    const int64_t col = blockIdx.x * 32LL * V + i;
    if (col >= n) continue;
    float t = 0.f;
#pragma unroll
    for (int q = 0; q < kBiasRowGroups; ++q) t += group_sums[q][i];
    partial[c * n + col] = t;
  }
}

// `expert_chunks` [experts + 1]: each expert's chunk range; null: one expert owning all `chunks`.
template <typename G>
__global__ void expert_chunk_sums_kernel(G* db, const float* partial, const int64_t* expert_chunks, int64_t chunks,
                                         int64_t experts, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < experts * n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t e = i / n, col = i % n;
    const int64_t c0 = expert_chunks ? expert_chunks[e] : 0, c1 = expert_chunks ? expert_chunks[e + 1] : chunks;
    float s = 0.f;
    for (int64_t c = c0; c < c1; ++c) s += partial[c * n + col];
    store(db, i, load(db, i) + s);
  }
}

// The two passes over `chunks` chunks of dy [rows, n]; `plan` (device I64: the chunks' row ranges,
// then the experts' chunk ranges) or, undefined, one group.
void column_sums_in_chunks(const Tensor& dy, const Tensor& plan, int64_t rows, int64_t chunks, int64_t experts,
                           int64_t n, Tensor& db) {
  Tensor partial = empty({chunks, n}, DType::F32, "bias gradient partial sums");
  const int64_t* chunk_rows = plan.defined() ? plan.data<int64_t>() : nullptr;
  const int64_t* expert_chunks = plan.defined() ? plan.data<int64_t>() + 2 * chunks : nullptr;
  dispatch_float(dy.dtype(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr int V = 16 / sizeof(T);
    const bool packed = packs_fit<T>(n, {dy.raw()});
    const int64_t cols_per_block = 32 * (packed ? V : 1);
    const dim3 grid(static_cast<unsigned>((n + cols_per_block - 1) / cols_per_block), static_cast<unsigned>(chunks));
    const int threads = 32 * kBiasRowGroups;
    if (packed)
      chunk_column_sums_kernel<T, V><<<grid, threads, 0, current_stream()>>>(dy.data<T>(), chunk_rows, rows, partial.data<float>(), n);
    else
      chunk_column_sums_kernel<T, 1><<<grid, threads, 0, current_stream()>>>(dy.data<T>(), chunk_rows, rows, partial.data<float>(), n);
  });
  dispatch_float(db.dtype(), [&](auto* tag) {
    using G = std::remove_pointer_t<decltype(tag)>;
    expert_chunk_sums_kernel<<<grid_stride_blocks(experts * n), kGridStrideThreads, 0, current_stream()>>>(
        db.data<G>(), partial.data<float>(), expert_chunks, chunks, experts, n);
  });
  MF_CUDA_CHECK_LAUNCH("bias gradient");
}


template <typename T>
__global__ void clamp_kernel(T* x, int64_t n, float c) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    store(x, i, fminf(fmaxf(load(x, i), -c), c));
}

template <typename T, typename U>
__global__ void clamp_backward_kernel(const U* u, T* dy, int64_t n, float c) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const float v = load(u, i);
    if (v < -c || v > c) store(dy, i, 0.f);
  }
}

template <typename T, typename L>
__global__ void add_sigmoid_gated_kernel(T* out, const T* y, const L* logit, int64_t t, int64_t h) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < t * h; i += (int64_t)gridDim.x * blockDim.x) {
    const float g = 1.f / (1.f + __expf(-load(logit, i / h)));
    store(out, i, load(out, i) + g * load(y, i));
  }
}

// One block per row: d_y = g dy; d_logit = sum(dy y) g (1 - g).
template <typename T, typename L>
__global__ void sigmoid_gated_backward_kernel(const T* dy, const T* y, const L* logit, T* d_y, L* d_logit, int64_t h) {
  const int64_t r = blockIdx.x;
  const float g = 1.f / (1.f + __expf(-load(logit, r)));
  float dot = 0.f;
  for (int64_t i = threadIdx.x; i < h; i += blockDim.x) {
    const float d = load(dy, r * h + i);
    dot += d * load(y, r * h + i);
    store(d_y, r * h + i, g * d);
  }
  dot = block_sum(dot);
  if (threadIdx.x == 0) store(d_logit, r, dot * g * (1.f - g));
}

// Rows grouped by expert (offsets [E+1]; null: one bias row for all): each row adds its expert's
// bias row. A warp per row: the expert is looked up once per row, and the row moves in packs of V
// elements (16 bytes where the width and addresses allow, else V = 1). The per-element grid-stride
// form (a binary search and a 64-bit division per element, 2-byte accesses) took 541 us per
// GPT-OSS gate_up call against a ~126 us floor (docs/perf-notes.md).
constexpr int kBiasRowWarps = 8;

template <typename T, typename B, int V>
__global__ void add_bias_rows_packed_kernel(T* y, const B* b, const int64_t* offsets, int64_t experts, int64_t rows,
                                            int64_t n) {
  using P = Pack<T, V>;
  const int lane = threadIdx.x & 31;
  const int64_t packs = n / V;
  for (int64_t r = blockIdx.x * (int64_t)kBiasRowWarps + (threadIdx.x >> 5); r < rows;
       r += (int64_t)gridDim.x * kBiasRowWarps) {
    int64_t lo = 0;
    if (offsets) {
      int64_t hi = experts;  // the expert e with offsets[e] <= r < offsets[e + 1]
      while (hi - lo > 1) {
        const int64_t mid = (lo + hi) / 2;
        if (offsets[mid] <= r) lo = mid;
        else hi = mid;
      }
    }
    P* yr = reinterpret_cast<P*>(y + r * n);
    const B* br = b + lo * n;
    for (int64_t p = lane; p < packs; p += 32) {
      P v = yr[p];
      float bv[V];
      if constexpr (V == 1) bv[0] = load(br, p);
      else load_f32<V>(br + p * V, bv);
#pragma unroll
      for (int e = 0; e < V; ++e) store(v.v, e, load(v.v, e) + bv[e]);
      yr[p] = v;
    }
  }
}

// y [rows, n] += the bias row of each row's group.
template <typename T, typename B>
void launch_add_bias_rows(T* y, const B* b, const int64_t* offsets, int64_t experts, int64_t rows, int64_t n) {
  constexpr int V = 16 / sizeof(T);
  // The bias rows in 16-byte packs too (an F32 bias under BF16 rows: two loads per pack, load_f32).
  const bool packed = packs_fit<T>(n, {y}) && packs_fit<B>(n, {b});
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((rows + kBiasRowWarps - 1) / kBiasRowWarps, 65535));
  if (packed)
    add_bias_rows_packed_kernel<T, B, V><<<blocks, 32 * kBiasRowWarps, 0, current_stream()>>>(y, b, offsets, experts, rows, n);
  else
    add_bias_rows_packed_kernel<T, B, 1><<<blocks, 32 * kBiasRowWarps, 0, current_stream()>>>(y, b, offsets, experts, rows, n);
}

Tensor device_offsets(const std::vector<int64_t>& offsets) {
  return to_device(Tensor::from_i64(offsets, {static_cast<int64_t>(offsets.size())}), DType::I64);
}

}  // namespace

void grouped_add_bias(Tensor& y, const Tensor& bias, const std::vector<int64_t>& offsets) {
  require_float(y, "grouped_add_bias");
  require_float(bias, "grouped_add_bias");
  const int64_t experts = static_cast<int64_t>(offsets.size()) - 1, n = y.numel() / std::max<int64_t>(offsets.back(), 1);
  MF_CHECK(experts >= 1 && bias.numel() == experts * n && y.numel() == offsets.back() * n,
           "grouped_add_bias: bias [", experts, ", ", n, "] for ", offsets.back(), " rows, got ", shape_str(bias.shape()));
  if (y.numel() == 0) return;
  const Tensor off = device_offsets(offsets);
  dispatch_float(y.dtype(), [&](auto* ty) {
    using T = std::remove_pointer_t<decltype(ty)>;
    dispatch_float(bias.dtype(), [&](auto* tb) {
      using B = std::remove_pointer_t<decltype(tb)>;
      launch_add_bias_rows(y.data<T>(), bias.data<B>(), off.data<int64_t>(), experts, offsets.back(), n);
    });
  });
  MF_CUDA_CHECK_LAUNCH("grouped_add_bias");
}

void grouped_bias_grad(const Tensor& dy, const std::vector<int64_t>& offsets, Tensor& db) {
  require_float(dy, "grouped_bias_grad");
  require_float(db, "grouped_bias_grad");
  const int64_t experts = static_cast<int64_t>(offsets.size()) - 1, rows = offsets.back();
  const int64_t n = experts >= 1 ? db.numel() / experts : 0;
  MF_CHECK(experts >= 1 && db.numel() == experts * n && dy.numel() == rows * n, "grouped_bias_grad: dy ",
           shape_str(dy.shape()), " and db ", shape_str(db.shape()), " do not agree with ", experts, " experts");
  if (dy.numel() == 0) return;
  // The chunks (host-side: the offsets are host values already), uploaded in one copy: each
  // chunk's row range, then each expert's chunk range.
  std::vector<int64_t> chunk_rows, expert_chunks{0};
  for (int64_t e = 0; e < experts; ++e) {
    for (int64_t r = offsets[e]; r < offsets[e + 1]; r += kBiasRowsPerChunk) {
      chunk_rows.push_back(r);
      chunk_rows.push_back(std::min(offsets[e + 1], r + kBiasRowsPerChunk));
    }
    expert_chunks.push_back(static_cast<int64_t>(chunk_rows.size() / 2));
  }
  const int64_t chunks = expert_chunks.back();
  chunk_rows.insert(chunk_rows.end(), expert_chunks.begin(), expert_chunks.end());
  const Tensor plan = to_device(Tensor::from_i64(chunk_rows, {static_cast<int64_t>(chunk_rows.size())}), DType::I64);
  column_sums_in_chunks(dy, plan, rows, chunks, experts, n, db);
}

void add_bias_rows(Tensor& y, const Tensor& bias) {
  require_float(y, "add_bias_rows");
  require_float(bias, "add_bias_rows");
  const int64_t n = bias.numel(), rows = y.numel() / std::max<int64_t>(n, 1);
  MF_CHECK(rows * n == y.numel(), "add_bias_rows: ", y.numel(), " values are not rows of ", n);
  if (y.numel() == 0) return;
  dispatch_float(y.dtype(), [&](auto* ty) {
    using T = std::remove_pointer_t<decltype(ty)>;
    dispatch_float(bias.dtype(), [&](auto* tb) {
      using B = std::remove_pointer_t<decltype(tb)>;
      launch_add_bias_rows(y.data<T>(), bias.data<B>(), nullptr, 1, rows, n);
    });
  });
  MF_CUDA_CHECK_LAUNCH("add_bias_rows");
}

void bias_grad(const Tensor& dy, Tensor& db) {
  require_float(dy, "bias_grad");
  require_float(db, "bias_grad");
  const int64_t n = db.numel(), rows = dy.numel() / std::max<int64_t>(n, 1);
  MF_CHECK(rows * n == dy.numel(), "bias_grad: ", dy.numel(), " values are not rows of ", n);
  if (dy.numel() == 0) return;
  // One group: the chunks follow from `rows` on the device (no upload, no host synchronisation).
  column_sums_in_chunks(dy, Tensor(), rows, (rows + kBiasRowsPerChunk - 1) / kBiasRowsPerChunk, 1, n, db);
}

void clamp_inplace(Tensor& x, float c) {
  require_float(x, "clamp_inplace");
  if (x.numel() == 0) return;
  dispatch_float(x.dtype(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    clamp_kernel<<<grid_stride_blocks(x.numel()), kGridStrideThreads, 0, current_stream()>>>(x.data<T>(), x.numel(), c);
  });
  MF_CUDA_CHECK_LAUNCH("clamp_inplace");
}

void clamp_backward_inplace(const Tensor& unclipped, Tensor& dy, float c) {
  require_float(unclipped, "clamp_backward");
  require_float(dy, "clamp_backward");
  MF_CHECK(unclipped.numel() == dy.numel(), "clamp_backward: sizes differ");
  if (dy.numel() == 0) return;
  dispatch_float(dy.dtype(), [&](auto* td) {
    using T = std::remove_pointer_t<decltype(td)>;
    dispatch_float(unclipped.dtype(), [&](auto* tu) {
      using U = std::remove_pointer_t<decltype(tu)>;
      clamp_backward_kernel<<<grid_stride_blocks(dy.numel()), kGridStrideThreads, 0, current_stream()>>>(
          unclipped.data<U>(), dy.data<T>(), dy.numel(), c);
    });
  });
  MF_CUDA_CHECK_LAUNCH("clamp_backward");
}

void add_sigmoid_gated(Tensor& out, const Tensor& y, const Tensor& logit) {
  require_float(out, "add_sigmoid_gated");
  MF_CHECK(out.dtype() == y.dtype() && out.numel() == y.numel(), "add_sigmoid_gated: out and y differ");
  require_float(logit, "add_sigmoid_gated");
  const int64_t t = logit.numel(), h = y.numel() / std::max<int64_t>(t, 1);
  MF_CHECK(t * h == y.numel(), "add_sigmoid_gated: ", y.numel(), " values are not ", t, " rows");
  if (y.numel() == 0) return;
  dispatch_float(y.dtype(), [&](auto* ty) {
    using T = std::remove_pointer_t<decltype(ty)>;
    dispatch_float(logit.dtype(), [&](auto* tl) {
      using L = std::remove_pointer_t<decltype(tl)>;
      add_sigmoid_gated_kernel<<<grid_stride_blocks(t * h), kGridStrideThreads, 0, current_stream()>>>(
          out.data<T>(), y.data<T>(), logit.data<L>(), t, h);
    });
  });
  MF_CUDA_CHECK_LAUNCH("add_sigmoid_gated");
}

void sigmoid_gated_backward(const Tensor& dy, const Tensor& y, const Tensor& logit, Tensor& d_y, Tensor& d_logit) {
  require_float(dy, "sigmoid_gated_backward");
  MF_CHECK(dy.dtype() == y.dtype() && dy.numel() == y.numel(), "sigmoid_gated_backward: dy and y differ");
  require_float(logit, "sigmoid_gated_backward");
  const int64_t t = logit.numel(), h = y.numel() / std::max<int64_t>(t, 1);
  MF_CHECK(t * h == y.numel(), "sigmoid_gated_backward: ", y.numel(), " values are not ", t, " rows");
  d_y = empty(y.shape(), y.dtype(), "gated output gradient");
  d_logit = empty(logit.shape(), logit.dtype(), "gate logit gradient");
  if (t == 0) return;
  dispatch_float(y.dtype(), [&](auto* ty) {
    using T = std::remove_pointer_t<decltype(ty)>;
    dispatch_float(logit.dtype(), [&](auto* tl) {
      using L = std::remove_pointer_t<decltype(tl)>;
      sigmoid_gated_backward_kernel<<<static_cast<unsigned>(t), threads_for(h), 0, current_stream()>>>(
          dy.data<T>(), y.data<T>(), logit.data<L>(), d_y.data<T>(), d_logit.data<L>(), h);
    });
  });
  MF_CUDA_CHECK_LAUNCH("sigmoid_gated_backward");
}

}  // namespace moeforge::cuda
