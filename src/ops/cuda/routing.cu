// Token permutation for the experts. plan_routing gives every (token, slot) a row of the permuted
// buffer: one block per expert walks the T*k assignments in order and numbers its own with a
// block-wide prefix count, so rows are grouped by expert and in token order within an expert,
// identically on every run. The gathers (permute, unpermute and their backward) read whole rows;
// unpermute sums a token's k expert outputs in slot order in F32, with no atomics.
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "ops/cuda/check.h"
#include "ops/cuda/kernel_util.cuh"
#include "ops/cuda/ops_cuda.h"
#include "ops/cuda/runtime.h"

namespace moeforge::cuda {

using namespace detail;

namespace {

// counts[e] += 1 for every assignment to e; counts[experts] flags an index out of range.
__global__ void count_kernel(const int64_t* idx, int64_t n, int64_t experts, int64_t* counts) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t e = idx[i];
    if (e < 0 || e >= experts) {
      atomicExch(reinterpret_cast<unsigned long long*>(counts + experts), 1ull);
      continue;
    }
    atomicAdd(reinterpret_cast<unsigned long long*>(counts + e), 1ull);
  }
}

// offsets[0] = 0, offsets[e + 1] = counts[0] + ... + counts[e], by one warp: each lane sums a run
// of consecutive experts, the lanes' sums are scanned with shuffles, then each lane writes its run.
__global__ void offsets_kernel(const int64_t* counts, int64_t experts, int64_t* offsets) {
  const int lane = threadIdx.x;
  const int64_t per = (experts + 31) / 32, first = lane * per, last = first + per < experts ? first + per : experts;
  int64_t sum = 0;
  for (int64_t e = first; e < last; ++e) sum += counts[e];
  int64_t before = sum;  // inclusive scan over lanes, then made exclusive
  for (int d = 1; d < 32; d <<= 1) {
    const int64_t other = __shfl_up_sync(0xffffffffu, before, d);
    if (lane >= d) before += other;
  }
  before -= sum;
  if (lane == 0) offsets[0] = 0;
  for (int64_t e = first; e < last; ++e) {
    before += counts[e];
    offsets[e + 1] = before;
  }
}

// Block e numbers the assignments to expert e in order: rank = offsets[e] + (earlier matches).
// Warp w of a tile of 32 x 1024 assignments reads its 1024 in 32 coalesced rows of 32 (one 8-byte
// index a lane), keeping each row's ballot of matches; one block scan of the warps' totals then
// places every match: a lane's rank in its row is the ballot's bits below it. (A thread reading 32
// consecutive indices, its loads 256 bytes apart from its neighbours', took 23 us a q30 layer; 32
// steps of 1024 with three barriers each took 41, session 19's kernel table.)
// 512 threads: a lane keeps 32 ballots in registers, more than 1024 threads' 64 registers each
// would hold.
constexpr int kRankRows = 32;  // rows of 32 assignments a warp takes per tile
constexpr int kRankThreads = 512;
__global__ void __launch_bounds__(kRankThreads) rank_kernel(const int64_t* idx, int64_t n, const int64_t* offsets,
                                                             int64_t* dest) {
  const int64_t e = blockIdx.x;
  __shared__ int64_t carry;  // this expert's assignments numbered in earlier tiles, plus offsets[e]
  __shared__ int warp_sums[kRankThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  if (threadIdx.x == 0) carry = offsets[e];
  const int64_t per_warp = 32 * kRankRows, tile = per_warp * warps;
  for (int64_t start = 0; start < n; start += tile) {
    const int64_t first = start + warp * per_warp;
    uint32_t ballots[kRankRows];
    int total = 0;  // the same in every lane
#pragma unroll
    for (int j = 0; j < kRankRows; ++j) {
      const int64_t i = first + j * 32 + lane;
      ballots[j] = __ballot_sync(0xffffffffu, i < n && idx[i] == e);
      total += __popc(ballots[j]);
    }
    if (lane == 0) warp_sums[warp] = total;
    __syncthreads();  // the warps' sums (and, on the first tile, carry) are visible
    int64_t next = carry;
    for (int w = 0; w < warp; ++w) next += warp_sums[w];
    const uint32_t below = (1u << lane) - 1u;
#pragma unroll
    for (int j = 0; j < kRankRows; ++j) {
      if (ballots[j] & (1u << lane)) dest[first + j * 32 + lane] = next + __popc(ballots[j] & below);
      next += __popc(ballots[j]);
    }
    __syncthreads();  // every thread has read carry and the warps' sums
    if (threadIdx.x == 0) {
      int64_t sum = 0;
      for (int w = 0; w < warps; ++w) sum += warp_sums[w];
      carry += sum;
    }
    __syncthreads();
  }
}

// The row kernels below give each row (a (token, slot) pair, or a token) to one warp, which moves
// it in packs of V elements: 16 bytes when the rows and pointers allow (V = 16 / sizeof(T)), else
// one element. A block per row, or a thread per element with a 64-bit division each, spent their
// time on scheduling and index arithmetic rather than on the 2-8 KB rows (docs/perf-notes.md).
constexpr int kRowWarps = 8;  // rows per block

__device__ __forceinline__ int64_t warp_row() {
  return blockIdx.x * (int64_t)kRowWarps + (threadIdx.x >> 5);
}

// xp[dest[a]] = x[a / k] for every (token, slot) pair a. A pair the plan could not place (an expert
// index out of range: dest -1, reported when the plan's offsets are finished) is skipped, since a
// started plan's permute may run before that check.
template <typename T, int V>
__global__ void permute_kernel(const T* x, const int64_t* dest, T* xp, int64_t tk, int64_t k, int64_t h) {
  const int64_t a = warp_row();
  if (a >= tk) return;
  const int64_t row = dest[a];
  if (row < 0 || row >= tk) return;
  const auto* src = reinterpret_cast<const Pack<T, V>*>(x + (a / k) * h);
  auto* dst = reinterpret_cast<Pack<T, V>*>(xp + row * h);
  for (int64_t c = threadIdx.x & 31; c < h / V; c += 32) dst[c] = src[c];
}

// y[tok] = sum_j w[tok, j] yp[dest[tok, j]] (w null: weight 1, permute's backward), in F32, in slot order.
template <typename T, int V>
__global__ void combine_rows_kernel(const T* yp, const float* w, const int64_t* dest, T* y, int64_t t, int64_t k,
                                    int64_t h) {
  const int64_t tok = warp_row();
  if (tok >= t) return;
  auto* out = reinterpret_cast<Pack<T, V>*>(y + tok * h);
  for (int64_t c = threadIdx.x & 31; c < h / V; c += 32) {
    float acc[V];
#pragma unroll
    for (int e = 0; e < V; ++e) acc[e] = 0.f;
    for (int64_t j = 0; j < k; ++j) {
      const float wj = w ? w[tok * k + j] : 1.f;
      const Pack<T, V> in = reinterpret_cast<const Pack<T, V>*>(yp + dest[tok * k + j] * h)[c];
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] += wj * load(in.v, e);
    }
    Pack<T, V> o;
#pragma unroll
    for (int e = 0; e < V; ++e) store(o.v, e, acc[e]);
    out[c] = o;
  }
}

template <typename T>
__global__ void gather_rows_kernel(const T* in, const int64_t* index, T* out, int64_t n, int64_t h) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n * h; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = in[index[i / h] * h + i % h];
}

// d_yp[dest[a]] = w[a] dy[a / k] and d_w[a] = <dy[a / k], yp[dest[a]]> for every pair a.
template <typename T, int V>
__global__ void unpermute_backward_kernel(const T* dy, const T* yp, const float* w, const int64_t* dest, T* dyp,
                                          float* dw, int64_t tk, int64_t k, int64_t h) {
  const int64_t a = warp_row();
  if (a >= tk) return;
  const int64_t row = dest[a];
  const float wa = w[a];
  const auto* g_row = reinterpret_cast<const Pack<T, V>*>(dy + (a / k) * h);
  const auto* y_row = reinterpret_cast<const Pack<T, V>*>(yp + row * h);
  auto* d_row = reinterpret_cast<Pack<T, V>*>(dyp + row * h);
  float dot = 0.f;
  for (int64_t c = threadIdx.x & 31; c < h / V; c += 32) {
    const Pack<T, V> g = g_row[c], yv = y_row[c];
    Pack<T, V> o;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float ge = load(g.v, e);
      store(o.v, e, wa * ge);
      dot += ge * load(yv.v, e);
    }
    d_row[c] = o;
  }
  for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
  if ((threadIdx.x & 31) == 0) dw[a] = dot;
}

// `rows` rows, one warp each: the packed kernel where packs fit, else the element one.
template <typename... Params, typename... Args>
void launch_rows(int64_t rows, bool packed, void (*packed_kernel)(Params...), void (*element_kernel)(Params...),
                 Args... args) {
  if (rows == 0) return;
  const unsigned blocks = static_cast<unsigned>((rows + kRowWarps - 1) / kRowWarps);
  (packed ? packed_kernel : element_kernel)<<<blocks, 32 * kRowWarps, 0, current_stream()>>>(args...);
}

void check_plan(const RoutingPlan& p, const Tensor& x, int64_t rows_expected, const char* op) {
  MF_CHECK(p.dest_row.defined(), op, ": empty routing plan");
  MF_CHECK(x.dim() == 2 && x.shape()[0] == rows_expected, op, ": expected ", rows_expected, " rows, got ", shape_str(x.shape()));
}

// Pinned host memory for the counts' trip to the host (a copy into pageable memory would hold the
// host at the call until it is done, which a started plan is there to avoid): slots reused once no
// plan refers to them, kept for the life of the process (as the cuBLAS handle is).
struct PinnedCounts {
  int64_t* host = nullptr;
  size_t capacity = 0;  // int64 values
  cudaEvent_t copied = nullptr;
};

std::shared_ptr<PinnedCounts> pinned_counts(size_t values) {
  static std::mutex mu;
  static std::vector<std::shared_ptr<PinnedCounts>> slots;
  std::lock_guard<std::mutex> lock(mu);
  for (const auto& s : slots)
    if (s.use_count() == 1 && s->capacity >= values) return s;
  auto s = std::make_shared<PinnedCounts>();
  s->capacity = values < 1024 ? 1024 : values;
  MF_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&s->host), s->capacity * sizeof(int64_t)));
  MF_CUDA_CHECK(cudaEventCreateWithFlags(&s->copied, cudaEventDisableTiming));
  slots.push_back(s);
  return s;
}

// MOEFORGE_PLAN_SYNC=1: finish every plan where it starts (the host waits before dest_row is
// computed), as before started plans; for measuring them.
bool plans_finish_at_once() {
  static const bool yes = [] {
    const char* v = std::getenv("MOEFORGE_PLAN_SYNC");
    return v && std::strcmp(v, "1") == 0;
  }();
  return yes;
}

}  // namespace

// The counts, their offsets (scanned on the device) and dest_row are queued back to back; the
// counts travel to pinned host memory in between, and finish_offsets waits for that copy only.
RoutingPlan plan_routing_started(const Tensor& idx, int64_t experts) {
  MF_CHECK(idx.dtype() == DType::I64 && idx.dim() == 2, "plan_routing: expert indices must be I64 [T,k]");
  RoutingPlan p;
  p.num_experts = experts;
  p.top_k = idx.shape()[1];
  const int64_t n = idx.numel();
  Tensor counts = empty({experts + 1}, DType::I64, "routing counts");  // and the range flag, last
  MF_CUDA_CHECK(cudaMemsetAsync(counts.raw(), 0, counts.nbytes(), current_stream()));
  if (n > 0)
    count_kernel<<<grid_stride_blocks(n), kGridStrideThreads, 0, current_stream()>>>(idx.data<int64_t>(), n, experts,
                                                                                      counts.data<int64_t>());
  Tensor offsets = empty({experts + 1}, DType::I64, "routing offsets");
  offsets_kernel<<<1, 32, 0, current_stream()>>>(counts.data<int64_t>(), experts, offsets.data<int64_t>());
  MF_CUDA_CHECK_LAUNCH("routing count");
  std::shared_ptr<PinnedCounts> slot = pinned_counts(static_cast<size_t>(experts + 1));
  MF_CUDA_CHECK(cudaMemcpyAsync(slot->host, counts.raw(), counts.nbytes(), cudaMemcpyDeviceToHost, current_stream()));
  MF_CUDA_CHECK(cudaEventRecord(slot->copied, current_stream()));
  p.dest_row = empty(idx.shape(), DType::I64, "routing destination rows");
  if (n > 0) MF_CUDA_CHECK(cudaMemsetAsync(p.dest_row.raw(), 0xFF, p.dest_row.nbytes(), current_stream()));  // -1
  if (n > 0 && experts > 0)
    rank_kernel<<<experts, kRankThreads, 0, current_stream()>>>(idx.data<int64_t>(), n, offsets.data<int64_t>(),
                                                                 p.dest_row.data<int64_t>());
  MF_CUDA_CHECK_LAUNCH("routing rank");
  p.finish_offsets = [slot, experts](RoutingPlan& plan) {
    MF_CUDA_CHECK(cudaEventSynchronize(slot->copied));
    MF_CHECK(slot->host[experts] == 0, "plan_routing: an expert index is outside [0, ", experts, ")");
    plan.offsets.assign(static_cast<size_t>(experts + 1), 0);
    for (int64_t e = 0; e < experts; ++e) plan.offsets[e + 1] = plan.offsets[e] + slot->host[e];
  };
  if (plans_finish_at_once()) p.finish();
  return p;
}

RoutingPlan plan_routing(const Tensor& idx, int64_t experts) {
  RoutingPlan p = plan_routing_started(idx, experts);
  p.finish();
  return p;
}

Tensor permute_tokens(const Tensor& x, const RoutingPlan& p) {
  require_float(x, "permute_tokens");
  const int64_t t = p.dest_row.shape()[0], h = x.shape()[1];
  check_plan(p, x, t, "permute_tokens");
  Tensor xp = empty({t * p.top_k, h}, x.dtype(), "permuted tokens");
  if (t * h == 0) return xp;
  dispatch_float(x.dtype(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr int V = 16 / sizeof(T);
    launch_rows(t * p.top_k, packs_fit<T>(h, {x.raw(), xp.raw()}), permute_kernel<T, V>, permute_kernel<T, 1>,
                x.data<T>(), static_cast<const int64_t*>(p.dest_row.data<int64_t>()), xp.data<T>(), t * p.top_k, p.top_k, h);
  });
  MF_CUDA_CHECK_LAUNCH("permute");
  return xp;
}

Tensor unpermute_tokens(const Tensor& yp, const Tensor& weights, const RoutingPlan& p) {
  require_float(yp, "unpermute_tokens");
  const int64_t t = p.dest_row.shape()[0], h = yp.shape()[1];
  check_plan(p, yp, t * p.top_k, "unpermute_tokens");
  MF_CHECK(weights.dtype() == DType::F32 && weights.numel() == t * p.top_k, "unpermute_tokens: weights must be F32 [T,k]");
  Tensor y = empty({t, h}, yp.dtype(), "unpermuted tokens");
  if (t * h == 0) return y;
  dispatch_float(yp.dtype(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr int V = 16 / sizeof(T);
    launch_rows(t, packs_fit<T>(h, {yp.raw(), y.raw()}), combine_rows_kernel<T, V>, combine_rows_kernel<T, 1>,
                static_cast<const T*>(yp.data<T>()), static_cast<const float*>(weights.data<float>()),
                static_cast<const int64_t*>(p.dest_row.data<int64_t>()), y.data<T>(), t, p.top_k, h);
  });
  MF_CUDA_CHECK_LAUNCH("unpermute");
  return y;
}

void unpermute_tokens_backward(const Tensor& dy, const Tensor& yp, const Tensor& weights, const RoutingPlan& p,
                               Tensor& d_yp, Tensor& d_weights) {
  require_float(dy, "unpermute_tokens_backward");
  const int64_t t = p.dest_row.shape()[0], h = dy.shape()[1];
  check_plan(p, yp, t * p.top_k, "unpermute_tokens_backward");
  d_yp = empty(yp.shape(), yp.dtype(), "permuted output gradient");
  d_weights = empty({t, p.top_k}, DType::F32, "routing weight gradient");
  if (t == 0) return;
  dispatch_float(dy.dtype(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr int V = 16 / sizeof(T);
    launch_rows(t * p.top_k, packs_fit<T>(h, {dy.raw(), yp.raw(), d_yp.raw()}), unpermute_backward_kernel<T, V>,
                unpermute_backward_kernel<T, 1>, static_cast<const T*>(dy.data<T>()), static_cast<const T*>(yp.data<T>()),
                static_cast<const float*>(weights.data<float>()), static_cast<const int64_t*>(p.dest_row.data<int64_t>()),
                d_yp.data<T>(), d_weights.data<float>(), t * p.top_k, p.top_k, h);
  });
  MF_CUDA_CHECK_LAUNCH("unpermute backward");
}

Tensor permute_tokens_backward(const Tensor& d_xp, const RoutingPlan& p) {
  require_float(d_xp, "permute_tokens_backward");
  const int64_t t = p.dest_row.shape()[0], h = d_xp.shape()[1];
  check_plan(p, d_xp, t * p.top_k, "permute_tokens_backward");
  Tensor dx = empty({t, h}, d_xp.dtype(), "token gradient");
  if (t * h == 0) return dx;
  dispatch_float(d_xp.dtype(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr int V = 16 / sizeof(T);
    launch_rows(t, packs_fit<T>(h, {d_xp.raw(), dx.raw()}), combine_rows_kernel<T, V>, combine_rows_kernel<T, 1>,
                static_cast<const T*>(d_xp.data<T>()), static_cast<const float*>(nullptr),
                static_cast<const int64_t*>(p.dest_row.data<int64_t>()), dx.data<T>(), t, p.top_k, h);
  });
  MF_CUDA_CHECK_LAUNCH("permute backward");
  return dx;
}

Tensor gather_rows(const Tensor& in, const Tensor& index) {
  require_float(in, "gather_rows");
  MF_CHECK(in.dim() == 2, "gather_rows: expected [rows, H], got ", shape_str(in.shape()));
  MF_CHECK(index.dtype() == DType::I64 && index.dim() == 1, "gather_rows: index must be I64 [n]");
  const int64_t n = index.numel(), h = in.shape()[1];
  Tensor out = empty({n, h}, in.dtype(), "gathered rows");
  if (n * h == 0) return out;
  dispatch_float(in.dtype(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    gather_rows_kernel<<<grid_stride_blocks(n * h), kGridStrideThreads, 0, current_stream()>>>(
        in.data<T>(), index.data<int64_t>(), out.data<T>(), n, h);
  });
  MF_CUDA_CHECK_LAUNCH("gather rows");
  return out;
}

}  // namespace moeforge::cuda
