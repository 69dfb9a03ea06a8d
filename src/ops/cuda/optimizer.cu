// Multi-tensor optimizer kernels. A chunk table (tensor index, element range) goes to the device
// once per call and each block takes one 64K-element chunk, so a model's hundreds of parameters
// cost one launch instead of one each. AdamW reads w, g, m, v and writes w, m, v: 16-28 bytes per
// element, so its floor is the parameter count times that at HBM bandwidth. Aligned tensors move
// in 16-byte vectors (8 elements per thread per iteration).
#include <cmath>
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
  // Optional, with `written` and vec_ok: per row, 1 while every moment of the row is +0
  // (ops::AdamWTensors::zero_moment_rows); cleared here where the row's gradient was written.
  uint8_t* zero_moments;
  int64_t row_elems;
  int64_t n;
  float wd_mul;
  uint8_t w_bf16, g_bf16, mv_bf16;
  uint8_t vec_ok;  // every pointer 16-byte aligned: groups of 8 elements move as 16-byte vectors
  uint8_t decay_keeps_w;  // w * wd_mul stores w again (see decay_keeps_weights): the decay needs no write
  uint8_t presquared;     // the gradient norm's: g holds F32 partial sums of squares, added as they are
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

// Eight consecutive elements at i (a multiple of 8 in a 16-byte aligned tensor) as F32.
__device__ __forceinline__ void ld8(const void* p, bool bf16, int64_t i, float* out) {
  if (bf16) {
    const uint4 raw = *reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(p) + i);
    const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&raw);
#pragma unroll
    for (int k = 0; k < 8; ++k) out[k] = __bfloat162float(h[k]);
  } else {
    const float4 a = *reinterpret_cast<const float4*>(static_cast<const float*>(p) + i);
    const float4 b = *reinterpret_cast<const float4*>(static_cast<const float*>(p) + i + 4);
    out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w, out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
  }
}
__device__ __forceinline__ void st8(void* p, bool bf16, int64_t i, const float* v) {
  if (bf16) {
    uint4 raw;
    __nv_bfloat16* h = reinterpret_cast<__nv_bfloat16*>(&raw);
#pragma unroll
    for (int k = 0; k < 8; ++k) h[k] = __float2bfloat16(v[k]);
    *reinterpret_cast<uint4*>(static_cast<__nv_bfloat16*>(p) + i) = raw;
  } else {
    *reinterpret_cast<float4*>(static_cast<float*>(p) + i) = make_float4(v[0], v[1], v[2], v[3]);
    *reinterpret_cast<float4*>(static_cast<float*>(p) + i + 4) = make_float4(v[4], v[5], v[6], v[7]);
  }
}

// Clipping's scale applied as the gradient is read, rounded as scale_kernel would have stored it
// (the same update as scaling every gradient in place first, without that pass over them).
__device__ __forceinline__ float scaled_grad(float g, float scale, bool bf16) {
  if (scale == 1.f) return g;
  const float v = g * scale;
  return bf16 ? __bfloat162float(__float2bfloat16(v)) : v;
}

// Whether element i's gradient row was written, for a thread whose i only grows: one division when
// the thread starts, then a step over each row boundary i passes (a division per element would cost
// more issue slots than the memory-bound kernels have to spare). Always true without flags.
struct RowWalk {
  const uint8_t* written;
  int64_t row_elems, row = 0, next = 0;  // the current row, and the first element after it (with flags)
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

// Walks this thread's share of one chunk: aligned groups of 8 elements as 16-byte vectors where the
// tensor allows (chunks start at multiples of kChunk, so every group is aligned), then the element
// tail, telling each step whether its gradient row was written (vec_ok: rows are multiples of 8, so
// a group lies in one row; a group also gets the walk, for its row's index and end). The optimizer
// kernels differ only in what they do with a group or an element.
template <class Group, class Element>
__device__ __forceinline__ void walk_chunk(const TensorRef& r, const Chunk& c, Group&& group, Element&& element) {
  int64_t tail = c.begin;
  if (r.vec_ok) {
    const int64_t groups = (c.end - c.begin) / 8;
    RowWalk rows(r, c.begin + threadIdx.x * 8);
    for (int64_t gi = threadIdx.x; gi < groups; gi += blockDim.x) {
      const int64_t i = c.begin + gi * 8;
      const bool written = rows.at(i);
      group(i, written, rows);
    }
    tail = c.begin + groups * 8;
  }
  RowWalk rows(r, tail + threadIdx.x);
  for (int64_t i = tail + threadIdx.x; i < c.end; i += blockDim.x) element(i, rows.at(i));
}

// `zero_skip`: a group whose gradient and moments are all zero (an expert no token has reached
// yet: at the random initialisation's native routing, about a third of q30's expert parameters)
// takes a short path with the same bits. There torch's update leaves both moments +0 ((g - m) *
// (1 - beta1) and v * beta2 + (1 - beta2) * g * g of signed zeros are +0) and the weight decayed
// only (w * wd_mul + -step_size * (+0 / eps): adding -0 changes no value), so only what changes is
// stored: no division or square root (whose zero operands take their slow paths), no moment
// written where the moments already hold +0, and no weight written where the decay stores the
// same weight (decay_keeps_w). Where the row's zero-moment flag says its moments are +0 and its
// gradient is unwritten, nothing is even read: such a group costs no bytes. The launcher passes
// `zero_skip` only when eps > 0 and step_size >= 0 (else 0 / eps or the zero's sign would differ).
// Two 512-thread blocks per SM: at 68 registers (the zero-moment flags' code) one block fit, half
// the loads were in flight, and the full update took 3.9 ms for a q30 layer's experts instead of
// ~2.9 (session 27); 64 registers is the cap for two.
__global__ void __launch_bounds__(kThreads, 2)
    adamw_kernel(const TensorRef* refs, const Chunk* chunks, ops::AdamWScalars s, bool zero_skip) {
  const Chunk c = chunks[blockIdx.x];
  const TensorRef r = refs[c.tensor];
  walk_chunk(
      r, c,
      [&](int64_t i, bool written, const RowWalk& rows) {
        float w[8], g[8], m[8], v[8];
        const auto store_decayed = [&] {  // the short path's weight: decayed, stored where that changes it
          if (r.decay_keeps_w) return;
#pragma unroll
          for (int k = 0; k < 8; ++k) w[k] *= r.wd_mul;
          st8(r.w, r.w_bf16, i, w);
          if (r.w_copy) st8(r.w_copy, true, i, w);
        };
        if (!written && zero_skip && r.zero_moments && r.zero_moments[rows.row]) {
          // Moments known +0, gradient zeros: nothing to read but the weight, and that only where
          // the decay changes it.
          if (!r.decay_keeps_w) ld8(r.w, r.w_bf16, i, w);
          store_decayed();
          return;
        }
        // The weight's load is issued with the others: issued after the zero check below, it waited
        // for g, m and v to arrive first, and the full update ran ~20% longer (session 27).
        ld8(r.w, r.w_bf16, i, w);
        if (!written) {
#pragma unroll
          for (int k = 0; k < 8; ++k) g[k] = 0.f;
        } else {
          // Its moments may stop being zero: the row's first group clears the flag (the flags of
          // written rows are never read in this launch, so no other group races with it).
          if (r.zero_moments && i == rows.next - rows.row_elems) r.zero_moments[rows.row] = 0;
          ld8(r.g, r.g_bf16, i, g);
          if (s.grad_scale != 1.f) {
#pragma unroll
            for (int k = 0; k < 8; ++k) g[k] = scaled_grad(g[k], s.grad_scale, r.g_bf16);
          }
        }
        ld8(r.m, r.mv_bf16, i, m);
        ld8(r.v, r.mv_bf16, i, v);
        if (zero_skip) {
          bool zero = true;
          uint32_t moment_bits = 0;  // 0: both moments already +0 everywhere in the group
#pragma unroll
          for (int k = 0; k < 8; ++k) {
            zero = zero && g[k] == 0.f && m[k] == 0.f && v[k] == 0.f;
            moment_bits |= __float_as_uint(m[k]) | __float_as_uint(v[k]);
          }
          if (zero) {
            store_decayed();
            if (moment_bits != 0) {
              const float zeros[8] = {};
              st8(r.m, r.mv_bf16, i, zeros);
              st8(r.v, r.mv_bf16, i, zeros);
            }
            return;
          }
        }
#pragma unroll
        for (int k = 0; k < 8; ++k) ops::adamw_element(w[k], g[k], m[k], v[k], r.wd_mul, s);
        st8(r.w, r.w_bf16, i, w);
        st8(r.m, r.mv_bf16, i, m);
        st8(r.v, r.mv_bf16, i, v);
        if (r.w_copy) st8(r.w_copy, true, i, w);
      },
      [&](int64_t i, bool written) {
        float w = ld(r.w, r.w_bf16, i), m = ld(r.m, r.mv_bf16, i), v = ld(r.v, r.mv_bf16, i);
        const float g = written ? scaled_grad(ld(r.g, r.g_bf16, i), s.grad_scale, r.g_bf16) : 0.f;
        ops::adamw_element(w, g, m, v, r.wd_mul, s);
        st(r.w, r.w_bf16, i, w);
        st(r.m, r.mv_bf16, i, m);
        st(r.v, r.mv_bf16, i, v);
        if (r.w_copy) r.w_copy[i] = __float2bfloat16(w);
      });
}

// The gradient norm's and clipping's passes move 16-byte vectors like AdamW (one element a thread
// per iteration ran at ~1.3 TB/s: session 22's kernel table) and walk row flags the same way. Four
// groups' loads issued before any is summed measured slower (2.0 against 2.3 TB/s, session 23).
__global__ void sumsq_kernel(const TensorRef* refs, const Chunk* chunks, float* partial) {
  const Chunk c = chunks[blockIdx.x];
  const TensorRef r = refs[c.tensor];
  float acc = 0.f;
  walk_chunk(
      r, c,
      [&](int64_t i, bool written, const RowWalk&) {
        if (!written) return;  // an unwritten row: zeros, not read (a group lies in one row)
        float g[8];
        ld8(r.g, r.g_bf16, i, g);
#pragma unroll
        for (int k = 0; k < 8; ++k) acc += r.presquared ? g[k] : g[k] * g[k];
      },
      [&](int64_t i, bool written) {
        if (!written) return;
        const float g = ld(r.g, r.g_bf16, i);
        acc += r.presquared ? g : g * g;
      });
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

__global__ void scale_kernel(const TensorRef* refs, const Chunk* chunks, float factor) {
  const Chunk c = chunks[blockIdx.x];
  const TensorRef r = refs[c.tensor];
  walk_chunk(
      r, c,
      [&](int64_t i, bool, const RowWalk&) {
        float g[8];
        ld8(r.g, r.g_bf16, i, g);
#pragma unroll
        for (int k = 0; k < 8; ++k) g[k] *= factor;
        st8(r.g, r.g_bf16, i, g);
      },
      [&](int64_t i, bool) { st(r.g, r.g_bf16, i, ld(r.g, r.g_bf16, i) * factor); });
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

// Whether w * wd_mul, computed in F32 and stored in the weights' dtype, is w again for every w (NaN
// payloads aside): with no decay; and for BF16 weights when |1 - wd_mul| <= 2^-10. A BF16 weight's
// half-ulp is more than 2^-9 of its magnitude (subnormals included), the decay moves it by at most
// 2^-10 of it, and the F32 product's own rounding is 2^-24: round to nearest gives w back. At fine-
// tuning's learning rates (lr * weight_decay ~1e-7) a BF16 model's decay never changes a weight, in
// torch as here; the short path then writes nothing for a group whose update is decay alone.
bool decay_keeps_weights(float wd_mul, bool w_bf16) {
  return wd_mul == 1.f || (w_bf16 && std::abs(1.f - wd_mul) <= 1.f / 1024.f);
}

// MOEFORGE_ADAMW_ZERO_SKIP=0: every group through the full update (the A/B of the short path).
bool adamw_zero_skip_on() {
  static const bool on = [] {
    const char* v = std::getenv("MOEFORGE_ADAMW_ZERO_SKIP");
    return !(v && std::string(v) == "0");
  }();
  return on;
}

std::vector<TensorRef> grad_refs(const std::vector<Tensor>& ts, const std::vector<Tensor>& written_rows = {}) {
  std::vector<TensorRef> refs;
  for (size_t i = 0; i < ts.size(); ++i) {
    const Tensor& t = ts[i];
    const bool flagged = i < written_rows.size() && written_rows[i].defined();
    const int64_t row_elems = flagged ? t.numel() / written_rows[i].numel() : 1;
    const bool vec_ok = reinterpret_cast<uintptr_t>(t.raw()) % 16 == 0 && (!flagged || row_elems % 8 == 0);
    refs.push_back({nullptr, t.raw(), nullptr, nullptr, nullptr, flagged ? written_rows[i].data<uint8_t>() : nullptr,
                    nullptr, row_elems, t.numel(), 1.f, 0, is_bf16(t, "gradient"), 0, static_cast<uint8_t>(vec_ok), 0});
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
    uint8_t* zero_moments = nullptr;
    if (t.zero_moment_rows.defined()) {
      const Tensor& z = t.zero_moment_rows;
      MF_CHECK(written && z.dtype() == DType::U8 && z.numel() == t.grad_written_rows.numel() && z.device() == t.grad.device(),
               "adamw: zero-moment row flags must be U8 on the gradient's device, one per written-row flag");
      // Only the vector path keeps the flags; elsewhere they become unknown (0), which is always true.
      if (vec_ok) zero_moments = const_cast<uint8_t*>(z.data<uint8_t>());
      else MF_CUDA_CHECK(cudaMemsetAsync(const_cast<uint8_t*>(z.data<uint8_t>()), 0, static_cast<size_t>(z.numel()), current_stream()));
    }
    const bool w_bf16 = is_bf16(t.param, "parameter");
    refs.push_back({t.param.raw(), t.grad.raw(), t.exp_avg.raw(), t.exp_avg_sq.raw(), copy, written, zero_moments, row_elems,
                    n, t.weight_decay_mul, w_bf16, is_bf16(t.grad, "gradient"), is_bf16(t.exp_avg, "exp_avg"),
                    static_cast<uint8_t>(vec_ok), static_cast<uint8_t>(!copy && decay_keeps_weights(t.weight_decay_mul, w_bf16))});
  }
  Tables tab = upload(refs);
  if (tab.n_chunks == 0) return;
  const bool zero_skip = adamw_zero_skip_on() && s.eps > 0.f && s.step_size >= 0.f;
  adamw_kernel<<<tab.n_chunks, kThreads, 0, current_stream()>>>(static_cast<const TensorRef*>(tab.refs.raw()),
                                                               static_cast<const Chunk*>(tab.chunks.raw()), s, zero_skip);
  MF_CUDA_CHECK_LAUNCH("adamw");
  // No synchronisation: the tables were copied from pageable memory (the copy returns once the
  // source is read) and their device blocks are reused only by later work on the same stream.
}

double global_grad_norm(const std::vector<Tensor>& grads, const std::vector<Tensor>& written_rows,
                        const std::vector<Tensor>& partial_squares) {
  std::vector<TensorRef> refs = grad_refs(grads, written_rows);
  for (TensorRef& r : grad_refs(partial_squares)) {
    r.presquared = 1;
    refs.push_back(r);
  }
  Tables tab = upload(refs);
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
