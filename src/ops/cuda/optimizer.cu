// Multi-tensor optimizer kernels. A chunk table (tensor index, element range) goes to the device
// once per call and each block takes one 64K-element chunk, so a model's hundreds of parameters
// cost one launch instead of one each. AdamW reads w, g, m, v and writes w, m, v: 16-28 bytes per
// element, so its floor is the parameter count times that at HBM bandwidth. Aligned tensors move
// in 16-byte vectors (8 elements per thread per iteration).
#include <cstdlib>
#include <string>
#include <vector>

#include "ops/cuda/check.h"
#include "ops/cuda/kernel_util.cuh"
#include "ops/cuda/ops_cuda.h"
#include "ops/cuda/runtime.h"

namespace moeforge::cuda {

using namespace detail;

namespace {

constexpr int64_t kChunk = 65536;
constexpr int kThreads = 512;

struct TensorRef {
  void* w;
  void* g;
  void* m;
  void* v;
  __nv_bfloat16* w_copy;  // optional BF16 working copy of F32 master weights, refreshed after the update
  // Optional: per row of row_elems elements, whether the gradient was written there (0: it counts
  // as zeros and is not read, which saves its 2-4 bytes per element where whole experts or most of
  // an embedding's rows got no tokens).
  const uint8_t* written;
  int64_t row_elems;
  int64_t n;
  float wd_mul;
  uint8_t w_bf16, g_bf16, mv_bf16;
  uint8_t vec_ok;  // every pointer 16-byte aligned: groups of 8 elements move as 16-byte vectors
};
struct Chunk {
  int32_t tensor;
  int64_t begin, end;
};

__device__ __forceinline__ float ld(const void* p, bool bf16, int64_t i) {
  return bf16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]) : static_cast<const float*>(p)[i];
}
__device__ __forceinline__ void st(void* p, bool bf16, int64_t i, float v) {
  if (bf16) static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16(v);
  else static_cast<float*>(p)[i] = v;
}

// V consecutive elements at i (a multiple of V in a 16-byte aligned tensor) as F32: one 16-byte
// (V = 8) or 8-byte (V = 4) load of BF16, V / 4 16-byte loads of F32.
template <int V>
struct Bf16Pack;
template <>
struct Bf16Pack<8> {
  using Raw = uint4;
};
template <>
struct Bf16Pack<4> {
  using Raw = uint2;
};

template <int V>
__device__ __forceinline__ void ldv(const void* p, bool bf16, int64_t i, float* out) {
  if (bf16) {
    const auto raw = *reinterpret_cast<const typename Bf16Pack<V>::Raw*>(static_cast<const __nv_bfloat16*>(p) + i);
    const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&raw);
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = __bfloat162float(h[k]);
  } else {
#pragma unroll
    for (int q = 0; q < V / 4; ++q) {
      const float4 a = *reinterpret_cast<const float4*>(static_cast<const float*>(p) + i + 4 * q);
      out[4 * q] = a.x, out[4 * q + 1] = a.y, out[4 * q + 2] = a.z, out[4 * q + 3] = a.w;
    }
  }
}
template <int V>
__device__ __forceinline__ void stv(void* p, bool bf16, int64_t i, const float* v) {
  if (bf16) {
    typename Bf16Pack<V>::Raw raw;
    __nv_bfloat16* h = reinterpret_cast<__nv_bfloat16*>(&raw);
#pragma unroll
    for (int k = 0; k < V; ++k) h[k] = __float2bfloat16(v[k]);
    *reinterpret_cast<typename Bf16Pack<V>::Raw*>(static_cast<__nv_bfloat16*>(p) + i) = raw;
  } else {
#pragma unroll
    for (int q = 0; q < V / 4; ++q)
      *reinterpret_cast<float4*>(static_cast<float*>(p) + i + 4 * q) =
          make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
  }
}

// Whether element i's gradient row was written, for a thread whose i only grows: one division when
// the thread starts, then a step over each row boundary i passes (a division per element would cost
// more issue slots than the memory-bound kernels have to spare). Always true without flags.
struct RowWalk {
  const uint8_t* written;
  int64_t row_elems, row = 0, next = 0;  // the current row, and the first element after it
  __device__ RowWalk(const TensorRef& r, int64_t first) : written(r.written), row_elems(r.row_elems) {
    if (!written) return;
    row = first / row_elems;
    next = (row + 1) * row_elems;
  }
  __device__ __forceinline__ bool at(int64_t i) {
    if (!written) return true;
    while (i >= next) {
      ++row;
      next += row_elems;
    }
    return written[row] != 0;
  }
};

// V elements a thread moves at once (8: 16-byte BF16 vectors; 4: 8-byte ones, fewer registers),
// and at least MinBlocks blocks per SM (a register cap for the compiler: 2 leaves it 64 registers).
// The bf16 policy's chunk (w, g, m, v all BF16, no working copy, aligned), software-pipelined:
// each thread loads its next group's four vectors before it computes the current one, so its loads
// stay in flight through the arithmetic (two IEEE divisions and a square root per element).
// Returns the first element it left to the element-wise tail.
template <int V>
__device__ __forceinline__ int64_t adamw_bf16_pipelined(const TensorRef& r, const Chunk& c, const ops::AdamWScalars& s) {
  using Raw = typename Bf16Pack<V>::Raw;
  const auto base = [&](const void* p) { return reinterpret_cast<const Raw*>(static_cast<const __nv_bfloat16*>(p) + c.begin); };
  const Raw *pw = base(r.w), *pg = base(r.g), *pm = base(r.m), *pv = base(r.v);
  const int64_t groups = (c.end - c.begin) / V;
  RowWalk rows(r, c.begin + threadIdx.x * V);
  Raw w{}, g{}, m{}, v{};
  const auto fetch = [&](int64_t gi) {
    w = pw[gi];
    g = rows.at(c.begin + gi * V) ? pg[gi] : Raw{};  // BF16 zeros are zero bits
    m = pm[gi];
    v = pv[gi];
  };
  int64_t gi = threadIdx.x;
  if (gi < groups) fetch(gi);
  for (; gi < groups; gi += blockDim.x) {
    const Raw cw = w, cg = g, cm = m, cv = v;
    if (gi + blockDim.x < groups) fetch(gi + blockDim.x);
    const __nv_bfloat16 *hw = reinterpret_cast<const __nv_bfloat16*>(&cw), *hg = reinterpret_cast<const __nv_bfloat16*>(&cg),
                        *hm = reinterpret_cast<const __nv_bfloat16*>(&cm), *hv = reinterpret_cast<const __nv_bfloat16*>(&cv);
    Raw ow, om, ov;
    __nv_bfloat16 *qw = reinterpret_cast<__nv_bfloat16*>(&ow), *qm = reinterpret_cast<__nv_bfloat16*>(&om),
                  *qv = reinterpret_cast<__nv_bfloat16*>(&ov);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      float fw = __bfloat162float(hw[k]), fm = __bfloat162float(hm[k]), fv = __bfloat162float(hv[k]);
      ops::adamw_element(fw, __bfloat162float(hg[k]), fm, fv, r.wd_mul, s);
      qw[k] = __float2bfloat16(fw);
      qm[k] = __float2bfloat16(fm);
      qv[k] = __float2bfloat16(fv);
    }
    const int64_t i = c.begin + gi * V;
    *reinterpret_cast<Raw*>(static_cast<__nv_bfloat16*>(r.w) + i) = ow;
    *reinterpret_cast<Raw*>(static_cast<__nv_bfloat16*>(r.m) + i) = om;
    *reinterpret_cast<Raw*>(static_cast<__nv_bfloat16*>(r.v) + i) = ov;
  }
  return c.begin + groups * V;
}

template <int V, int MinBlocks, bool Pipelined = false>
__global__ void __launch_bounds__(kThreads, MinBlocks) adamw_kernel(const TensorRef* refs, const Chunk* chunks, ops::AdamWScalars s) {
  const Chunk c = chunks[blockIdx.x];
  const TensorRef r = refs[c.tensor];
  int64_t tail = c.begin;
  if (Pipelined && r.vec_ok && r.w_bf16 && r.g_bf16 && r.mv_bf16 && !r.w_copy) {
    tail = adamw_bf16_pipelined<V>(r, c, s);
  } else if (r.vec_ok) {
    // Chunks start at multiples of kChunk, so every group of V below is aligned.
    const int64_t groups = (c.end - c.begin) / V;
    RowWalk rows(r, c.begin + threadIdx.x * V);
    for (int64_t gi = threadIdx.x; gi < groups; gi += blockDim.x) {
      const int64_t i = c.begin + gi * V;
      float w[V], g[V], m[V], v[V];
      ldv<V>(r.w, r.w_bf16, i, w);
      if (!rows.at(i)) {  // a group lies in one row here (vec_ok: rows are multiples of 8)
#pragma unroll
        for (int k = 0; k < V; ++k) g[k] = 0.f;
      } else {
        ldv<V>(r.g, r.g_bf16, i, g);
      }
      ldv<V>(r.m, r.mv_bf16, i, m);
      ldv<V>(r.v, r.mv_bf16, i, v);
#pragma unroll
      for (int k = 0; k < V; ++k) ops::adamw_element(w[k], g[k], m[k], v[k], r.wd_mul, s);
      stv<V>(r.w, r.w_bf16, i, w);
      stv<V>(r.m, r.mv_bf16, i, m);
      stv<V>(r.v, r.mv_bf16, i, v);
      if (r.w_copy) stv<V>(r.w_copy, true, i, w);
    }
    tail = c.begin + groups * V;
  }
  RowWalk rows(r, tail + threadIdx.x);
  for (int64_t i = tail + threadIdx.x; i < c.end; i += blockDim.x) {
    float w = ld(r.w, r.w_bf16, i), m = ld(r.m, r.mv_bf16, i), v = ld(r.v, r.mv_bf16, i);
    const float g = rows.at(i) ? ld(r.g, r.g_bf16, i) : 0.f;
    ops::adamw_element(w, g, m, v, r.wd_mul, s);
    st(r.w, r.w_bf16, i, w);
    st(r.m, r.mv_bf16, i, m);
    st(r.v, r.mv_bf16, i, v);
    if (r.w_copy) r.w_copy[i] = __float2bfloat16(w);
  }
}

// MOEFORGE_ADAMW_KERNEL=VxB picks the vector width and the blocks per SM the registers must allow
// (8x2, the default: 58 registers, two blocks; 8x3, 4x3, 4x4; p8x2, p4x3, p4x2 pipelined), for
// measuring them
// (docs/perf-notes.md).
using AdamWLaunch = void (*)(const TensorRef*, const Chunk*, ops::AdamWScalars);
AdamWLaunch adamw_variant() {
  static const AdamWLaunch k = [] {
    const char* v = std::getenv("MOEFORGE_ADAMW_KERNEL");
    const std::string name = v ? v : "";
    if (name == "8x3") return &adamw_kernel<8, 3>;
    if (name == "p8x2") return &adamw_kernel<8, 2, true>;
    if (name == "p4x3") return &adamw_kernel<4, 3, true>;
    if (name == "p4x2") return &adamw_kernel<4, 2, true>;
    if (name == "4x3") return &adamw_kernel<4, 3>;
    if (name == "4x4") return &adamw_kernel<4, 4>;
    return &adamw_kernel<8, 2>;
  }();
  return k;
}

__global__ void sumsq_kernel(const TensorRef* refs, const Chunk* chunks, float* partial) {
  const Chunk c = chunks[blockIdx.x];
  const TensorRef r = refs[c.tensor];
  float acc = 0.f;
  RowWalk rows(r, c.begin + threadIdx.x);
  for (int64_t i = c.begin + threadIdx.x; i < c.end; i += blockDim.x) {
    if (!rows.at(i)) continue;  // an unwritten row: zeros, not read
    const float g = ld(r.g, r.g_bf16, i);
    acc += g * g;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

__global__ void scale_kernel(const TensorRef* refs, const Chunk* chunks, float factor) {
  const Chunk c = chunks[blockIdx.x];
  const TensorRef r = refs[c.tensor];
  for (int64_t i = c.begin + threadIdx.x; i < c.end; i += blockDim.x) st(r.g, r.g_bf16, i, ld(r.g, r.g_bf16, i) * factor);
}

bool is_bf16(const Tensor& t, const char* what) {
  MF_CHECK(t.dtype() == DType::F32 || t.dtype() == DType::BF16, what, " must be F32 or BF16, got ", dtype_name(t.dtype()));
  return t.dtype() == DType::BF16;
}

// Uploads the tensor and chunk tables; the returned device tensors must live until the launch is done.
struct Tables {
  Tensor refs, chunks;
  int64_t n_chunks = 0;
};
Tables upload(const std::vector<TensorRef>& refs) {
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < refs.size(); ++t)
    for (int64_t b = 0; b < refs[t].n; b += kChunk) chunks.push_back({static_cast<int32_t>(t), b, std::min(refs[t].n, b + kChunk)});
  Tables out;
  out.n_chunks = static_cast<int64_t>(chunks.size());
  if (chunks.empty()) return out;
  out.refs = empty({static_cast<int64_t>(refs.size() * sizeof(TensorRef))}, DType::U8, "optimizer tensor table");
  out.chunks = empty({static_cast<int64_t>(chunks.size() * sizeof(Chunk))}, DType::U8, "optimizer chunk table");
  MF_CUDA_CHECK(cudaMemcpyAsync(out.refs.raw(), refs.data(), refs.size() * sizeof(TensorRef), cudaMemcpyHostToDevice, current_stream()));
  MF_CUDA_CHECK(cudaMemcpyAsync(out.chunks.raw(), chunks.data(), chunks.size() * sizeof(Chunk), cudaMemcpyHostToDevice, current_stream()));
  return out;
}

std::vector<TensorRef> grad_refs(const std::vector<Tensor>& ts, const std::vector<Tensor>& written_rows = {}) {
  std::vector<TensorRef> refs;
  for (size_t i = 0; i < ts.size(); ++i) {
    const Tensor& t = ts[i];
    const bool flagged = i < written_rows.size() && written_rows[i].defined();
    refs.push_back({nullptr, t.raw(), nullptr, nullptr, nullptr, flagged ? written_rows[i].data<uint8_t>() : nullptr,
                    flagged ? t.numel() / written_rows[i].numel() : 1, t.numel(), 1.f, 0, is_bf16(t, "gradient"), 0, 0});
  }
  return refs;
}

}  // namespace

void adamw_multi_tensor(const std::vector<AdamWTensors>& ts, const ops::AdamWScalars& s) {
  std::vector<TensorRef> refs;
  for (const auto& t : ts) {
    const int64_t n = t.param.numel();
    MF_CHECK(t.grad.numel() == n && t.exp_avg.numel() == n && t.exp_avg_sq.numel() == n, "adamw: tensor sizes differ");
    MF_CHECK(t.exp_avg.dtype() == t.exp_avg_sq.dtype(), "adamw: both moments must have one dtype");
    __nv_bfloat16* copy = nullptr;
    if (t.param_bf16_copy.defined()) {
      MF_CHECK(t.param_bf16_copy.dtype() == DType::BF16 && t.param_bf16_copy.numel() == n && t.param.dtype() == DType::F32,
               "adamw: the working copy must be BF16 of an F32 master parameter");
      copy = t.param_bf16_copy.data<__nv_bfloat16>();
    }
    const uint8_t* written = nullptr;
    int64_t row_elems = 1;
    if (t.grad_written_rows.defined()) {
      const Tensor& f = t.grad_written_rows;
      MF_CHECK(f.dtype() == DType::U8 && f.numel() > 0 && n % f.numel() == 0 && f.device() == t.grad.device(),
               "adamw: the gradient's written-rows flags must be U8 on its device and divide its ", n, " values");
      written = f.data<uint8_t>();
      row_elems = n / f.numel();
    }
    auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
    const bool vec_ok = aligned(t.param.raw()) && aligned(t.grad.raw()) && aligned(t.exp_avg.raw()) &&
                        aligned(t.exp_avg_sq.raw()) && (!copy || aligned(copy)) && (!written || row_elems % 8 == 0);
    refs.push_back({t.param.raw(), t.grad.raw(), t.exp_avg.raw(), t.exp_avg_sq.raw(), copy, written, row_elems, n,
                    t.weight_decay_mul,
                    is_bf16(t.param, "parameter"), is_bf16(t.grad, "gradient"), is_bf16(t.exp_avg, "exp_avg"),
                    static_cast<uint8_t>(vec_ok)});
  }
  Tables tab = upload(refs);
  if (tab.n_chunks == 0) return;
  adamw_variant()<<<tab.n_chunks, kThreads, 0, current_stream()>>>(static_cast<const TensorRef*>(tab.refs.raw()),
                                                                  static_cast<const Chunk*>(tab.chunks.raw()), s);
  MF_CUDA_CHECK_LAUNCH("adamw");
  // No synchronisation: the tables were copied from pageable memory (the copy returns once the
  // source is read) and their device blocks are reused only by later work on the same stream.
}

double global_grad_norm(const std::vector<Tensor>& grads, const std::vector<Tensor>& written_rows) {
  Tables tab = upload(grad_refs(grads, written_rows));
  if (tab.n_chunks == 0) return 0.0;
  Tensor partial = empty({tab.n_chunks}, DType::F32, "grad-norm partial sums");
  sumsq_kernel<<<tab.n_chunks, kThreads, 0, current_stream()>>>(static_cast<const TensorRef*>(tab.refs.raw()),
                                                               static_cast<const Chunk*>(tab.chunks.raw()), partial.data<float>());
  MF_CUDA_CHECK_LAUNCH("grad_norm");
  std::vector<float> host(static_cast<size_t>(tab.n_chunks));
  MF_CUDA_CHECK(cudaMemcpyAsync(host.data(), partial.raw(), host.size() * sizeof(float), cudaMemcpyDeviceToHost, current_stream()));
  synchronize();
  double ss = 0;
  for (float x : host) ss += x;
  return std::sqrt(ss);
}

void scale_inplace(const std::vector<Tensor>& ts, float factor) {
  Tables tab = upload(grad_refs(ts));
  if (tab.n_chunks == 0) return;
  scale_kernel<<<tab.n_chunks, kThreads, 0, current_stream()>>>(static_cast<const TensorRef*>(tab.refs.raw()),
                                                               static_cast<const Chunk*>(tab.chunks.raw()), factor);
  MF_CUDA_CHECK_LAUNCH("scale");
}

}  // namespace moeforge::cuda
