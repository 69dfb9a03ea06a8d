// Mamba2's selective scan on the GPU in the chunked state-space-duality form (Dao & Gu, "Transformers
// are SSMs", 2024), forward and backward, F32 arithmetic (inputs of other dtypes converted first).
//
// Per (row, head) the recurrence is S_t = a_t S_{t-1} + dt_t x_t B_t^T, y_t = S_t C_t + D x_t with
// a_t = exp(dt_t A), the state reset at each sequence start. Tokens are cut into chunks of L; with
// cum_t the chunk-relative running sum of dt A:
//   y_t = [intra] sum_{s<=t, same sequence} exp(cum_t - cum_s) dt_s (C_t . B_s) x_s
//       + [inter] exp(cum_t) S_before(chunk) C_t   (when t's sequence began before the chunk)  + D x_t
// so a chunk is a few [L x L], [L x P] and [P x N] products (shared memory, register tiles), and only
// the [P, N] states at chunk ends pass from chunk to chunk (one thread per state element).
//
// The backward runs the same way: the state gradient G_t = dy_t C_t^T + a_{t+1} G_{t+1} is a scan
// backwards in time, chunked alike (its chunk-end values by a reverse pass), and every gradient is a
// product inside a chunk. For the decays, with M_ij = exp(cum_i - cum_j) dt_j (dy_i . x_j)(C_i . B_j)
// the contribution of the pair (j <= i), d(cum_k) = sum_j M_kj - sum_i M_ik = dy_k . (S_k C_k) -
// dt_k x_k . (G_k B_k): per token, the first term is C_k . dC_k and the second comes with dx; then
// d(dt_k A) = sum of d(cum) from k to the row's end (a reverse running sum per (row, head)). Each
// sequence's d(cum) sum to zero exactly, so sequences packed later in the row add only rounding;
// a sequence's first token gets exactly zero (its decay multiplies a reset state).
#include "ops/cuda/check.h"
#include "ops/cuda/kernel_util.cuh"
#include "ops/cuda/mamba_common.h"
#include "ops/cuda/ops_cuda.h"
#include "ops/cuda/runtime.h"

namespace moeforge::cuda {

using namespace detail;

namespace {

constexpr int kThreads = 256;
constexpr int64_t kSmemLimit = 227 * 1024;

struct Dims {
  int64_t t, rows, h, p, g, n;
  int64_t len;     // chunk length L
  int64_t cpr;     // chunks per row
  int64_t chunks;  // in all (rows of the batch x cpr)
};

__device__ __forceinline__ float sigmoidf(float u) { return 1.f / (1.f + expf(-u)); }

// Odd leading dimensions: a column walk through a [rows][ld] array then touches 32 different banks.
__host__ __device__ inline int padded(int64_t n) { return static_cast<int>(n | 1); }

__device__ inline void chunk_span(const Dims& s, int64_t q, int64_t& i0, int& len) {
  const int64_t c = q % s.cpr;
  i0 = (q / s.cpr) * s.rows + c * s.len;
  len = static_cast<int>(min(s.len, s.rows - c * s.len));
}

// acc[i][j] += sum_k A(m_i, k) B(k, n_j) over shared-memory operands, A(m, k) = a[m am + k ak],
// B(k, n) = b[k bk + n bn], for the 4 x 4 register tile m_i = m0 + i ms, n_j = n0 + j ns. Rows and
// columns past M, N are clamped to valid addresses; the caller drops their results.
__device__ __forceinline__ void tile_mac(float (&acc)[4][4], const float* a, int am, int ak, const float* b, int bk,
                                         int bn, int m0, int ms, int n0, int ns, int M, int N, int K) {
  int ra[4], cb[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    ra[i] = min(m0 + i * ms, M - 1) * am;
    cb[i] = min(n0 + i * ns, N - 1) * bn;
  }
  for (int k = 0; k < K; ++k) {
    float av[4], bv[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      av[i] = a[ra[i] + k * ak];
      bv[i] = b[k * bk + cb[i]];
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
  }
}

// Calls body(m0, ms, n0, ns) for each 4 x 4 tile of an M x N output, tiles spread over the block;
// a tile's rows are m0 + i ms (strided, so a warp's threads share rows and walk adjacent columns).
template <typename Body>
__device__ __forceinline__ void for_tiles(int M, int N, Body&& body) {
  const int ms = (M + 3) / 4, ns = (N + 3) / 4;
  for (int t = threadIdx.x; t < ms * ns; t += blockDim.x) body(t / ns, ms, t % ns, ns);
}

template <typename Store>
__device__ __forceinline__ void store_tile(const float (&acc)[4][4], int m0, int ms, int n0, int ns, int M, int N,
                                           Store&& store_at) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int m = m0 + i * ms, n = n0 + j * ns;
      if (m < M && n < N) store_at(m, n, acc[i][j]);
    }
}

// Per (chunk, head), one thread each: dt = max(softplus(dt_raw + dt_bias), dt_min) (`floored` where
// the floor won) and cum, the chunk-relative running sum of dt A.
__global__ void ssd_prep_kernel(const float* raw, const float* bias, const float* a_log, float* dt, uint8_t* floored,
                                float* cum, float dt_min, Dims s) {
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < s.chunks * s.h; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t q = e / s.h, hd = e % s.h;
    int64_t i0;
    int len;
    chunk_span(s, q, i0, len);
    const float a = -expf(a_log[hd]);
    float run = 0.f;
    for (int k = 0; k < len; ++k) {
      const int64_t o = (i0 + k) * s.h + hd;
      const float u = raw[o] + bias[hd], v = u > 20.f ? u : log1pf(expf(u)), d = v < dt_min ? dt_min : v;
      floored[o] = v < dt_min;
      dt[o] = d;
      run += d * a;
      cum[o] = run;
    }
  }
}

// The per-token values of one chunk in shared memory: cum, dt, and where the token's sequence starts
// relative to the chunk's first token (negative: before the chunk).
struct ChunkTokens {
  float* cum;
  float* dt;
  int* start;
};

__device__ void load_chunk_tokens(const ChunkTokens& tok, const float* cum, const float* dt, const int64_t* start,
                                  int64_t i0, int len, int64_t hd, const Dims& s) {
  for (int k = threadIdx.x; k < s.len; k += blockDim.x) {
    const bool in = k < len;
    tok.cum[k] = in ? cum[(i0 + k) * s.h + hd] : 0.f;
    tok.dt[k] = in ? dt[(i0 + k) * s.h + hd] : 0.f;
    tok.start[k] = in ? static_cast<int>(start[i0 + k] - i0) : 0;
  }
}

// rows [L][ld] of a per-head [T, heads, width] tensor (heads = H for x, dy; G for B, C), zero past len.
__device__ void load_rows(float* dst, int ld, const float* src, int64_t heads, int64_t head, int64_t width, int64_t i0,
                          int len, int64_t L) {
  for (int64_t e = threadIdx.x; e < L * width; e += blockDim.x) {
    const int64_t k = e / width, c = e % width;
    dst[k * ld + c] = k < len ? src[((i0 + k) * heads + head) * width + c] : 0.f;
  }
}

// Decay weight of the pair (token m reads token n) inside a chunk: exp(cum_m - cum_n) for n <= m in
// the same sequence, else 0.
__device__ __forceinline__ float pair_decay(const ChunkTokens& tok, int m, int n, int len) {
  return n <= m && n >= tok.start[m] && m < len ? expf(tok.cum[m] - tok.cum[n]) : 0.f;
}

// A chunk's own contribution to the state passed on, per (chunk, head), [P, N]:
//   forward  (the state at the chunk's end from its own tokens):
//            sum_s exp(cum_last - cum_s) dt_s x_s B_s^T over the last token's sequence;
//   backward (the state gradient before the chunk from its own outputs):
//            sum_i exp(cum_i) dy_i C_i^T over tokens whose sequence began before the chunk.
// u is x or dy ([T, H, P]), v is B or C ([T, G, N]).
__global__ void ssd_chunk_state_kernel(const float* u, const float* v, const float* dt, const float* cum,
                                       const int64_t* start, bool backward, float* out, Dims s) {
  extern __shared__ float sm[];
  const int L = static_cast<int>(s.len), P = static_cast<int>(s.p), N = static_cast<int>(s.n);
  const int ldp = padded(P), ldn = padded(N);
  const int64_t q = blockIdx.x / s.h, hd = blockIdx.x % s.h, grp = hd / (s.h / s.g);
  float* us = sm;
  float* vs = us + L * ldp;
  const ChunkTokens tok{vs + L * ldn, vs + L * ldn + L, reinterpret_cast<int*>(vs + L * ldn + 2 * L)};
  int64_t i0;
  int len;
  chunk_span(s, q, i0, len);
  load_chunk_tokens(tok, cum, dt, start, i0, len, hd, s);
  load_rows(us, ldp, u, s.h, hd, P, i0, len, L);
  load_rows(vs, ldn, v, s.g, grp, N, i0, len, L);
  __syncthreads();
  const int last = len - 1;
  for (int e = threadIdx.x; e < L * P; e += blockDim.x) {
    const int k = e / P;
    float w = 0.f;
    if (k < len) {
      if (backward) w = tok.start[k] < 0 ? expf(tok.cum[k]) : 0.f;
      else w = k >= tok.start[last] ? expf(tok.cum[last] - tok.cum[k]) * tok.dt[k] : 0.f;
    }
    us[k * ldp + e % P] *= w;
  }
  __syncthreads();
  float* dst = out + (q * s.h + hd) * s.p * s.n;
  for_tiles(P, N, [&](int m0, int ms, int n0, int ns) {
    float acc[4][4] = {};
    tile_mac(acc, us, 1, ldp, vs, ldn, 1, m0, ms, n0, ns, P, N, len);
    store_tile(acc, m0, ms, n0, ns, P, N, [&](int p, int n, float val) { dst[p * N + n] = val; });
  });
}

// Passes the chunk-end states along each (row, head), one thread per state element, in place:
// states[chunk] holds the chunk's own contribution on entry and the state entering the chunk on exit
// (forward: the state before it; backward, walking the chunks in reverse: the state gradient after
// it). A chunk lets the carried state through, decayed by exp(cum_last), only if its last token's
// sequence began before it.
__global__ void ssd_pass_kernel(float* states, const float* cum, const int64_t* start, bool reverse, Dims s) {
  const int64_t pn = s.p * s.n, rows = s.chunks / s.cpr;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < rows * s.h * pn; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t el = e % pn, hd = (e / pn) % s.h, r = e / (pn * s.h);
    float carried = 0.f;
    for (int64_t cc = 0; cc < s.cpr; ++cc) {
      const int64_t q = r * s.cpr + (reverse ? s.cpr - 1 - cc : cc);
      int64_t i0;
      int len;
      chunk_span(s, q, i0, len);
      const int64_t last = i0 + len - 1;
      const float decay = start[last] < i0 ? expf(cum[last * s.h + hd]) : 0.f;
      float* slot = states + (q * s.h + hd) * pn + el;
      const float own = *slot;
      *slot = carried;
      carried = decay * carried + own;
    }
  }
}

// Shared-memory floats of the forward's per-chunk kernel.
int64_t output_smem(const Dims& s) {
  const int64_t L = s.len;
  return (2 * L * padded(s.n) + std::max<int64_t>(0, s.p - L) * padded(s.n) + L * padded(s.p) + L * padded(L) + 3 * L) *
         4;
}

// y per (chunk, head): the intra-chunk product (C B^T masked by the pair decays and dt) X, plus the
// state entering the chunk read by C, plus D x.
__global__ void ssd_output_kernel(const float* x, const float* b, const float* c, const float* dt, const float* cum,
                                  const float* d, const int64_t* start, const float* s_before, float* y, Dims s) {
  extern __shared__ float sm[];
  const int L = static_cast<int>(s.len), P = static_cast<int>(s.p), N = static_cast<int>(s.n);
  const int ldp = padded(P), ldn = padded(N), ldl = padded(L);
  const int64_t q = blockIdx.x / s.h, hd = blockIdx.x % s.h, grp = hd / (s.h / s.g);
  float* cs = sm;
  float* bs = cs + L * ldn;  // B, then the entering state [P][ldn]
  float* xs = bs + max(L, P) * ldn;
  float* ms = xs + L * ldp;
  const ChunkTokens tok{ms + L * ldl, ms + L * ldl + L, reinterpret_cast<int*>(ms + L * ldl + 2 * L)};
  int64_t i0;
  int len;
  chunk_span(s, q, i0, len);
  load_chunk_tokens(tok, cum, dt, start, i0, len, hd, s);
  load_rows(cs, ldn, c, s.g, grp, N, i0, len, L);
  load_rows(bs, ldn, b, s.g, grp, N, i0, len, L);
  load_rows(xs, ldp, x, s.h, hd, P, i0, len, L);
  __syncthreads();
  for_tiles(L, L, [&](int m0, int mst, int n0, int nst) {
    float acc[4][4] = {};
    tile_mac(acc, cs, ldn, 1, bs, 1, ldn, m0, mst, n0, nst, L, L, N);
    store_tile(acc, m0, mst, n0, nst, L, L,
               [&](int m, int n, float v) { ms[m * ldl + n] = v * pair_decay(tok, m, n, len) * tok.dt[n]; });
  });
  __syncthreads();
  const float* entering = s_before + (q * s.h + hd) * s.p * s.n;
  for (int e = threadIdx.x; e < P * N; e += blockDim.x) bs[(e / N) * ldn + e % N] = entering[e];
  __syncthreads();
  const float dh = d[hd];
  for_tiles(L, P, [&](int m0, int mst, int n0, int nst) {
    float intra[4][4] = {}, inter[4][4] = {};
    tile_mac(intra, ms, ldl, 1, xs, ldp, 1, m0, mst, n0, nst, L, P, len);
    tile_mac(inter, cs, ldn, 1, bs, 1, ldn, m0, mst, n0, nst, L, P, N);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int m = m0 + i * mst;
      if (m >= len) continue;
      const float carry = tok.start[m] < 0 ? expf(tok.cum[m]) : 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int p = n0 + j * nst;
        if (p < P) y[((i0 + m) * s.h + hd) * P + p] = intra[i][j] + carry * inter[i][j] + dh * xs[m * ldp + p];
      }
    }
  });
}

int64_t backward_smem(const Dims& s) {
  const int64_t L = s.len, ldp = padded(s.p), ldn = padded(s.n), ldl = padded(L), ldo = padded(std::max(s.p, s.n));
  return (2 * L * ldp + 2 * L * ldn + s.p * ldn + 2 * L * ldl + L * ldo + 4 * L) * 4;
}

// Per (chunk, head), the gradients of the chunk's tokens from dy and the two states that cross the
// chunk's edges (the state entering it, the state gradient leaving it):
//   dxs_t = G_t B_t (dx = D dy + dt dxs), dB_t = dt_t G_t^T x_t, dC_t = S_t^T dy_t (per head),
//   v_t = x_t . dxs_t (d dt through the input term), dcum_t = C_t . dC_t - dt_t v_t, dy_t . x_t (dD).
__global__ void ssd_backward_kernel(const float* x, const float* b, const float* c, const float* dt, const float* cum,
                                    const float* d, const int64_t* start, const float* s_before, const float* g_after,
                                    const float* dy, float* dx, float* db_h, float* dc_h, float* v_out, float* dcum_out,
                                    float* dxy_out, Dims s) {
  extern __shared__ float sm[];
  const int L = static_cast<int>(s.len), P = static_cast<int>(s.p), N = static_cast<int>(s.n);
  const int ldp = padded(P), ldn = padded(N), ldl = padded(L), ldo = padded(max(P, N));
  const int64_t q = blockIdx.x / s.h, hd = blockIdx.x % s.h, grp = hd / (s.h / s.g);
  float* xs = sm;
  float* ys = xs + L * ldp;  // dy
  float* bs = ys + L * ldp;
  float* cs = bs + L * ldn;
  float* gs = cs + L * ldn;  // the state gradient after the chunk, then the state before it [P][ldn]
  float* cb = gs + P * ldn;  // C_i . B_s times the pair decays
  float* yx = cb + L * ldl;  // dy_i . x_s times the pair decays
  float* os = yx + L * ldl;  // per-token results staged for the row sums
  float* vt = os + L * ldo;
  const ChunkTokens tok{vt + L, vt + 2 * L, reinterpret_cast<int*>(vt + 3 * L)};
  int64_t i0;
  int len;
  chunk_span(s, q, i0, len);
  load_chunk_tokens(tok, cum, dt, start, i0, len, hd, s);
  load_rows(xs, ldp, x, s.h, hd, P, i0, len, L);
  load_rows(ys, ldp, dy, s.h, hd, P, i0, len, L);
  load_rows(bs, ldn, b, s.g, grp, N, i0, len, L);
  load_rows(cs, ldn, c, s.g, grp, N, i0, len, L);
  const int64_t state0 = (q * s.h + hd) * s.p * s.n;
  for (int e = threadIdx.x; e < P * N; e += blockDim.x) gs[(e / N) * ldn + e % N] = g_after[state0 + e];
  __syncthreads();
  for_tiles(L, L, [&](int m0, int mst, int n0, int nst) {
    float acc_cb[4][4] = {}, acc_yx[4][4] = {};
    tile_mac(acc_cb, cs, ldn, 1, bs, 1, ldn, m0, mst, n0, nst, L, L, N);
    tile_mac(acc_yx, ys, ldp, 1, xs, 1, ldp, m0, mst, n0, nst, L, L, P);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int m = m0 + i * mst, n = n0 + j * nst;
        if (m >= L || n >= L) continue;
        const float w = pair_decay(tok, m, n, len);
        cb[m * ldl + n] = acc_cb[i][j] * w;
        yx[m * ldl + n] = acc_yx[i][j] * w;
      }
  });
  __syncthreads();
  const int last = len - 1;
  // Decay from token t to the chunk's end when t's sequence runs to it (how G after the chunk reaches t).
  auto to_end = [&](int t) { return t < len && t >= tok.start[last] ? expf(tok.cum[last] - tok.cum[t]) : 0.f; };
  // dxs_t = sum_i cb[i][t] dy_i + to_end(t) G B_t.
  for_tiles(L, P, [&](int m0, int mst, int n0, int nst) {
    float intra[4][4] = {}, inter[4][4] = {};
    tile_mac(intra, cb, 1, ldl, ys, ldp, 1, m0, mst, n0, nst, L, P, len);
    tile_mac(inter, bs, ldn, 1, gs, 1, ldn, m0, mst, n0, nst, L, P, N);
    store_tile(intra, m0, mst, n0, nst, L, P, [&](int m, int p, float v) {
      os[m * ldo + p] = v + to_end(m) * inter[(m - m0) / mst][(p - n0) / nst];
    });
  });
  // dB_t = dt_t (sum_i yx[i][t] C_i + to_end(t) G^T x_t).
  for_tiles(L, N, [&](int m0, int mst, int n0, int nst) {
    float intra[4][4] = {}, inter[4][4] = {};
    tile_mac(intra, yx, 1, ldl, cs, ldn, 1, m0, mst, n0, nst, L, N, len);
    tile_mac(inter, xs, ldp, 1, gs, ldn, 1, m0, mst, n0, nst, L, N, P);
    store_tile(intra, m0, mst, n0, nst, L, N, [&](int m, int n, float v) {
      if (m < len)
        db_h[((i0 + m) * s.h + hd) * N + n] = tok.dt[m] * (v + to_end(m) * inter[(m - m0) / mst][(n - n0) / nst]);
    });
  });
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const float dh = d[hd];
  for (int m = warp; m < len; m += warps) {
    float v = 0.f, xy = 0.f;
    for (int p = lane; p < P; p += 32) {
      const float g = os[m * ldo + p], xv = xs[m * ldp + p], yv = ys[m * ldp + p];
      v += xv * g;
      xy += xv * yv;
      dx[((i0 + m) * s.h + hd) * P + p] = dh * yv + tok.dt[m] * g;
    }
    for (int o = 16; o > 0; o >>= 1) {
      v += __shfl_xor_sync(0xffffffffu, v, o);
      xy += __shfl_xor_sync(0xffffffffu, xy, o);
    }
    if (lane == 0) {
      vt[m] = v;
      v_out[(i0 + m) * s.h + hd] = v;
      dxy_out[(i0 + m) * s.h + hd] = xy;
    }
  }
  // The state entering the chunk replaces G; yx takes dt of its column.
  for (int e = threadIdx.x; e < P * N; e += blockDim.x) gs[(e / N) * ldn + e % N] = s_before[state0 + e];
  for (int e = threadIdx.x; e < L * L; e += blockDim.x) yx[(e / L) * ldl + e % L] *= tok.dt[e % L];
  __syncthreads();
  // dC_t = sum_s yx[t][s] dt_s B_s + [t's sequence began before the chunk] exp(cum_t) S^T dy_t.
  for_tiles(L, N, [&](int m0, int mst, int n0, int nst) {
    float intra[4][4] = {}, inter[4][4] = {};
    tile_mac(intra, yx, ldl, 1, bs, ldn, 1, m0, mst, n0, nst, L, N, len);
    tile_mac(inter, ys, ldp, 1, gs, ldn, 1, m0, mst, n0, nst, L, N, P);
    store_tile(intra, m0, mst, n0, nst, L, N, [&](int m, int n, float v) {
      const float from_before = m < len && tok.start[m] < 0 ? expf(tok.cum[m]) : 0.f;
      const float val = v + from_before * inter[(m - m0) / mst][(n - n0) / nst];
      os[m * ldo + n] = val;
      if (m < len) dc_h[((i0 + m) * s.h + hd) * N + n] = val;
    });
  });
  __syncthreads();
  for (int m = warp; m < len; m += warps) {
    float r = 0.f;
    for (int n = lane; n < N; n += 32) r += cs[m * ldn + n] * os[m * ldo + n];
    for (int o = 16; o > 0; o >>= 1) r += __shfl_xor_sync(0xffffffffu, r, o);
    if (lane == 0) dcum_out[(i0 + m) * s.h + hd] = r - tok.dt[m] * vt[m];
  }
}

// One block per (row, head): d(dt A) at each token = the running sum of dcum from the row's end (0 at
// a sequence's first token); then d(dt) = v + A d(dt A), through the softplus and floor to dt_raw;
// per-(row, head) sums for dA (sum dt d(dt A)) and dD (sum dy . x).
__global__ void ssd_row_kernel(const float* dcum, const float* v, const float* dxy, const float* dt, const int64_t* start,
                               const float* a_log, const uint8_t* floored, const float* raw, const float* bias,
                               float* ddt_raw, float* da_part, float* dd_part, Dims s) {
  __shared__ float after[kThreads];
  const int64_t r = blockIdx.x / s.h, hd = blockIdx.x % s.h;
  const int64_t per = (s.rows + blockDim.x - 1) / blockDim.x, k0 = threadIdx.x * per, k1 = min(s.rows, k0 + per);
  float own = 0.f;
  for (int64_t k = k0; k < k1; ++k) own += dcum[(r * s.rows + k) * s.h + hd];
  after[threadIdx.x] = own;
  __syncthreads();
  if (threadIdx.x == 0) {  // suffix sums over the threads' spans, exclusive
    float run = 0.f;
    for (int i = blockDim.x - 1; i >= 0; --i) {
      const float mine = after[i];
      after[i] = run;
      run += mine;
    }
  }
  __syncthreads();
  const float a = -expf(a_log[hd]);
  float run = after[threadIdx.x], da = 0.f, dd = 0.f;
  for (int64_t k = k1 - 1; k >= k0; --k) {
    const int64_t i = r * s.rows + k, o = i * s.h + hd;
    run += dcum[o];
    const float dla = start[i] == i ? 0.f : run, ddt = v[o] + a * dla;
    da += dt[o] * dla;
    dd += dxy[o];
    const float u = raw[o] + bias[hd];
    ddt_raw[o] = floored[o] ? 0.f : ddt * (u > 20.f ? 1.f : sigmoidf(u));
  }
  da = block_sum(da);
  dd = block_sum(dd);
  if (threadIdx.x == 0) {
    da_part[blockIdx.x] = da;
    dd_part[blockIdx.x] = dd;
  }
}

// Per head (one block each): d(dt_bias) = sum over tokens of ddt_raw; dA and dD summed over rows
// (dA -> d(A_log) = dA * A).
__global__ void ssd_param_grads_kernel(const float* ddt_raw, const float* a_log, const float* da_part,
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

int64_t chunk_state_smem(const Dims& s) { return (s.len * (padded(s.p) + padded(s.n)) + 3 * s.len) * 4; }

// The dims, with the longest chunk (64, 32, 16, ... tokens) whose kernels fit in shared memory.
Dims scan_dims(const Tensor& x, const Tensor& b, int64_t batch) {
  Dims s{x.size(0), 0, x.size(1), x.size(2), b.size(1), b.size(2), 64, 0, 0};
  MF_CHECK(x.dim() == 3 && b.dim() == 3 && b.size(0) == s.t && s.g > 0 && s.h % s.g == 0 && batch > 0 &&
               s.t % batch == 0,
           "ssm_scan: x [T,H,P] ", shape_str(x.shape()), ", B [T,G,N] ", shape_str(b.shape()), ", ", batch, " rows");
  s.rows = s.t / batch;
  while (s.len > 1 && std::max({output_smem(s), backward_smem(s), chunk_state_smem(s)}) > kSmemLimit) s.len /= 2;
  MF_CHECK(backward_smem(s) <= kSmemLimit, "ssm_scan: head dim ", s.p, " x state ", s.n,
           " does not fit in shared memory on the GPU");
  s.cpr = std::max<int64_t>(1, (s.rows + s.len - 1) / s.len);
  s.chunks = batch * s.cpr;
  return s;
}

void allow_smem(const void* kernel, int64_t bytes) {
  MF_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

struct Prepared {
  Tensor start, dt, floored, cum;
};

Prepared prepare(const Dims& s, int64_t batch, const Tensor* doc_ids, const Tensor& raw, const Tensor& bias,
                 const Tensor& a_log, float dt_min) {
  Prepared p{segment_starts(s.t, batch, doc_ids), empty({s.t, s.h}, DType::F32, "scan dt"),
             empty({s.t, s.h}, DType::U8, "scan dt floor"), empty({s.t, s.h}, DType::F32, "scan decay running sums")};
  ssd_prep_kernel<<<grid_stride_blocks(s.chunks * s.h), kGridStrideThreads, 0, current_stream()>>>(
      raw.data<float>(), bias.data<float>(), a_log.data<float>(), p.dt.data<float>(), p.floored.data<uint8_t>(),
      p.cum.data<float>(), dt_min, s);
  return p;
}

// The chunks' own states (forward: from x and B; backward: from dy and C), then passed along.
Tensor chunk_states(const Dims& s, const Prepared& p, const Tensor& u, const Tensor& v, bool backward,
                    const char* what) {
  Tensor states = empty({s.chunks, s.h, s.p, s.n}, DType::F32, what);
  const int64_t smem = chunk_state_smem(s);
  allow_smem(reinterpret_cast<const void*>(ssd_chunk_state_kernel), smem);
  ssd_chunk_state_kernel<<<static_cast<unsigned>(s.chunks * s.h), kThreads, smem, current_stream()>>>(
      u.data<float>(), v.data<float>(), p.dt.data<float>(), p.cum.data<float>(), p.start.data<int64_t>(), backward,
      states.data<float>(), s);
  ssd_pass_kernel<<<grid_stride_blocks(s.chunks / s.cpr * s.h * s.p * s.n), kGridStrideThreads, 0, current_stream()>>>(
      states.data<float>(), p.cum.data<float>(), p.start.data<int64_t>(), backward, s);
  return states;
}

}  // namespace

Tensor ssm_scan(const Tensor& x, const Tensor& dt_raw, const Tensor& dt_bias, const Tensor& a_log, const Tensor& b,
                const Tensor& c, const Tensor& d, float dt_min, int64_t batch, const Tensor* doc_ids) {
  require_float(x, "ssm_scan");
  const Dims s = scan_dims(x, b, batch);
  Tensor y = empty(x.shape(), DType::F32, "scan output");
  if (s.t == 0) return in_dtype(y, x.dtype());
  const Tensor xf = f32_copy(x), bf = f32_copy(b), cf = f32_copy(c), df = f32_copy(d);
  const Prepared p = prepare(s, batch, doc_ids, f32_copy(dt_raw), f32_copy(dt_bias), f32_copy(a_log), dt_min);
  const Tensor entering = chunk_states(s, p, xf, bf, /*backward=*/false, "scan states entering each chunk");
  const int64_t smem = output_smem(s);
  allow_smem(reinterpret_cast<const void*>(ssd_output_kernel), smem);
  ssd_output_kernel<<<static_cast<unsigned>(s.chunks * s.h), kThreads, smem, current_stream()>>>(
      xf.data<float>(), bf.data<float>(), cf.data<float>(), p.dt.data<float>(), p.cum.data<float>(), df.data<float>(),
      p.start.data<int64_t>(), entering.data<float>(), y.data<float>(), s);
  MF_CUDA_CHECK_LAUNCH("ssm_scan");
  return in_dtype(y, x.dtype());
}

void ssm_scan_backward(const Tensor& x, const Tensor& dt_raw, const Tensor& dt_bias, const Tensor& a_log,
                       const Tensor& b, const Tensor& c, const Tensor& d, float dt_min, int64_t batch,
                       const Tensor* doc_ids, const Tensor& dy, ops::SsmScanGrads& g) {
  require_float(x, "ssm_scan_backward");
  const Dims s = scan_dims(x, b, batch);
  MF_CHECK(dy.numel() == x.numel(), "ssm_scan_backward: dy ", shape_str(dy.shape()), " must match x ",
           shape_str(x.shape()));
  g.dx = empty(x.shape(), DType::F32, "scan x gradient");
  g.ddt_raw = empty({s.t, s.h}, DType::F32, "scan dt gradient");
  g.ddt_bias = empty({s.h}, DType::F32, "scan dt bias gradient");
  g.da_log = empty({s.h}, DType::F32, "scan A_log gradient");
  g.dd = empty({s.h}, DType::F32, "scan D gradient");
  g.db = empty(b.shape(), DType::F32, "scan B gradient");
  g.dc = empty(c.shape(), DType::F32, "scan C gradient");
  if (s.t == 0) return;
  const Tensor xf = f32_copy(x), bf = f32_copy(b), cf = f32_copy(c), df = f32_copy(d), dyf = f32_copy(dy);
  const Tensor rawf = f32_copy(dt_raw), biasf = f32_copy(dt_bias), alf = f32_copy(a_log);
  const Prepared p = prepare(s, batch, doc_ids, rawf, biasf, alf, dt_min);
  const Tensor entering = chunk_states(s, p, xf, bf, false, "scan states entering each chunk");
  const Tensor leaving = chunk_states(s, p, dyf, cf, true, "scan state gradients leaving each chunk");
  Tensor db_h = empty({s.t, s.h, s.n}, DType::F32, "scan dB per head"), dc_h = empty({s.t, s.h, s.n}, DType::F32, "scan dC per head");
  Tensor v = empty({s.t, s.h}, DType::F32, "scan input-term dt gradient"), dcum = empty({s.t, s.h}, DType::F32, "scan decay gradient");
  Tensor dxy = empty({s.t, s.h}, DType::F32, "scan dy.x");
  const int64_t smem = backward_smem(s);
  allow_smem(reinterpret_cast<const void*>(ssd_backward_kernel), smem);
  ssd_backward_kernel<<<static_cast<unsigned>(s.chunks * s.h), kThreads, smem, current_stream()>>>(
      xf.data<float>(), bf.data<float>(), cf.data<float>(), p.dt.data<float>(), p.cum.data<float>(), df.data<float>(),
      p.start.data<int64_t>(), entering.data<float>(), leaving.data<float>(), dyf.data<float>(), g.dx.data<float>(),
      db_h.data<float>(), dc_h.data<float>(), v.data<float>(), dcum.data<float>(), dxy.data<float>(), s);
  Tensor da_part = empty({batch * s.h}, DType::F32, "scan dA parts"), dd_part = empty({batch * s.h}, DType::F32, "scan dD parts");
  ssd_row_kernel<<<static_cast<unsigned>(batch * s.h), kThreads, 0, current_stream()>>>(
      dcum.data<float>(), v.data<float>(), dxy.data<float>(), p.dt.data<float>(), p.start.data<int64_t>(),
      alf.data<float>(), p.floored.data<uint8_t>(), rawf.data<float>(), biasf.data<float>(), g.ddt_raw.data<float>(),
      da_part.data<float>(), dd_part.data<float>(), s);
  ssd_param_grads_kernel<<<static_cast<unsigned>(s.h), kGridStrideThreads, 0, current_stream()>>>(
      g.ddt_raw.data<float>(), alf.data<float>(), da_part.data<float>(), dd_part.data<float>(), g.ddt_bias.data<float>(),
      g.da_log.data<float>(), g.dd.data<float>(), s.t, batch, s.h);
  sum_heads_kernel<<<grid_stride_blocks(s.t * s.g * s.n), kGridStrideThreads, 0, current_stream()>>>(
      db_h.data<float>(), g.db.data<float>(), s.t, s.h, s.g, s.n);
  sum_heads_kernel<<<grid_stride_blocks(s.t * s.g * s.n), kGridStrideThreads, 0, current_stream()>>>(
      dc_h.data<float>(), g.dc.data<float>(), s.t, s.h, s.g, s.n);
  MF_CUDA_CHECK_LAUNCH("ssm_scan_backward");
}

}  // namespace moeforge::cuda
