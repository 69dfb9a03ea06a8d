// Mamba2's element-wise and small ops on the GPU (Nemotron-H), following the CPU reference
// (ops/cpu/mamba.cpp): relu^2, the causal depthwise conv1d (+SiLU), and the gated grouped RMSNorm.
// The selective scan is in ops/cuda/ssd_scan.cu. Arithmetic in F32; inputs of other dtypes are
// converted first.
#include "ops/cuda/check.h"
#include "ops/cuda/kernel_util.cuh"
#include "ops/cuda/mamba_common.h"
#include "ops/cuda/ops_cuda.h"
#include "ops/cuda/runtime.h"

namespace moeforge::cuda {

using namespace detail;

namespace detail {

Tensor f32_copy(const Tensor& t) {
  if (t.dtype() == DType::F32) return t;
  Tensor out = empty(t.shape(), DType::F32, "Mamba2 F32 input");
  convert(t, out);
  return out;
}

Tensor in_dtype(const Tensor& t, DType dtype) {
  if (dtype == DType::F32) return t;
  Tensor out = empty(t.shape(), dtype, "Mamba2 output");
  convert(t, out);
  return out;
}

// Where each sequence starts, one block per row: a token opens a sequence at its row's start or
// where its document id changes; start[i] is the last such token at or before i, a running maximum
// over the row (a block-wide scan per tile of blockDim tokens, carried between tiles).
__global__ void segment_start_kernel(const int64_t* doc, int64_t* start, int64_t s) {
  __shared__ int64_t warp_max[32];
  __shared__ int64_t carry;
  const int64_t row0 = blockIdx.x * s;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x == 0) carry = row0;
  for (int64_t k0 = 0; k0 < s; k0 += blockDim.x) {
    const int64_t k = k0 + threadIdx.x, i = row0 + k;
    int64_t v = k < s && (k == 0 || (doc && doc[i] != doc[i - 1])) ? i : row0;
    for (int o = 1; o < 32; o <<= 1) {
      const int64_t u = __shfl_up_sync(0xffffffffu, v, o);
      if (lane >= o) v = max(v, u);
    }
    __syncthreads();  // the previous tile's carry is read before it is replaced
    if (lane == 31) warp_max[warp] = v;
    __syncthreads();
    for (int w = 0; w < warp; ++w) v = max(v, warp_max[w]);
    v = max(v, carry);
    if (k < s) start[i] = v;
    __syncthreads();
    if (threadIdx.x == blockDim.x - 1) carry = v;
  }
}

Tensor segment_starts(int64_t t, int64_t batch, const Tensor* doc_ids) {
  MF_CHECK(batch > 0 && t % batch == 0, "mamba: ", t, " tokens do not split into ", batch, " rows");
  MF_CHECK(!doc_ids || (doc_ids->numel() == t && doc_ids->dtype() == DType::I64 && !doc_ids->device().is_cpu()),
           "mamba: doc_ids must be device I64 with one id per token");
  Tensor start = empty({t}, DType::I64, "Mamba2 segment starts");
  if (t > 0)
    segment_start_kernel<<<static_cast<unsigned>(batch), 1024, 0, current_stream()>>>(
        doc_ids ? doc_ids->data<int64_t>() : nullptr, start.data<int64_t>(), t / batch);
  MF_CUDA_CHECK_LAUNCH("mamba segment starts");
  return start;
}

}  // namespace detail

namespace {

__device__ __forceinline__ float sigmoidf(float u) { return 1.f / (1.f + expf(-u)); }

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

// The weight gradients below sum over every token: one pass writes per-slice partial sums (blocks of
// 32 columns x 8 token lanes over kDwSlice tokens, reads coalesced along the columns), a second adds
// the slices in order into the gradient (deterministic, no atomics).
constexpr int64_t kDwSlice = 256;
constexpr int kMaxConvTaps = 8;

// partial[slice, c, j] = sum over the slice's tokens t of x[t - (K-1) + j, c] dpre[t, c] (tap K: the bias).
__global__ void conv_dw_partial_kernel(const float* x, const int64_t* start, const float* dpre, float* partial,
                                       int64_t t, int64_t c, int k) {
  __shared__ float lanes[8][32][kMaxConvTaps + 1];
  const int64_t ch = blockIdx.x * 32 + threadIdx.x, t0 = blockIdx.y * kDwSlice, t1 = min(t, t0 + kDwSlice);
  float acc[kMaxConvTaps + 1] = {};
  if (ch < c)
    for (int64_t i = t0 + threadIdx.y; i < t1; i += 8) {
      const float g = dpre[i * c + ch];
      acc[k] += g;
      for (int j = 0; j < k; ++j) {
        const int64_t src = i - (k - 1) + j;
        if (src >= start[i]) acc[j] += x[src * c + ch] * g;
      }
    }
  for (int j = 0; j <= k; ++j) lanes[threadIdx.y][threadIdx.x][j] = acc[j];
  __syncthreads();
  if (threadIdx.y != 0 || ch >= c) return;
  for (int j = 0; j <= k; ++j) {
    float sum = 0.f;
    for (int l = 0; l < 8; ++l) sum += lanes[l][threadIdx.x][j];
    partial[(blockIdx.y * c + ch) * (k + 1) + j] = sum;
  }
}

template <typename G>
__global__ void conv_dw_reduce_kernel(const float* partial, G* dw, float* dbias, int64_t slices, int64_t c, int k) {
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < c * (k + 1); e += (int64_t)gridDim.x * blockDim.x) {
    float sum = 0.f;
    for (int64_t sl = 0; sl < slices; ++sl) sum += partial[sl * c * (k + 1) + e];
    const int64_t ch = e / (k + 1), j = e % (k + 1);
    if (j < k) store(dw, ch * k + j, load(dw, ch * k + j) + sum);
    else if (dbias) dbias[ch] += sum;
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

// partial[slice, j] = sum over the slice's tokens of dout[t, j] h[t, j] rstd[t, group of j].
__global__ void gated_norm_dw_partial_kernel(const float* y, const float* z, const float* dout, const float* rstd,
                                             float* partial, int64_t t, int64_t width, int64_t gs) {
  __shared__ float lanes[8][32];
  const int64_t j = blockIdx.x * 32 + threadIdx.x, t0 = blockIdx.y * kDwSlice, t1 = min(t, t0 + kDwSlice);
  float acc = 0.f;
  if (j < width)
    for (int64_t i = t0 + threadIdx.y; i < t1; i += 8) {
      const float zz = z[i * width + j];
      acc += dout[i * width + j] * y[i * width + j] * zz * sigmoidf(zz) * rstd[i * (width / gs) + j / gs];
    }
  lanes[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y != 0 || j >= width) return;
  float sum = 0.f;
  for (int l = 0; l < 8; ++l) sum += lanes[l][threadIdx.x];
  partial[blockIdx.y * width + j] = sum;
}

template <typename G>
__global__ void column_sum_into_kernel(const float* partial, G* dst, int64_t slices, int64_t width) {
  for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < width; j += (int64_t)gridDim.x * blockDim.x) {
    float sum = 0.f;
    for (int64_t sl = 0; sl < slices; ++sl) sum += partial[sl * width + j];
    store(dst, j, load(dst, j) + sum);
  }
}

// Generation's scan: one thread per (head, channel) carries its N state values through the T tokens
// in order (T is a prompt or one token; the chunked scan is for training's long rows). Per token
// ~2N reads of B and C (shared by the group's heads, L1/L2 hits) and 3N FMAs.
__global__ void ssm_step_kernel(const float* x, const float* raw, const float* bias, const float* a_log, const float* b,
                                const float* c, const float* d, float dt_min, float* state, float* y, int64_t t,
                                int64_t h, int64_t p, int64_t g, int64_t n) {
  const int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (idx >= h * p) return;
  const int64_t hd = idx / p, pp = idx % p, grp = hd / (h / g);
  const float a = -expf(a_log[hd]);
  float* st = state + (hd * p + pp) * n;
  for (int64_t i = 0; i < t; ++i) {
    const float u = raw[i * h + hd] + bias[hd], v = u > 20.f ? u : log1pf(expf(u)), dt = v < dt_min ? dt_min : v;
    const float decay = expf(dt * a), xv = x[(i * h + hd) * p + pp];
    const float* bi = b + (i * g + grp) * n;
    const float* ci = c + (i * g + grp) * n;
    float out = 0.f;
    for (int64_t k = 0; k < n; ++k) {
      const float sv = decay * st[k] + dt * xv * bi[k];
      st[k] = sv;
      out += sv * ci[k];
    }
    y[(i * h + hd) * p + pp] = out + d[hd] * xv;
  }
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
  const Tensor start = segment_starts(t, batch, doc_ids), xf = f32_copy(x), wf = f32_copy(w), bf = bias ? f32_copy(*bias) : Tensor();
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
  MF_CHECK(k <= kMaxConvTaps, "causal_conv1d_backward: a kernel of ", k, " taps (at most ", kMaxConvTaps, " on the GPU)");
  const Tensor start = segment_starts(t, batch, doc_ids), xf = f32_copy(x), wf = f32_copy(w), bf = bias ? f32_copy(*bias) : Tensor();
  const Tensor dyf = f32_copy(dy);
  Tensor dpre = empty({t, c}, DType::F32, "conv1d pre-activation gradient");
  Tensor dxf = empty({t, c}, DType::F32, "conv1d input gradient");
  if (t * c > 0) {
    conv_dpre_kernel<<<grid_stride_blocks(t * c), kGridStrideThreads, 0, current_stream()>>>(
        xf.data<float>(), wf.data<float>(), bias ? bf.data<float>() : nullptr, start.data<int64_t>(), dyf.data<float>(),
        dpre.data<float>(), t, c, k, silu);
    conv_dx_kernel<<<grid_stride_blocks(t * c), kGridStrideThreads, 0, current_stream()>>>(
        wf.data<float>(), start.data<int64_t>(), dpre.data<float>(), dxf.data<float>(), t, c, k);
    const int64_t slices = (t + kDwSlice - 1) / kDwSlice;
    Tensor partial = empty({slices, c, k + 1}, DType::F32, "conv1d weight gradient partial sums");
    conv_dw_partial_kernel<<<dim3(static_cast<unsigned>((c + 31) / 32), static_cast<unsigned>(slices)), dim3(32, 8), 0,
                             current_stream()>>>(xf.data<float>(), start.data<int64_t>(), dpre.data<float>(),
                                                 partial.data<float>(), t, c, static_cast<int>(k));
    dispatch_float(dw.dtype(), [&](auto* tag) {
      using G = std::remove_pointer_t<decltype(tag)>;
      conv_dw_reduce_kernel<<<grid_stride_blocks(c * (k + 1)), kGridStrideThreads, 0, current_stream()>>>(
          partial.data<float>(), dw.data<G>(), dbias ? dbias->data<float>() : nullptr, slices, c, static_cast<int>(k));
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
  const Tensor yf = f32_copy(y), zf = f32_copy(z), wf = f32_copy(w);
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
  const Tensor yf = f32_copy(y), zf = f32_copy(z), wf = f32_copy(w), df = f32_copy(dout);
  Tensor dyf = empty({t, width}, DType::F32, "gated norm y gradient"), dzf = empty({t, width}, DType::F32, "gated norm z gradient");
  Tensor rstd = empty({t, groups}, DType::F32, "gated norm statistics");
  if (t > 0) {
    gated_norm_backward_kernel<<<static_cast<unsigned>(t * groups), threads_for(gs), 0, current_stream()>>>(
        yf.data<float>(), zf.data<float>(), wf.data<float>(), df.data<float>(), dyf.data<float>(), dzf.data<float>(),
        rstd.data<float>(), width, gs, eps);
    const int64_t slices = (t + kDwSlice - 1) / kDwSlice;
    Tensor partial = empty({slices, width}, DType::F32, "gated norm weight gradient partial sums");
    gated_norm_dw_partial_kernel<<<dim3(static_cast<unsigned>((width + 31) / 32), static_cast<unsigned>(slices)),
                                   dim3(32, 8), 0, current_stream()>>>(yf.data<float>(), zf.data<float>(), df.data<float>(),
                                                                       rstd.data<float>(), partial.data<float>(), t, width, gs);
    dispatch_float(dw.dtype(), [&](auto* tag) {
      using G = std::remove_pointer_t<decltype(tag)>;
      column_sum_into_kernel<<<grid_stride_blocks(width), kGridStrideThreads, 0, current_stream()>>>(
          partial.data<float>(), dw.data<G>(), slices, width);
    });
  }
  MF_CUDA_CHECK_LAUNCH("gated_rms_norm_backward");
  dy = in_dtype(dyf, y.dtype());
  dz = in_dtype(dzf, y.dtype());
}

Tensor ssm_step(const Tensor& x, const Tensor& dt_raw, const Tensor& dt_bias, const Tensor& a_log, const Tensor& b,
                const Tensor& c, const Tensor& d, float dt_min, Tensor& state) {
  require_float(x, "ssm_step");
  MF_CHECK(x.dim() == 3 && b.dim() == 3 && c.shape() == b.shape() && b.size(0) == x.size(0) &&
               dt_raw.numel() == x.size(0) * x.size(1) && x.size(1) % b.size(1) == 0,
           "ssm_step: x [T,H,P] ", shape_str(x.shape()), ", dt [T,H] ", shape_str(dt_raw.shape()), ", B [T,G,N] ",
           shape_str(b.shape()));
  const int64_t t = x.size(0), h = x.size(1), p = x.size(2), g = b.size(1), n = b.size(2);
  MF_CHECK(state.dtype() == DType::F32 && state.shape() == Shape({h, p, n}), "ssm_step: state must be F32 [", h, ", ",
           p, ", ", n, "], got ", shape_str(state.shape()));
  Tensor y = empty(x.shape(), DType::F32, "scan step output");
  if (t == 0) return y;
  const Tensor xf = f32_copy(x), rawf = f32_copy(dt_raw), biasf = f32_copy(dt_bias), alf = f32_copy(a_log),
               bf = f32_copy(b), cf = f32_copy(c), df = f32_copy(d);
  constexpr int kThreads = 128;
  ssm_step_kernel<<<static_cast<unsigned>((h * p + kThreads - 1) / kThreads), kThreads, 0, current_stream()>>>(
      xf.data<float>(), rawf.data<float>(), biasf.data<float>(), alf.data<float>(), bf.data<float>(), cf.data<float>(),
      df.data<float>(), dt_min, state.data<float>(), y.data<float>(), t, h, p, g, n);
  MF_CUDA_CHECK_LAUNCH("ssm_step");
  return in_dtype(y, x.dtype());  // as ssm_scan: in the activations' dtype
}

}  // namespace moeforge::cuda
