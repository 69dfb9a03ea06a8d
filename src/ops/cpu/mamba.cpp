// Mamba2's pieces on the CPU (Nemotron-H's mixer), the reference for their CUDA kernels: the
// depthwise causal conv1d, the selective state-space scan with its dt preprocessing, the gated
// grouped RMSNorm, and relu^2. Rows are [B*S] tokens; a packed row's documents (doc_ids) are
// separate sequences: the conv window and the scan state start afresh at each document.
#include <cmath>
#include <vector>

#include "core/error.h"
#include "ops/cpu/cpu_ops.h"

namespace moeforge::ops::cpu {

namespace {

// The first position of the sequence position t belongs to: its row's start, or its document's.
std::vector<int64_t> segment_starts(int64_t t, int64_t batch, const Tensor* doc_ids) {
  MF_CHECK(batch > 0 && t % batch == 0, "mamba: ", t, " tokens do not split into ", batch, " rows");
  MF_CHECK(!doc_ids || doc_ids->numel() == t, "mamba: doc_ids must have one id per token");
  const int64_t s = t / batch;
  std::vector<int64_t> start(static_cast<size_t>(t));
  for (int64_t i = 0; i < t; ++i) {
    const bool first = i % s == 0 || (doc_ids && doc_ids->i64()[i] != doc_ids->i64()[i - 1]);
    start[i] = first ? i : start[i - 1];
  }
  return start;
}

float softplus(float u) { return u > 20.f ? u : std::log1p(std::exp(u)); }  // torch's threshold 20
float sigmoid(float u) { return 1.f / (1.f + std::exp(-u)); }

}  // namespace

Tensor relu2(const Tensor& x) {
  const Tensor f = as_f32(x);
  Tensor y = Tensor::empty(x.shape(), DType::F32);
  for (int64_t i = 0; i < f.numel(); ++i) {
    const float r = std::max(f.f32()[i], 0.f);
    y.f32()[i] = r * r;
  }
  return y;
}

Tensor relu2_backward(const Tensor& x, const Tensor& dy) {
  MF_CHECK(x.numel() == dy.numel(), "relu2_backward: x and dy differ in size");
  Tensor dx = Tensor::empty(x.shape(), DType::F32);
  for (int64_t i = 0; i < x.numel(); ++i) dx.f32()[i] = 2.f * std::max(x.f32()[i], 0.f) * dy.f32()[i];
  return dx;
}

Tensor causal_conv1d(const Tensor& x, const Tensor& w, const Tensor* bias, int64_t batch, const Tensor* doc_ids,
                     bool silu) {
  const int64_t t = x.size(0), c = x.size(1), k = w.size(-1);
  MF_CHECK(x.dim() == 2 && w.numel() == c * k && (!bias || bias->numel() == c), "causal_conv1d: x [T, C] ",
           shape_str(x.shape()), ", w [C, (1,) K] ", shape_str(w.shape()));
  const std::vector<int64_t> start = segment_starts(t, batch, doc_ids);
  const Tensor wf = as_f32(w), bf = bias ? as_f32(*bias) : Tensor();
  Tensor y = Tensor::empty({t, c}, DType::F32);
#pragma omp parallel for if (t * c * k > 65536)
  for (int64_t i = 0; i < t; ++i)
    for (int64_t ch = 0; ch < c; ++ch) {
      // Tap j reads position i - (K-1) + j (torch's conv1d with K-1 zeros of left padding).
      float acc = bias ? bf.f32()[ch] : 0.f;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t src = i - (k - 1) + j;
        if (src >= start[i]) acc += wf.f32()[ch * k + j] * x.f32()[src * c + ch];
      }
      y.f32()[i * c + ch] = silu ? acc * sigmoid(acc) : acc;
    }
  return y;
}

void causal_conv1d_backward(const Tensor& x, const Tensor& w, const Tensor* bias, int64_t batch, const Tensor* doc_ids,
                            bool silu, const Tensor& dy, Tensor& dx, Tensor& dw, Tensor* dbias) {
  const int64_t t = x.size(0), c = x.size(1), k = w.size(-1);
  MF_CHECK(dy.numel() == t * c && dw.numel() == c * k && (!dbias || dbias->numel() == c), "causal_conv1d_backward: shapes");
  const std::vector<int64_t> start = segment_starts(t, batch, doc_ids);
  const Tensor wf = as_f32(w), bf = bias ? as_f32(*bias) : Tensor();
  // d(pre-activation) first: the pre-activation is recomputed.
  Tensor dpre = Tensor::empty({t, c}, DType::F32);
  for (int64_t i = 0; i < t; ++i)
    for (int64_t ch = 0; ch < c; ++ch) {
      float g = dy.f32()[i * c + ch];
      if (silu) {
        float acc = bias ? bf.f32()[ch] : 0.f;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t src = i - (k - 1) + j;
          if (src >= start[i]) acc += wf.f32()[ch * k + j] * x.f32()[src * c + ch];
        }
        const float s = sigmoid(acc);
        g *= s * (1.f + acc * (1.f - s));  // d(u sigmoid(u))/du
      }
      dpre.f32()[i * c + ch] = g;
    }
  dx = Tensor::zeros({t, c}, DType::F32);
  Tensor dwf = as_f32(dw);
  for (int64_t i = 0; i < t; ++i)
    for (int64_t ch = 0; ch < c; ++ch) {
      const float g = dpre.f32()[i * c + ch];
      if (dbias) dbias->f32()[ch] += g;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t src = i - (k - 1) + j;
        if (src < start[i]) continue;
        dx.f32()[src * c + ch] += wf.f32()[ch * k + j] * g;
        dwf.f32()[ch * k + j] += x.f32()[src * c + ch] * g;
      }
    }
  if (dwf.raw() != dw.raw()) convert_elements(dwf.raw(), DType::F32, dw.raw(), dw.dtype(), dw.numel());
}

namespace {

// The scan's per-token inputs, prepared once: dt after softplus and the floor, A = -exp(A_log).
struct ScanInputs {
  int64_t t, h, p, g, n, heads_per_group;
  std::vector<float> dt, a;        // [T, H], [H]
  std::vector<uint8_t> floored;    // [T, H]: dt was raised to dt_min (no gradient through it)
  std::vector<int64_t> start;      // [T]
};

ScanInputs scan_inputs(const Tensor& x, const Tensor& dt_raw, const Tensor& dt_bias, const Tensor& a_log,
                       const Tensor& b, float dt_min, int64_t batch, const Tensor* doc_ids) {
  ScanInputs s;
  s.t = x.size(0);
  s.h = x.size(1);
  s.p = x.size(2);
  s.g = b.size(1);
  s.n = b.size(2);
  MF_CHECK(x.dim() == 3 && dt_raw.numel() == s.t * s.h && dt_bias.numel() == s.h && a_log.numel() == s.h &&
               b.dim() == 3 && b.size(0) == s.t && s.h % s.g == 0,
           "ssm_scan: x [T,H,P] ", shape_str(x.shape()), ", dt [T,H] ", shape_str(dt_raw.shape()), ", B [T,G,N] ",
           shape_str(b.shape()));
  s.heads_per_group = s.h / s.g;
  s.start = segment_starts(s.t, batch, doc_ids);
  const Tensor bias = as_f32(dt_bias), al = as_f32(a_log);
  s.a.resize(static_cast<size_t>(s.h));
  for (int64_t i = 0; i < s.h; ++i) s.a[i] = -std::exp(al.f32()[i]);
  s.dt.resize(static_cast<size_t>(s.t * s.h));
  s.floored.resize(s.dt.size());
  for (int64_t i = 0; i < s.t * s.h; ++i) {
    const float v = softplus(dt_raw.f32()[i] + bias.f32()[i % s.h]);
    s.floored[i] = v < dt_min;
    s.dt[i] = v < dt_min ? dt_min : v;
  }
  return s;
}

// One token of token i through head hd's state [P, N] (kept in S: double for the whole-sequence
// scan, F32 for the carried generation state): state = decay state + dt x B^T, y = state C + D x.
template <typename S>
void scan_token(const ScanInputs& s, int64_t i, int64_t hd, const Tensor& x, const Tensor& b, const Tensor& c,
                const Tensor& d, S* state, Tensor& y) {
  const int64_t grp = hd / s.heads_per_group;
  const double dt = s.dt[i * s.h + hd], decay = std::exp(dt * s.a[hd]);
  const float* xi = x.f32() + (i * s.h + hd) * s.p;
  const float* bi = b.f32() + (i * s.g + grp) * s.n;
  const float* ci = c.f32() + (i * s.g + grp) * s.n;
  float* yi = y.f32() + (i * s.h + hd) * s.p;
  for (int64_t pp = 0; pp < s.p; ++pp) {
    double out = 0;
    S* row = state + pp * s.n;
    for (int64_t nn = 0; nn < s.n; ++nn) {
      row[nn] = static_cast<S>(decay * row[nn] + dt * xi[pp] * bi[nn]);
      out += static_cast<double>(row[nn]) * ci[nn];
    }
    yi[pp] = static_cast<float>(out + static_cast<double>(d.f32()[hd]) * xi[pp]);
  }
}

}  // namespace

Tensor ssm_scan(const Tensor& x, const Tensor& dt_raw, const Tensor& dt_bias, const Tensor& a_log, const Tensor& b,
                const Tensor& c, const Tensor& d, float dt_min, int64_t batch, const Tensor* doc_ids) {
  const ScanInputs s = scan_inputs(x, dt_raw, dt_bias, a_log, b, dt_min, batch, doc_ids);
  const Tensor df = as_f32(d);
  Tensor y = Tensor::empty(x.shape(), DType::F32);
  const int64_t rows = s.t / batch;
#pragma omp parallel for collapse(2)
  for (int64_t r = 0; r < batch; ++r)
    for (int64_t hd = 0; hd < s.h; ++hd) {
      std::vector<double> state(static_cast<size_t>(s.p * s.n), 0.0);
      for (int64_t i = r * rows; i < (r + 1) * rows; ++i) {
        if (s.start[i] == i) std::fill(state.begin(), state.end(), 0.0);
        scan_token(s, i, hd, x, b, c, df, state.data(), y);
      }
    }
  return y;
}

Tensor ssm_step(const Tensor& x, const Tensor& dt_raw, const Tensor& dt_bias, const Tensor& a_log, const Tensor& b,
                const Tensor& c, const Tensor& d, float dt_min, Tensor& state) {
  const ScanInputs s = scan_inputs(x, dt_raw, dt_bias, a_log, b, dt_min, 1, nullptr);
  MF_CHECK(state.dtype() == DType::F32 && state.shape() == Shape({s.h, s.p, s.n}), "ssm_step: state must be F32 [",
           s.h, ", ", s.p, ", ", s.n, "], got ", dtype_name(state.dtype()), " ", shape_str(state.shape()));
  const Tensor df = as_f32(d);
  Tensor y = Tensor::empty(x.shape(), DType::F32);
#pragma omp parallel for
  for (int64_t hd = 0; hd < s.h; ++hd)
    for (int64_t i = 0; i < s.t; ++i) scan_token(s, i, hd, x, b, c, df, state.f32() + hd * s.p * s.n, y);
  return y;
}

void ssm_scan_backward(const Tensor& x, const Tensor& dt_raw, const Tensor& dt_bias, const Tensor& a_log,
                       const Tensor& b, const Tensor& c, const Tensor& d, float dt_min, int64_t batch,
                       const Tensor* doc_ids, const Tensor& dy, SsmScanGrads& g) {
  const ScanInputs s = scan_inputs(x, dt_raw, dt_bias, a_log, b, dt_min, batch, doc_ids);
  const Tensor df = as_f32(d), bias = as_f32(dt_bias);
  const int64_t rows = s.t / batch;
  g.dx = Tensor::zeros(x.shape(), DType::F32);
  g.ddt_raw = Tensor::zeros({s.t, s.h}, DType::F32);
  // Per head, then summed over the heads of a group (heads run in parallel).
  std::vector<double> db_h(static_cast<size_t>(s.t * s.h * s.n), 0.0), dc_h(db_h.size(), 0.0);
  std::vector<double> da(static_cast<size_t>(batch * s.h), 0.0), dd(da.size(), 0.0);
#pragma omp parallel for collapse(2)
  for (int64_t r = 0; r < batch; ++r)
    for (int64_t hd = 0; hd < s.h; ++hd) {
      const int64_t grp = hd / s.heads_per_group, first = r * rows, last = (r + 1) * rows;
      // The states after every token of the row, recomputed (the CPU is the reference: memory is
      // T x P x N per head, small at the sizes it runs).
      std::vector<double> states(static_cast<size_t>(rows * s.p * s.n));
      std::vector<double> state(static_cast<size_t>(s.p * s.n), 0.0);
      for (int64_t i = first; i < last; ++i) {
        if (s.start[i] == i) std::fill(state.begin(), state.end(), 0.0);
        const double dt = s.dt[i * s.h + hd], decay = std::exp(dt * s.a[hd]);
        const float* xi = x.f32() + (i * s.h + hd) * s.p;
        const float* bi = b.f32() + (i * s.g + grp) * s.n;
        for (int64_t pp = 0; pp < s.p; ++pp)
          for (int64_t nn = 0; nn < s.n; ++nn) {
            double& v = state[pp * s.n + nn];
            v = decay * v + dt * xi[pp] * bi[nn];
          }
        std::copy(state.begin(), state.end(), states.begin() + (i - first) * s.p * s.n);
      }
      // Backward through time: `gs` is d(loss)/d(state after token i).
      std::vector<double> gs(static_cast<size_t>(s.p * s.n), 0.0);
      for (int64_t i = last - 1; i >= first; --i) {
        const double dt = s.dt[i * s.h + hd], decay = std::exp(dt * s.a[hd]);
        const float* xi = x.f32() + (i * s.h + hd) * s.p;
        const float* bi = b.f32() + (i * s.g + grp) * s.n;
        const float* ci = c.f32() + (i * s.g + grp) * s.n;
        const float* gy = dy.f32() + (i * s.h + hd) * s.p;
        const double* st = states.data() + (i - first) * s.p * s.n;
        const double* prev = s.start[i] == i ? nullptr : st - s.p * s.n;
        float* dxi = g.dx.f32() + (i * s.h + hd) * s.p;
        double* dbi = db_h.data() + (i * s.h + hd) * s.n;
        double* dci = dc_h.data() + (i * s.h + hd) * s.n;
        double ddt = 0, dstate_prev = 0;  // dstate_prev: sum(gs * previous state)
        for (int64_t pp = 0; pp < s.p; ++pp) {
          dd[r * s.h + hd] += static_cast<double>(gy[pp]) * xi[pp];
          double dx_acc = static_cast<double>(df.f32()[hd]) * gy[pp];
          for (int64_t nn = 0; nn < s.n; ++nn) {
            double& gv = gs[pp * s.n + nn];
            gv += static_cast<double>(gy[pp]) * ci[nn];  // y = state C
            dci[nn] += st[pp * s.n + nn] * gy[pp];
            dx_acc += dt * gv * bi[nn];
            dbi[nn] += dt * gv * xi[pp];
            ddt += gv * xi[pp] * bi[nn];
            if (prev) dstate_prev += gv * prev[pp * s.n + nn];
            gv *= decay;  // to the previous state
          }
          dxi[pp] = static_cast<float>(dx_acc);
        }
        ddt += dstate_prev * s.a[hd] * decay;
        da[r * s.h + hd] += dstate_prev * dt * decay;
        if (s.start[i] == i) std::fill(gs.begin(), gs.end(), 0.0);  // nothing before a segment's start
        // dt = max(softplus(u), dt_min): no gradient where floored; softplus' = sigmoid (1 past 20).
        const int64_t k = i * s.h + hd;
        const float u = dt_raw.f32()[k] + bias.f32()[hd];
        g.ddt_raw.f32()[k] = s.floored[k] ? 0.f : static_cast<float>(ddt * (u > 20.f ? 1.0 : sigmoid(u)));
      }
    }
  g.ddt_bias = Tensor::zeros({s.h}, DType::F32);
  g.da_log = Tensor::zeros({s.h}, DType::F32);
  g.dd = Tensor::zeros({s.h}, DType::F32);
  for (int64_t hd = 0; hd < s.h; ++hd) {
    double sum_da = 0, sum_dd = 0, sum_dbias = 0;
    for (int64_t r = 0; r < batch; ++r) {
      sum_da += da[r * s.h + hd];
      sum_dd += dd[r * s.h + hd];
    }
    for (int64_t i = 0; i < s.t; ++i) sum_dbias += g.ddt_raw.f32()[i * s.h + hd];
    g.da_log.f32()[hd] = static_cast<float>(sum_da * s.a[hd]);  // A = -exp(A_log): dA/dA_log = A
    g.dd.f32()[hd] = static_cast<float>(sum_dd);
    g.ddt_bias.f32()[hd] = static_cast<float>(sum_dbias);
  }
  g.db = Tensor::zeros(b.shape(), DType::F32);
  g.dc = Tensor::zeros(c.shape(), DType::F32);
  for (int64_t i = 0; i < s.t; ++i)
    for (int64_t hd = 0; hd < s.h; ++hd) {
      const int64_t grp = hd / s.heads_per_group;
      for (int64_t nn = 0; nn < s.n; ++nn) {
        g.db.f32()[(i * s.g + grp) * s.n + nn] += static_cast<float>(db_h[(i * s.h + hd) * s.n + nn]);
        g.dc.f32()[(i * s.g + grp) * s.n + nn] += static_cast<float>(dc_h[(i * s.h + hd) * s.n + nn]);
      }
    }
}

Tensor gated_rms_norm(const Tensor& y, const Tensor& z, const Tensor& w, int64_t groups, float eps) {
  const int64_t t = y.size(0), width = y.size(1), gs = width / groups;
  MF_CHECK(y.dim() == 2 && z.shape() == y.shape() && w.numel() == width && width % groups == 0,
           "gated_rms_norm: y [T, I] ", shape_str(y.shape()), ", z ", shape_str(z.shape()), ", ", groups, " groups");
  const Tensor wf = as_f32(w);
  Tensor out = Tensor::empty(y.shape(), DType::F32);
  for (int64_t i = 0; i < t; ++i)
    for (int64_t gi = 0; gi < groups; ++gi) {
      const int64_t o = i * width + gi * gs;
      double ss = 0;
      std::vector<float> h(static_cast<size_t>(gs));
      for (int64_t j = 0; j < gs; ++j) {
        const float zz = z.f32()[o + j];
        h[j] = y.f32()[o + j] * (zz * sigmoid(zz));  // y * silu(z), then the group's RMS
        ss += static_cast<double>(h[j]) * h[j];
      }
      const float rstd = static_cast<float>(1.0 / std::sqrt(ss / gs + eps));
      for (int64_t j = 0; j < gs; ++j) out.f32()[o + j] = wf.f32()[gi * gs + j] * (h[j] * rstd);
    }
  return out;
}

void gated_rms_norm_backward(const Tensor& y, const Tensor& z, const Tensor& w, int64_t groups, float eps,
                             const Tensor& dout, Tensor& dy, Tensor& dz, Tensor& dw) {
  const int64_t t = y.size(0), width = y.size(1), gs = width / groups;
  const Tensor wf = as_f32(w);
  dy = Tensor::empty(y.shape(), DType::F32);
  dz = Tensor::empty(y.shape(), DType::F32);
  Tensor dwf = as_f32(dw);
  for (int64_t i = 0; i < t; ++i)
    for (int64_t gi = 0; gi < groups; ++gi) {
      const int64_t o = i * width + gi * gs;
      std::vector<double> h(static_cast<size_t>(gs)), gh(static_cast<size_t>(gs));
      double ss = 0;
      for (int64_t j = 0; j < gs; ++j) {
        const double zz = z.f32()[o + j];
        h[j] = y.f32()[o + j] * zz / (1.0 + std::exp(-zz));
        ss += h[j] * h[j];
      }
      const double rstd = 1.0 / std::sqrt(ss / gs + eps);
      double dot = 0;  // sum_j (dout_j w_j) h_j
      for (int64_t j = 0; j < gs; ++j) {
        gh[j] = static_cast<double>(dout.f32()[o + j]) * wf.f32()[gi * gs + j];
        dot += gh[j] * h[j];
        dwf.f32()[gi * gs + j] += static_cast<float>(dout.f32()[o + j] * h[j] * rstd);
      }
      for (int64_t j = 0; j < gs; ++j) {
        const double dh = rstd * gh[j] - rstd * rstd * rstd * h[j] * dot / gs;  // through h * rstd(h)
        const double zz = z.f32()[o + j], sg = 1.0 / (1.0 + std::exp(-zz)), silu = zz * sg;
        dy.f32()[o + j] = static_cast<float>(dh * silu);
        dz.f32()[o + j] = static_cast<float>(dh * y.f32()[o + j] * sg * (1.0 + zz * (1.0 - sg)));
      }
    }
  if (dwf.raw() != dw.raw()) convert_elements(dwf.raw(), DType::F32, dw.raw(), dw.dtype(), dw.numel());
}

}  // namespace moeforge::ops::cpu
