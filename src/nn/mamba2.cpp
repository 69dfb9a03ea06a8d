#include "nn/mamba2.h"

#include "core/error.h"
#include "ops/ops.h"

namespace moeforge::nn {

namespace {

// Columns [c0, c0 + n) of the rows of x [T, width] (a copy).
Tensor columns(const Tensor& x, int64_t c0, int64_t n) {
  Tensor out = ops::empty({x.size(0), n}, x.dtype(), x.device(), "Mamba2 columns");
  ops::copy_columns(x, x.size(1), c0, 1, out, n, 0, n);
  return out;
}

// `part` [T, n] into columns [c0, c0 + n) of `whole` [T, width] (converted to its dtype: on a GPU
// the scan's gradients are F32 beside activations in the compute dtype).
void put_columns(const Tensor& part, Tensor& whole, int64_t c0) {
  const Tensor p = part.dtype() == whole.dtype() ? part : ops::to_device(part, part.device(), whole.dtype());
  ops::copy_columns(p, p.numel() / p.size(0), 0, 1, whole, whole.size(1), c0, p.numel() / p.size(0));
}

}  // namespace

void Mamba2Mixer::init(ParamStore& ps, const std::string& prefix, int64_t hidden, const hf::ModelConfig::Mamba2& m,
                       float eps_) {
  heads = m.heads;
  head_dim = m.head_dim;
  groups = m.groups;
  state = m.state;
  inner = heads * head_dim;
  conv_dim = inner + 2 * groups * state;
  dt_min = static_cast<float>(m.dt_min);
  eps = eps_;
  MF_CHECK(inner % groups == 0, "Mamba2: ", inner, " channels do not split into ", groups, " groups");
  in_proj.init(ps, prefix + ".in_proj", hidden, inner + conv_dim + heads, m.proj_bias);
  conv_weight = ps.add(prefix + ".conv1d.weight", {conv_dim, 1, m.conv_kernel});
  if (m.conv_bias) {
    conv_bias = ps.add(prefix + ".conv1d.bias", {conv_dim});
    ps.all()[*conv_bias].decay = false;
  }
  dt_bias = ps.add(prefix + ".dt_bias", {heads});
  a_log = ps.add(prefix + ".A_log", {heads});
  d = ps.add(prefix + ".D", {heads});
  for (size_t i : {dt_bias, a_log, d}) ps.all()[i].decay = false;  // mamba_ssm's _no_weight_decay
  norm_weight = ps.add(prefix + ".norm.weight", {inner});
  ps.all()[norm_weight].decay = false;
  out_proj.init(ps, prefix + ".out_proj", inner, hidden, m.proj_bias);
}

Tensor Mamba2Mixer::forward(const ParamAccess& ps, const Tensor& x, int64_t batch, const Tensor* doc_ids,
                            Cache* cache, const MambaStates* carried) const {
  const int64_t t = x.size(0), gn = groups * state;
  const Tensor proj = in_proj.forward(ps, x);
  const Tensor z = columns(proj, 0, inner), dt = columns(proj, inner + conv_dim, heads);
  if (carried) {  // generation: each sequence's rows continue its own conv window and scan state
    const Tensor y = per_sequence(carried->offsets, inner, proj.dtype(), proj.device(), [&](size_t i, int64_t r0, int64_t n) {
      return step(ps, proj.slice0(r0, n), *carried->states[i]);
    });
    return out_proj.forward(ps, ops::gated_rms_norm(y, z, ps.value(norm_weight), groups, eps));
  }
  const Tensor conv = ops::causal_conv1d(columns(proj, inner, conv_dim), ps.value(conv_weight),
                                         conv_bias ? &ps.value(*conv_bias) : nullptr, batch, doc_ids, /*silu=*/true);
  const Tensor y = ops::ssm_scan(columns(conv, 0, inner).view({t, heads, head_dim}), dt, ps.value(dt_bias),
                                 ps.value(a_log), columns(conv, inner, gn).view({t, groups, state}),
                                 columns(conv, inner + gn, gn).view({t, groups, state}), ps.value(d), dt_min, batch,
                                 doc_ids)
                       .view({t, inner});
  if (cache) *cache = {x, proj, conv, y};
  return out_proj.forward(ps, ops::gated_rms_norm(y, z, ps.value(norm_weight), groups, eps));
}

Tensor Mamba2Mixer::step(const ParamAccess& ps, const Tensor& proj, MambaState& st) const {
  const int64_t t = proj.size(0), gn = groups * state;
  const int64_t k = ps.value(conv_weight).size(-1);
  const Device dev = proj.device();
  if (!st.window.defined()) {  // the sequence's start: the taps before it read zeros, the state is zero
    st.window = ops::zeros({k - 1, conv_dim}, proj.dtype(), dev, "Mamba2 conv window");
    st.ssm = ops::zeros({heads, head_dim, state}, DType::F32, dev, "Mamba2 scan state");
  }
  // The conv over [window | new inputs]: its last t outputs are the new tokens'; the last k-1 inputs
  // are the next window.
  Tensor joined = ops::empty({k - 1 + t, conv_dim}, proj.dtype(), dev, "Mamba2 conv inputs");
  copy_rows(st.window, joined, 0);
  copy_rows(columns(proj, inner, conv_dim), joined, k - 1);
  const Tensor conv = ops::causal_conv1d(joined, ps.value(conv_weight), conv_bias ? &ps.value(*conv_bias) : nullptr, 1,
                                         nullptr, /*silu=*/true)
                          .slice0(k - 1, t);
  st.window = ops::copy(joined.slice0(t, k - 1));
  return ops::ssm_step(columns(conv, 0, inner).view({t, heads, head_dim}), columns(proj, inner + conv_dim, heads),
                       ps.value(dt_bias), ps.value(a_log), columns(conv, inner, gn).view({t, groups, state}),
                       columns(conv, inner + gn, gn).view({t, groups, state}), ps.value(d), dt_min, st.ssm)
      .view({t, inner});
}

Tensor Mamba2Mixer::backward(ParamAccess& ps, Cache& c, int64_t batch, const Tensor* doc_ids, const Tensor& dy) const {
  const int64_t t = dy.size(0), gn = groups * state;
  const Tensor z = columns(c.proj, 0, inner);
  // Output projection and the gated norm (its output recomputed).
  const Tensor dg = out_proj.backward(ps, ops::gated_rms_norm(c.y, z, ps.value(norm_weight), groups, eps), dy);
  Tensor dscan, dz;
  Tensor frozen_norm;  // a frozen norm weight's gradient, discarded
  if (!ps.trainable(norm_weight)) frozen_norm = ops::zeros({inner}, DType::F32, dy.device());
  ops::gated_rms_norm_backward(c.y, z, ps.value(norm_weight), groups, eps, dg, dscan, dz,
                               ps.trainable(norm_weight) ? ps.grad(norm_weight) : frozen_norm);
  c.y = Tensor();
  // The scan.
  ops::SsmScanGrads g;
  ops::ssm_scan_backward(columns(c.conv, 0, inner).view({t, heads, head_dim}), columns(c.proj, inner + conv_dim, heads),
                         ps.value(dt_bias), ps.value(a_log), columns(c.conv, inner, gn).view({t, groups, state}),
                         columns(c.conv, inner + gn, gn).view({t, groups, state}), ps.value(d), dt_min, batch, doc_ids,
                         dscan.view({t, heads, head_dim}), g);
  for (auto [param, gradient] : {std::pair{dt_bias, &g.ddt_bias}, std::pair{a_log, &g.da_log}, std::pair{d, &g.dd}})
    if (ps.trainable(param)) ops::add_inplace(ps.grad(param), *gradient);
  c.conv = Tensor();
  // The conv (its input is the projection's xBC columns), then the projection.
  Tensor dconv = ops::empty({t, conv_dim}, g.dx.dtype(), g.dx.device(), "Mamba2 conv output gradient");
  put_columns(g.dx.view({t, inner}), dconv, 0);
  put_columns(g.db.view({t, gn}), dconv, inner);
  put_columns(g.dc.view({t, gn}), dconv, inner + gn);
  Tensor dxbc;
  // Frozen conv weights (LoRA) take their gradient into scratch: the op writes dx and dw in one pass.
  const bool conv_trains = ps.trainable(conv_weight);
  Tensor scratch_w, scratch_b;
  if (!conv_trains) {
    scratch_w = ops::zeros({ps.value(conv_weight).numel()}, DType::F32, dy.device());
    if (conv_bias) scratch_b = ops::zeros({conv_dim}, DType::F32, dy.device());
  }
  ops::causal_conv1d_backward(columns(c.proj, inner, conv_dim), ps.value(conv_weight),
                              conv_bias ? &ps.value(*conv_bias) : nullptr, batch, doc_ids, true, dconv, dxbc,
                              conv_trains ? ps.grad(conv_weight) : scratch_w,
                              conv_bias ? (conv_trains ? &ps.grad(*conv_bias) : &scratch_b) : nullptr);
  Tensor dproj = ops::empty(c.proj.shape(), dy.dtype(), dy.device(), "Mamba2 in_proj output gradient");
  put_columns(dz, dproj, 0);
  put_columns(dxbc, dproj, inner);
  put_columns(g.ddt_raw, dproj, inner + conv_dim);
  c.proj = Tensor();
  return in_proj.backward(ps, c.x, dproj);
}

void Relu2MLP::init(ParamStore& ps, const std::string& prefix, int64_t hidden, int64_t inter, bool bias) {
  up_proj.init(ps, prefix + ".up_proj", hidden, inter, bias);
  down_proj.init(ps, prefix + ".down_proj", inter, hidden, bias);
}

Tensor Relu2MLP::forward(const ParamAccess& ps, const Tensor& x, Cache* cache) const {
  Tensor h = up_proj.forward(ps, x);
  if (cache) *cache = {x, h};
  return down_proj.forward(ps, ops::relu2(h));
}

Tensor Relu2MLP::backward(ParamAccess& ps, Cache& c, const Tensor& dy) const {
  const Tensor da = down_proj.backward(ps, ops::relu2(c.h), dy);
  const Tensor dh = ops::relu2_backward(c.h, da);
  c.h = Tensor();
  return up_proj.backward(ps, c.x, dh);
}

}  // namespace moeforge::nn
