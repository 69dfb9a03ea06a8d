// Mamba2's ops on the GPU (Nemotron-H), first versions that follow the CPU reference
// (ops/cpu/mamba.cpp) step for step, for correctness: relu^2, the causal depthwise conv1d (+SiLU),
// the gated grouped RMSNorm, and the selective scan run token by token, one thread block per
// (row, head) with the [P, N] state in shared memory. The scan's backward recomputes the states a
// chunk of kScanChunk tokens at a time from the states saved at chunk starts. Arithmetic in F32;
// inputs of other dtypes are converted first. The chunked state-space-duality form (intra-chunk
// GEMMs, inter-chunk state passing) is the planned fast path (issue 17).
#include "ops/cuda/check.h"
#include "ops/cuda/kernel_util.cuh"
#include "ops/cuda/ops_cuda.h"
#include "ops/cuda/runtime.h"

namespace moeforge::cuda {

using namespace detail;

namespace {

constexpr int kScanThreads = 256;
constexpr int64_t kScanChunk = 64;

// An F32 copy of a float tensor on the device (the tensor itself when it is F32 already).
Tensor f32(const Tensor& t) {
  if (t.dtype() == DType::F32) return t;
  Tensor out = empty(t.shape(), DType::F32, "Mamba2 F32 input");
  convert(t, out);
  return out;
}

// `t` (F32) in `dtype`.
Tensor in_dtype(const Tensor& t, DType dtype) {
  if (dtype == DType::F32) return t;
  Tensor out = empty(t.shape(), dtype, "Mamba2 output");
  convert(t, out);
  return out;
}

__device__ __forceinline__ float sigmoidf(float u) { return 1.f / (1.f + expf(-u)); }

// start[i]: the first token of the sequence token i belongs to (its row's first, or its document's).
__global__ void segment_start_kernel(const int64_t* doc, int64_t* start, int64_t t, int64_t s) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < t; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t row0 = (i / s) * s;
    int64_t j = i;
    if (doc)
      while (j > row0 && doc[j - 1] == doc[i]) --j;
    else
      j = row0;
    start[i] = j;
  }
}

Tensor segment_starts(int64_t t, int64_t batch, const Tensor* doc_ids) {
  MF_CHECK(batch > 0 && t % batch == 0, "mamba: ", t, " tokens do not split into ", batch, " rows");
  MF_CHECK(!doc_ids || (doc_ids->numel() == t && doc_ids->dtype() == DType::I64 && !doc_ids->device().is_cpu()),
           "mamba: doc_ids must be device I64 with one id per token");
  Tensor start = empty({t}, DType::I64, "Mamba2 segment starts");
  segment_start_kernel<<<grid_stride_blocks(t), kGridStrideThreads, 0, current_stream()>>>(
      doc_ids ? doc_ids->data<int64_t>() : nullptr, start.data<int64_t>(), t, t / batch);
  MF_CUDA_CHECK_LAUNCH("mamba segment starts");
  return start;
}

template <typename T>
__global__ void relu2_kernel(const T* x, T* y, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const float r = fmaxf(load(x, i), 0.f);
    store(y, i, r * r);
  }
}

template <typename T>
__global__ void relu2_backward_kernel(const T* x, const T* dy, T* dx, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    store(dx, i, 2.f * fmaxf(load(x, i), 0.f) * load(dy, i));
}

// Pre-activation of the conv at (token i, channel c).
__device__ __forceinline__ float conv_pre(const float* x, const float* w, const float* bias, const int64_t* start,
                                          int64_t i, int64_t ch, int64_t c, int64_t k) {
  float acc = bias ? bias[ch] : 0.f;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t src = i - (k - 1) + j;
    if (src >= start[i]) acc += w[ch * k + j] * x[src * c + ch];
  }
  return acc;
}

__global__ void conv_forward_kernel(const float* x, const float* w, const float* bias, const int64_t* start, float* y,
                                    int64_t t, int64_t c, int64_t k, bool silu) {
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < t * c; e += (int64_t)gridDim.x * blockDim.x) {
    const float a = conv_pre(x, w, bias, start, e / c, e % c, c, k);
    y[e] = silu ? a * sigmoidf(a) : a;
  }
}

__global__ void conv_dpre_kernel(const float* x, const float* w, const float* bias, const int64_t* start,
                                 const float* dy, float* dpre, int64_t t, int64_t c, int64_t k, bool silu) {
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < t * c; e += (int64_t)gridDim.x * blockDim.x) {
    float g = dy[e];
    if (silu) {
      const float a = conv_pre(x, w, bias, start, e / c, e % c, c, k), s = sigmoidf(a);
      g *= s * (1.f + a * (1.f - s));
    }
    dpre[e] = g;
  }
}

// dx[src, c] = sum over the outputs t that read src (t = src + K-1 - j) of w[c, j] dpre[t, c].
__global__ void conv_dx_kernel(const float* w, const int64_t* start, const float* dpre, float* dx, int64_t t, int64_t c,
                               int64_t k) {
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < t * c; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t src = e / c, ch = e % c;
    float acc = 0.f;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t out = src + (k - 1) - j;
      if (out < t && src >= start[out]) acc += w[ch * k + j] * dpre[out * c + ch];
    }
    dx[e] = acc;
  }
}

// One block per (channel, tap) (tap k: the bias): dw[c, j] += sum_t x[t - (K-1) + j, c] dpre[t, c].
template <typename G>
__global__ void conv_dw_kernel(const float* x, const int64_t* start, const float* dpre, G* dw, float* dbias, int64_t t,
                               int64_t c, int64_t k) {
  const int64_t ch = blockIdx.x / (k + 1), j = blockIdx.x % (k + 1);
  float acc = 0.f;
  for (int64_t i = threadIdx.x; i < t; i += blockDim.x) {
    if (j == k) {
      acc += dpre[i * c + ch];
      continue;
    }
    const int64_t src = i - (k - 1) + j;
    if (src >= start[i]) acc += x[src * c + ch] * dpre[i * c + ch];
  }
  acc = block_sum(acc);
  if (threadIdx.x != 0) return;
  if (j == k) {
    if (dbias) dbias[ch] += acc;
  } else {
    store(dw, ch * k + j, load(dw, ch * k + j) + acc);
  }
}

// One block per (token, group): h = y silu(z), RMS over the group, times w. rstd kept for dw.
__global__ void gated_norm_kernel(const float* y, const float* z, const float* w, float* out, int64_t width, int64_t gs,
                                  float eps) {
  const int64_t row = blockIdx.x / (width / gs), g = blockIdx.x % (width / gs), o = row * width + g * gs;
  float ss = 0.f;
  for (int64_t j = threadIdx.x; j < gs; j += blockDim.x) {
    const float zz = z[o + j], h = y[o + j] * zz * sigmoidf(zz);
    ss += h * h;
  }
  const float rstd = rsqrtf(block_sum(ss) / static_cast<float>(gs) + eps);
  for (int64_t j = threadIdx.x; j < gs; j += blockDim.x) {
    const float zz = z[o + j], h = y[o + j] * zz * sigmoidf(zz);
    out[o + j] = w[g * gs + j] * (h * rstd);
  }
}

__global__ void gated_norm_backward_kernel(const float* y, const float* z, const float* w, const float* dout, float* dy,
                                           float* dz, float* rstd_out, int64_t width, int64_t gs, float eps) {
  const int64_t groups = width / gs, row = blockIdx.x / groups, g = blockIdx.x % groups, o = row * width + g * gs;
  float ss = 0.f, dot = 0.f;
  for (int64_t j = threadIdx.x; j < gs; j += blockDim.x) {
    const float zz = z[o + j], h = y[o + j] * zz * sigmoidf(zz);
    ss += h * h;
    dot += dout[o + j] * w[g * gs + j] * h;
  }
  const float rstd = rsqrtf(block_sum(ss) / static_cast<float>(gs) + eps);
  dot = block_sum(dot);
  if (threadIdx.x == 0) rstd_out[blockIdx.x] = rstd;
  for (int64_t j = threadIdx.x; j < gs; j += blockDim.x) {
    const float zz = z[o + j], sg = sigmoidf(zz), silu = zz * sg, h = y[o + j] * silu;
    const float dh = rstd * dout[o + j] * w[g * gs + j] - rstd * rstd * rstd * h * dot / static_cast<float>(gs);
    dy[o + j] = dh * silu;
    dz[o + j] = dh * y[o + j] * sg * (1.f + zz * (1.f - sg));
  }
}

// dw[j] += sum_t dout[t, j] h[t, j] rstd[t, group of j]: one thread per column.
template <typename G>
__global__ void gated_norm_dw_kernel(const float* y, const float* z, const float* dout, const float* rstd, G* dw,
                                     int64_t t, int64_t width, int64_t gs) {
  for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < width; j += (int64_t)gridDim.x * blockDim.x) {
    float acc = 0.f;
    for (int64_t i = 0; i < t; ++i) {
      const float zz = z[i * width + j];
      acc += dout[i * width + j] * y[i * width + j] * zz * sigmoidf(zz) * rstd[i * (width / gs) + j / gs];
    }
    store(dw, j, load(dw, j) + acc);
  }
}

// dt = max(softplus(dt_raw + dt_bias), dt_min) per (token, head); `floored` marks where the floor won.
__global__ void scan_dt_kernel(const float* raw, const float* bias, float* dt, uint8_t* floored, int64_t n, int64_t h,
                               float dt_min) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const float u = raw[i] + bias[i % h], v = u > 20.f ? u : log1pf(expf(u));
    floored[i] = v < dt_min;
    dt[i] = v < dt_min ? dt_min : v;
  }
}

struct ScanDims {
  int64_t t, rows, h, p, g, n;
};

// One block per (row, head): the scan token by token. `starts_out` (optional): the state before each
// chunk of kScanChunk tokens of the row ([rows / chunk rounded up, P * N] per (row, head)).
__global__ void scan_forward_kernel(const float* x, const float* dt, const float* a_log, const float* b, const float* c,
                                    const float* d, const int64_t* start, float* y, float* starts_out, ScanDims s) {
  extern __shared__ float state[];
  const int64_t r = blockIdx.x / s.h, hd = blockIdx.x % s.h, grp = hd / (s.h / s.g), pn = s.p * s.n;
  const int64_t chunks = (s.rows + kScanChunk - 1) / kScanChunk;
  const float a = -expf(a_log[hd]);
  for (int64_t e = threadIdx.x; e < pn; e += blockDim.x) state[e] = 0.f;
  __syncthreads();
  for (int64_t k = 0; k < s.rows; ++k) {
    const int64_t i = r * s.rows + k;
    if (starts_out && k % kScanChunk == 0) {
      float* dst = starts_out + (blockIdx.x * chunks + k / kScanChunk) * pn;
      for (int64_t e = threadIdx.x; e < pn; e += blockDim.x) dst[e] = start[i] == i ? 0.f : state[e];
    }
    const float dti = dt[i * s.h + hd], decay = expf(dti * a);
    const float* xi = x + (i * s.h + hd) * s.p;
    const float* bi = b + (i * s.g + grp) * s.n;
    const bool reset = start[i] == i;
    for (int64_t e = threadIdx.x; e < pn; e += blockDim.x)
      state[e] = (reset ? 0.f : decay * state[e]) + dti * xi[e / s.n] * bi[e % s.n];
    __syncthreads();
    const float* ci = c + (i * s.g + grp) * s.n;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int64_t pp = warp; pp < s.p; pp += warps) {
      float acc = 0.f;
      for (int64_t nn = lane; nn < s.n; nn += 32) acc += state[pp * s.n + nn] * ci[nn];
      for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
      if (lane == 0) y[(i * s.h + hd) * s.p + pp] = acc + d[hd] * xi[pp];
    }
    __syncthreads();
  }
}

// One block per (row, head), the chunks in reverse: each chunk's states recomputed from its start
// state into `states` ([kScanChunk, P * N] per block), then its tokens in reverse with the state
// gradient `gs` in shared memory. Writes dx, ddt (w.r.t. dt, before the softplus), per-head dB and dC
// ([T, H, N]), and per-(row, head) sums for dA and dD.
__global__ void scan_backward_kernel(const float* x, const float* dt, const float* a_log, const float* b, const float* c,
                                     const float* d, const int64_t* start, const float* starts, float* states,
                                     const float* dy, float* dx, float* ddt, float* db_h, float* dc_h, float* da_part,
                                     float* dd_part, ScanDims s) {
  extern __shared__ float gs[];
  const int64_t r = blockIdx.x / s.h, hd = blockIdx.x % s.h, grp = hd / (s.h / s.g), pn = s.p * s.n;
  const int64_t chunks = (s.rows + kScanChunk - 1) / kScanChunk;
  const float a = -expf(a_log[hd]);
  float* my_states = states + blockIdx.x * kScanChunk * pn;
  float da = 0.f, dd = 0.f;
  for (int64_t e = threadIdx.x; e < pn; e += blockDim.x) gs[e] = 0.f;
  __syncthreads();
  for (int64_t ch = chunks - 1; ch >= 0; --ch) {
    const int64_t k0 = ch * kScanChunk, k1 = min(s.rows, k0 + kScanChunk);
    const float* st0 = starts + (blockIdx.x * chunks + ch) * pn;
    // The chunk's states, token by token (state after token k at my_states[k - k0]).
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t i = r * s.rows + k;
      const float dti = dt[i * s.h + hd], decay = expf(dti * a);
      const float* xi = x + (i * s.h + hd) * s.p;
      const float* bi = b + (i * s.g + grp) * s.n;
      const float* prev = k == k0 ? st0 : my_states + (k - 1 - k0) * pn;
      float* cur = my_states + (k - k0) * pn;
      const bool reset = start[i] == i;
      for (int64_t e = threadIdx.x; e < pn; e += blockDim.x)
        cur[e] = (reset ? 0.f : decay * prev[e]) + dti * xi[e / s.n] * bi[e % s.n];
      __syncthreads();
    }
    for (int64_t k = k1 - 1; k >= k0; --k) {
      const int64_t i = r * s.rows + k;
      const float dti = dt[i * s.h + hd], decay = expf(dti * a);
      const float* xi = x + (i * s.h + hd) * s.p;
      const float* bi = b + (i * s.g + grp) * s.n;
      const float* ci = c + (i * s.g + grp) * s.n;
      const float* gy = dy + (i * s.h + hd) * s.p;
      const float* st = my_states + (k - k0) * pn;
      const bool reset = start[i] == i;
      const float* prev = reset ? nullptr : (k == k0 ? st0 : my_states + (k - 1 - k0) * pn);
      // d(state after token i): what came from later tokens plus y = state C.
      for (int64_t e = threadIdx.x; e < pn; e += blockDim.x) gs[e] += gy[e / s.n] * ci[e % s.n];
      __syncthreads();
      // Per n: dC (through y) and dB (through the input term); per p: dx.
      for (int64_t nn = threadIdx.x; nn < s.n; nn += blockDim.x) {
        float dcn = 0.f, dbn = 0.f;
        for (int64_t pp = 0; pp < s.p; ++pp) {
          dcn += st[pp * s.n + nn] * gy[pp];
          dbn += gs[pp * s.n + nn] * xi[pp];
        }
        dc_h[(i * s.h + hd) * s.n + nn] = dcn;
        db_h[(i * s.h + hd) * s.n + nn] = dti * dbn;
      }
      const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
      for (int64_t pp = warp; pp < s.p; pp += warps) {
        float acc = 0.f;
        for (int64_t nn = lane; nn < s.n; nn += 32) acc += gs[pp * s.n + nn] * bi[nn];
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if (lane == 0) dx[(i * s.h + hd) * s.p + pp] = d[hd] * gy[pp] + dti * acc;
      }
      float dinput = 0.f, dprev = 0.f, dxy = 0.f;
      for (int64_t e = threadIdx.x; e < pn; e += blockDim.x) {
        dinput += gs[e] * xi[e / s.n] * bi[e % s.n];
        if (prev) dprev += gs[e] * prev[e];
      }
      for (int64_t pp = threadIdx.x; pp < s.p; pp += blockDim.x) dxy += gy[pp] * xi[pp];
      dinput = block_sum(dinput);
      dprev = block_sum(dprev);
      dxy = block_sum(dxy);
      if (threadIdx.x == 0) {
        ddt[i * s.h + hd] = dinput + dprev * a * decay;
        da += dprev * dti * decay;
        dd += dxy;
      }
      __syncthreads();
      for (int64_t e = threadIdx.x; e < pn; e += blockDim.x) gs[e] = reset ? 0.f : gs[e] * decay;
      __syncthreads();
    }
  }
  if (threadIdx.x == 0) {
    da_part[blockIdx.x] = da;
    dd_part[blockIdx.x] = dd;
  }
}

// The softplus and floor on d(dt): ddt_raw = ddt * sigmoid(u) (1 past 20), 0 where floored.
__global__ void scan_dt_backward_kernel(const float* raw, const float* bias, const uint8_t* floored, float* ddt, int64_t n,
                                        int64_t h) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const float u = raw[i] + bias[i % h];
    ddt[i] = floored[i] ? 0.f : ddt[i] * (u > 20.f ? 1.f : sigmoidf(u));
  }
}

// Per head (one block each): sums over tokens of ddt_raw (-> d(dt_bias)) and over rows of the dA and
// dD parts (dA -> d(A_log) = dA * A).
__global__ void scan_param_grads_kernel(const float* ddt_raw, const float* a_log, const float* da_part,
                                        const float* dd_part, float* ddt_bias, float* da_log, float* dd, int64_t t,
                                        int64_t batch, int64_t h) {
  const int64_t hd = blockIdx.x;
  float sb = 0.f, sa = 0.f, sd = 0.f;
  for (int64_t i = threadIdx.x; i < t; i += blockDim.x) sb += ddt_raw[i * h + hd];
  for (int64_t r = threadIdx.x; r < batch; r += blockDim.x) {
    sa += da_part[r * h + hd];
    sd += dd_part[r * h + hd];
  }
  sb = block_sum(sb);
  sa = block_sum(sa);
  sd = block_sum(sd);
  if (threadIdx.x == 0) {
    ddt_bias[hd] = sb;
    da_log[hd] = sa * -expf(a_log[hd]);
    dd[hd] = sd;
  }
}

// [T, H, N] per head -> [T, G, N]: each group's heads summed.
__global__ void sum_heads_kernel(const float* per_head, float* out, int64_t t, int64_t h, int64_t g, int64_t n) {
  const int64_t per = h / g;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < t * g * n; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t nn = e % n, grp = (e / n) % g, i = e / (g * n);
    float acc = 0.f;
    for (int64_t j = 0; j < per; ++j) acc += per_head[(i * h + grp * per + j) * n + nn];
    out[e] = acc;
  }
}

void set_scan_smem(const void* kernel, int64_t bytes) {
  MF_CHECK(bytes <= 227 * 1024, "ssm_scan: a [", bytes / 4, "] state does not fit in shared memory");
  MF_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

ScanDims scan_dims(const Tensor& x, const Tensor& b, int64_t batch) {
  ScanDims s{x.size(0), x.size(0) / batch, x.size(1), x.size(2), b.size(1), b.size(2)};
  MF_CHECK(x.dim() == 3 && b.dim() == 3 && b.size(0) == s.t && s.h % s.g == 0 && s.t % batch == 0,
           "ssm_scan: x [T,H,P] ", shape_str(x.shape()), ", B [T,G,N] ", shape_str(b.shape()), ", ", batch, " rows");
  return s;
}

}  // namespace

Tensor relu2(const Tensor& x) {
  require_float(x, "relu2");
  Tensor y = empty(x.shape(), x.dtype(), "relu2 output");
  if (x.numel() == 0) return y;
  dispatch_float(x.dtype(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    relu2_kernel<<<grid_stride_blocks(x.numel()), kGridStrideThreads, 0, current_stream()>>>(x.data<T>(), y.data<T>(),
                                                                                             x.numel());
  });
  MF_CUDA_CHECK_LAUNCH("relu2");
  return y;
}

Tensor relu2_backward(const Tensor& x, const Tensor& dy) {
  require_float(x, "relu2_backward");
  MF_CHECK(dy.numel() == x.numel() && dy.dtype() == x.dtype(), "relu2_backward: dy must match x");
  Tensor dx = empty(x.shape(), x.dtype(), "relu2 input gradient");
  if (x.numel() == 0) return dx;
  dispatch_float(x.dtype(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    relu2_backward_kernel<<<grid_stride_blocks(x.numel()), kGridStrideThreads, 0, current_stream()>>>(
        x.data<T>(), dy.data<T>(), dx.data<T>(), x.numel());
  });
  MF_CUDA_CHECK_LAUNCH("relu2_backward");
  return dx;
}

Tensor causal_conv1d(const Tensor& x, const Tensor& w, const Tensor* bias, int64_t batch, const Tensor* doc_ids,
                     bool silu) {
  require_float(x, "causal_conv1d");
  const int64_t t = x.size(0), c = x.size(1), k = w.size(-1);
  MF_CHECK(x.dim() == 2 && w.numel() == c * k && (!bias || bias->numel() == c), "causal_conv1d: x [T, C] ",
           shape_str(x.shape()), ", w [C, (1,) K] ", shape_str(w.shape()));
  const Tensor start = segment_starts(t, batch, doc_ids), xf = f32(x), wf = f32(w), bf = bias ? f32(*bias) : Tensor();
  Tensor y = empty({t, c}, DType::F32, "conv1d output");
  if (t * c > 0)
    conv_forward_kernel<<<grid_stride_blocks(t * c), kGridStrideThreads, 0, current_stream()>>>(
        xf.data<float>(), wf.data<float>(), bias ? bf.data<float>() : nullptr, start.data<int64_t>(), y.data<float>(), t,
        c, k, silu);
  MF_CUDA_CHECK_LAUNCH("causal_conv1d");
  return in_dtype(y, x.dtype());
}

void causal_conv1d_backward(const Tensor& x, const Tensor& w, const Tensor* bias, int64_t batch, const Tensor* doc_ids,
                            bool silu, const Tensor& dy, Tensor& dx, Tensor& dw, Tensor* dbias) {
  require_float(x, "causal_conv1d_backward");
  const int64_t t = x.size(0), c = x.size(1), k = w.size(-1);
  MF_CHECK(dy.numel() == t * c && dw.numel() == c * k && (!dbias || (dbias->numel() == c && dbias->dtype() == DType::F32)),
           "causal_conv1d_backward: shapes (dbias F32)");
  const Tensor start = segment_starts(t, batch, doc_ids), xf = f32(x), wf = f32(w), bf = bias ? f32(*bias) : Tensor();
  const Tensor dyf = f32(dy);
  Tensor dpre = empty({t, c}, DType::F32, "conv1d pre-activation gradient");
  Tensor dxf = empty({t, c}, DType::F32, "conv1d input gradient");
  if (t * c > 0) {
    conv_dpre_kernel<<<grid_stride_blocks(t * c), kGridStrideThreads, 0, current_stream()>>>(
        xf.data<float>(), wf.data<float>(), bias ? bf.data<float>() : nullptr, start.data<int64_t>(), dyf.data<float>(),
        dpre.data<float>(), t, c, k, silu);
    conv_dx_kernel<<<grid_stride_blocks(t * c), kGridStrideThreads, 0, current_stream()>>>(
        wf.data<float>(), start.data<int64_t>(), dpre.data<float>(), dxf.data<float>(), t, c, k);
    dispatch_float(dw.dtype(), [&](auto* tag) {
      using G = std::remove_pointer_t<decltype(tag)>;
      conv_dw_kernel<<<static_cast<unsigned>(c * (k + 1)), kGridStrideThreads, 0, current_stream()>>>(
          xf.data<float>(), start.data<int64_t>(), dpre.data<float>(), dw.data<G>(),
          dbias ? dbias->data<float>() : nullptr, t, c, k);
    });
  }
  MF_CUDA_CHECK_LAUNCH("causal_conv1d_backward");
  dx = in_dtype(dxf, x.dtype());
}

Tensor gated_rms_norm(const Tensor& y, const Tensor& z, const Tensor& w, int64_t groups, float eps) {
  require_float(y, "gated_rms_norm");
  const int64_t t = y.size(0), width = y.size(1);
  MF_CHECK(y.dim() == 2 && z.shape() == y.shape() && w.numel() == width && groups > 0 && width % groups == 0,
           "gated_rms_norm: y [T, I] ", shape_str(y.shape()), ", z ", shape_str(z.shape()), ", ", groups, " groups");
  const Tensor yf = f32(y), zf = f32(z), wf = f32(w);
  Tensor out = empty({t, width}, DType::F32, "gated norm output");
  if (t > 0)
    gated_norm_kernel<<<static_cast<unsigned>(t * groups), threads_for(width / groups), 0, current_stream()>>>(
        yf.data<float>(), zf.data<float>(), wf.data<float>(), out.data<float>(), width, width / groups, eps);
  MF_CUDA_CHECK_LAUNCH("gated_rms_norm");
  return in_dtype(out, y.dtype());
}

void gated_rms_norm_backward(const Tensor& y, const Tensor& z, const Tensor& w, int64_t groups, float eps,
                             const Tensor& dout, Tensor& dy, Tensor& dz, Tensor& dw) {
  require_float(y, "gated_rms_norm_backward");
  const int64_t t = y.size(0), width = y.size(1), gs = width / groups;
  MF_CHECK(dout.numel() == t * width && dw.numel() == width, "gated_rms_norm_backward: shapes");
  const Tensor yf = f32(y), zf = f32(z), wf = f32(w), df = f32(dout);
  Tensor dyf = empty({t, width}, DType::F32, "gated norm y gradient"), dzf = empty({t, width}, DType::F32, "gated norm z gradient");
  Tensor rstd = empty({t, groups}, DType::F32, "gated norm statistics");
  if (t > 0) {
    gated_norm_backward_kernel<<<static_cast<unsigned>(t * groups), threads_for(gs), 0, current_stream()>>>(
        yf.data<float>(), zf.data<float>(), wf.data<float>(), df.data<float>(), dyf.data<float>(), dzf.data<float>(),
        rstd.data<float>(), width, gs, eps);
    dispatch_float(dw.dtype(), [&](auto* tag) {
      using G = std::remove_pointer_t<decltype(tag)>;
      gated_norm_dw_kernel<<<grid_stride_blocks(width), kGridStrideThreads, 0, current_stream()>>>(
          yf.data<float>(), zf.data<float>(), df.data<float>(), rstd.data<float>(), dw.data<G>(), t, width, gs);
    });
  }
  MF_CUDA_CHECK_LAUNCH("gated_rms_norm_backward");
  dy = in_dtype(dyf, y.dtype());
  dz = in_dtype(dzf, y.dtype());
}

Tensor ssm_scan(const Tensor& x, const Tensor& dt_raw, const Tensor& dt_bias, const Tensor& a_log, const Tensor& b,
                const Tensor& c, const Tensor& d, float dt_min, int64_t batch, const Tensor* doc_ids) {
  require_float(x, "ssm_scan");
  const ScanDims s = scan_dims(x, b, batch);
  const Tensor start = segment_starts(s.t, batch, doc_ids);
  const Tensor xf = f32(x), rawf = f32(dt_raw), biasf = f32(dt_bias), alf = f32(a_log), bf = f32(b), cf = f32(c), df = f32(d);
  Tensor dt = empty({s.t, s.h}, DType::F32, "scan dt"), floored = empty({s.t, s.h}, DType::U8, "scan dt floor");
  Tensor y = empty(x.shape(), DType::F32, "scan output");
  if (s.t > 0) {
    scan_dt_kernel<<<grid_stride_blocks(s.t * s.h), kGridStrideThreads, 0, current_stream()>>>(
        rawf.data<float>(), biasf.data<float>(), dt.data<float>(), floored.data<uint8_t>(), s.t * s.h, s.h, dt_min);
    const int64_t smem = s.p * s.n * static_cast<int64_t>(sizeof(float));
    set_scan_smem(reinterpret_cast<const void*>(scan_forward_kernel), smem);
    scan_forward_kernel<<<static_cast<unsigned>(batch * s.h), kScanThreads, smem, current_stream()>>>(
        xf.data<float>(), dt.data<float>(), alf.data<float>(), bf.data<float>(), cf.data<float>(), df.data<float>(),
        start.data<int64_t>(), y.data<float>(), nullptr, s);
  }
  MF_CUDA_CHECK_LAUNCH("ssm_scan");
  return in_dtype(y, x.dtype());
}

void ssm_scan_backward(const Tensor& x, const Tensor& dt_raw, const Tensor& dt_bias, const Tensor& a_log,
                       const Tensor& b, const Tensor& c, const Tensor& d, float dt_min, int64_t batch,
                       const Tensor* doc_ids, const Tensor& dy, ops::SsmScanGrads& g) {
  require_float(x, "ssm_scan_backward");
  const ScanDims s = scan_dims(x, b, batch);
  const Tensor start = segment_starts(s.t, batch, doc_ids);
  const Tensor xf = f32(x), rawf = f32(dt_raw), biasf = f32(dt_bias), alf = f32(a_log), bf = f32(b), cf = f32(c), df = f32(d);
  const Tensor dyf = f32(dy);
  const int64_t blocks = batch * s.h, pn = s.p * s.n, chunks = (s.rows + kScanChunk - 1) / kScanChunk;
  Tensor dt = empty({s.t, s.h}, DType::F32, "scan dt"), floored = empty({s.t, s.h}, DType::U8, "scan dt floor");
  Tensor y = empty(x.shape(), DType::F32, "scan output (recomputed)");
  Tensor starts = empty({blocks * chunks * pn}, DType::F32, "scan chunk start states");
  Tensor states = empty({blocks * kScanChunk * pn}, DType::F32, "scan chunk states");
  Tensor db_h = empty({s.t, s.h, s.n}, DType::F32, "scan dB per head"), dc_h = empty({s.t, s.h, s.n}, DType::F32, "scan dC per head");
  Tensor da_part = empty({blocks}, DType::F32, "scan dA parts"), dd_part = empty({blocks}, DType::F32, "scan dD parts");
  g.dx = empty(x.shape(), DType::F32, "scan x gradient");
  g.ddt_raw = empty({s.t, s.h}, DType::F32, "scan dt gradient");
  g.ddt_bias = empty({s.h}, DType::F32, "scan dt bias gradient");
  g.da_log = empty({s.h}, DType::F32, "scan A_log gradient");
  g.dd = empty({s.h}, DType::F32, "scan D gradient");
  g.db = empty(b.shape(), DType::F32, "scan B gradient");
  g.dc = empty(c.shape(), DType::F32, "scan C gradient");
  if (s.t == 0) return;
  scan_dt_kernel<<<grid_stride_blocks(s.t * s.h), kGridStrideThreads, 0, current_stream()>>>(
      rawf.data<float>(), biasf.data<float>(), dt.data<float>(), floored.data<uint8_t>(), s.t * s.h, s.h, dt_min);
  const int64_t smem = pn * static_cast<int64_t>(sizeof(float));
  set_scan_smem(reinterpret_cast<const void*>(scan_forward_kernel), smem);
  scan_forward_kernel<<<static_cast<unsigned>(blocks), kScanThreads, smem, current_stream()>>>(
      xf.data<float>(), dt.data<float>(), alf.data<float>(), bf.data<float>(), cf.data<float>(), df.data<float>(),
      start.data<int64_t>(), y.data<float>(), starts.data<float>(), s);
  set_scan_smem(reinterpret_cast<const void*>(scan_backward_kernel), smem);
  scan_backward_kernel<<<static_cast<unsigned>(blocks), kScanThreads, smem, current_stream()>>>(
      xf.data<float>(), dt.data<float>(), alf.data<float>(), bf.data<float>(), cf.data<float>(), df.data<float>(),
      start.data<int64_t>(), starts.data<float>(), states.data<float>(), dyf.data<float>(), g.dx.data<float>(),
      g.ddt_raw.data<float>(), db_h.data<float>(), dc_h.data<float>(), da_part.data<float>(), dd_part.data<float>(), s);
  scan_dt_backward_kernel<<<grid_stride_blocks(s.t * s.h), kGridStrideThreads, 0, current_stream()>>>(
      rawf.data<float>(), biasf.data<float>(), floored.data<uint8_t>(), g.ddt_raw.data<float>(), s.t * s.h, s.h);
  scan_param_grads_kernel<<<static_cast<unsigned>(s.h), kGridStrideThreads, 0, current_stream()>>>(
      g.ddt_raw.data<float>(), alf.data<float>(), da_part.data<float>(), dd_part.data<float>(), g.ddt_bias.data<float>(),
      g.da_log.data<float>(), g.dd.data<float>(), s.t, batch, s.h);
  sum_heads_kernel<<<grid_stride_blocks(s.t * s.g * s.n), kGridStrideThreads, 0, current_stream()>>>(
      db_h.data<float>(), g.db.data<float>(), s.t, s.h, s.g, s.n);
  sum_heads_kernel<<<grid_stride_blocks(s.t * s.g * s.n), kGridStrideThreads, 0, current_stream()>>>(
      dc_h.data<float>(), g.dc.data<float>(), s.t, s.h, s.g, s.n);
  MF_CUDA_CHECK_LAUNCH("ssm_scan_backward");
}

}  // namespace moeforge::cuda
