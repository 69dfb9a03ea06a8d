#include "nn/latent_attention.h"

#include <cmath>

#include "core/error.h"
#include "ops/ops.h"

namespace moeforge::nn {

namespace {

constexpr float kLatentNormEps = 1e-6f;  // DeepseekV3RMSNorm's default, used by q_a/kv_a norms

// Columns [c0, c0 + n) of the rows of x viewed as [rows, width], as [rows, n].
Tensor columns(const Tensor& x, int64_t rows, int64_t width, int64_t c0, int64_t n) {
  Tensor out = ops::empty({rows, n}, x.dtype(), x.device(), "latent attention columns");
  ops::copy_columns(x, width, c0, 1, out, n, 0, n);
  return out;
}

// x [T, n, rope] rotated by position (a new tensor); DeepSeek's interleaved pairs are de-interleaved
// first, which is what its apply_rotary_pos_emb_interleave computes.
Tensor rotate(const Tensor& x, const Tensor& cos, const Tensor& sin, bool interleave) {
  Tensor y = interleave ? ops::deinterleave_pairs(x, x.size(2)) : ops::copy(x);
  ops::rope_inplace(y, cos, sin);
  return y;
}

// The rotation's backward: d(x) from d(rotate(x)).
Tensor rotate_backward(const Tensor& dy, const Tensor& cos, const Tensor& sin, bool interleave) {
  Tensor d = ops::copy(dy);
  ops::rope_inplace(d, cos, sin, /*inverse=*/true);
  return interleave ? ops::interleave_pairs(d, d.size(2)) : d;
}

}  // namespace

float latent_attention_scale(const hf::RopeConfig& rope, int64_t qk_head_dim) {
  double scale = 1.0 / std::sqrt(static_cast<double>(qk_head_dim));
  if (rope.type != "default" && rope.mscale_all_dim && *rope.mscale_all_dim != 0.0 && rope.factor > 1.0) {
    const double m = 0.1 * *rope.mscale_all_dim * std::log(rope.factor) + 1.0;
    scale *= m * m;
  }
  return static_cast<float>(scale);
}

void LatentAttention::init(ParamStore& ps, const std::string& prefix, int64_t hidden, int64_t heads_,
                           const hf::ModelConfig::LatentAttention& mla, bool bias, float scale_) {
  heads = heads_;
  nope = mla.qk_nope_head_dim;
  rope = mla.qk_rope_head_dim;
  v_dim = mla.v_head_dim;
  kv_rank = mla.kv_lora_rank;
  interleave = mla.rope_interleave;
  scale = scale_;
  const int64_t qk = nope + rope;
  if (mla.q_lora_rank > 0) {
    q_a_proj.emplace();
    q_a_proj->init(ps, prefix + ".q_a_proj", hidden, mla.q_lora_rank, bias);
    q_a_norm.emplace();
    q_a_norm->init(ps, prefix + ".q_a_layernorm.weight", mla.q_lora_rank, kLatentNormEps);
    q_b_proj.emplace();
    q_b_proj->init(ps, prefix + ".q_b_proj", mla.q_lora_rank, heads * qk, false);
  } else {
    q_proj.emplace();
    q_proj->init(ps, prefix + ".q_proj", hidden, heads * qk, false);
  }
  kv_a_proj.init(ps, prefix + ".kv_a_proj_with_mqa", hidden, kv_rank + rope, bias);
  kv_a_norm.init(ps, prefix + ".kv_a_layernorm.weight", kv_rank, kLatentNormEps);
  kv_b_proj.init(ps, prefix + ".kv_b_proj", kv_rank, heads * (nope + v_dim), false);
  o_proj.init(ps, prefix + ".o_proj", heads * v_dim, hidden, bias);
}

Tensor LatentAttention::forward(const ParamAccess& ps, const Tensor& x, int64_t batch, int64_t seq, const Tensor& cos,
                                const Tensor& sin, const Tensor* doc_ids, Cache* cache, const KvCaches* kv) const {
  const int64_t t = batch * seq, qk = nope + rope;
  Tensor qa, qn, rstd_qa, q;
  if (q_proj) {
    q = q_proj->forward(ps, x);
  } else {
    qa = q_a_proj->forward(ps, x);
    qn = q_a_norm->forward(ps, qa, &rstd_qa);
    q = q_b_proj->forward(ps, qn);
  }
  const Tensor ckv = kv_a_proj.forward(ps, x);
  const Tensor latent = columns(ckv, t, kv_rank + rope, 0, kv_rank);
  const Tensor k_rope = rotate(columns(ckv, t, kv_rank + rope, kv_rank, rope).view({t, 1, rope}), cos, sin, interleave);
  Tensor rstd_kv;
  const Tensor latent_n = kv_a_norm.forward(ps, latent, &rstd_kv);
  const Tensor kvb = kv_b_proj.forward(ps, latent_n);  // [T, H * (nope + v)]
  // Per head: q = [q_nope | rotated q_rope] (in place), k = [k_nope | the shared rotated k_rope], v.
  const Tensor q_rope = rotate(columns(q, t * heads, qk, nope, rope).view({t, heads, rope}), cos, sin, interleave);
  ops::copy_columns(q_rope, rope, 0, 1, q, qk, nope, rope);
  Tensor kf = ops::empty({t * heads, qk}, kvb.dtype(), kvb.device(), "latent attention keys");
  ops::copy_columns(kvb, nope + v_dim, 0, 1, kf, qk, 0, nope);
  ops::copy_columns(k_rope, rope, 0, heads, kf, qk, nope, rope);  // the shared key, to every head
  Tensor v = columns(kvb, t * heads, nope + v_dim, nope, v_dim);
  Tensor q4 = q.view({batch, seq, heads, qk}), k4 = kf.view({batch, seq, heads, qk}),
         v4 = v.view({batch, seq, heads, v_dim});
  if (kv) {  // generation: each sequence's rows against its own cache
    const Tensor q3 = q.view({t, heads, qk}), k3 = kf.view({t, heads, qk}), v3 = v.view({t, heads, v_dim});
    const Tensor o = per_sequence(kv->offsets, heads * v_dim, q.dtype(), q.device(), [&](size_t i, int64_t r0, int64_t n) {
      Tensor k_att, v_att;
      kv->states[i]->append(k3.slice0(r0, n), v3.slice0(r0, n), k_att, v_att);
      return ops::attention(q3.slice0(r0, n).view({1, n, heads, qk}), k_att, v_att, scale, std::nullopt, nullptr,
                            nullptr, nullptr);
    });
    return o_proj.forward(ps, o);
  }
  Tensor lse;
  Tensor o = ops::attention(q4, k4, v4, scale, std::nullopt, doc_ids, nullptr, cache ? &lse : nullptr)
                 .view({t, heads * v_dim});
  if (cache) *cache = {x, qa, qn, rstd_qa, latent, latent_n, rstd_kv, q4, k4, v4, o, lse};
  return o_proj.forward(ps, o);
}

Tensor LatentAttention::backward(ParamAccess& ps, Cache& c, int64_t batch, int64_t seq, const Tensor& cos,
                                 const Tensor& sin, const Tensor* doc_ids, const Tensor& dy) const {
  const int64_t t = batch * seq, qk = nope + rope;
  Tensor d_o = o_proj.backward(ps, c.o, dy).view({batch, seq, heads, v_dim});
  Tensor dq, dk, dv;
  const Tensor o4 = c.o.view({batch, seq, heads, v_dim});
  ops::attention_backward(c.q, c.k, c.v, d_o, scale, std::nullopt, doc_ids, dq, dk, dv, nullptr, nullptr, &o4,
                          c.lse.defined() ? &c.lse : nullptr);
  d_o = Tensor();
  c.q = c.k = c.v = c.o = c.lse = Tensor();
  // Queries: the rope part back through its rotation.
  dq = dq.view({t * heads, qk});
  const Tensor dq_rope =
      rotate_backward(columns(dq, t * heads, qk, nope, rope).view({t, heads, rope}), cos, sin, interleave);
  ops::copy_columns(dq_rope, rope, 0, 1, dq, qk, nope, rope);
  dq = dq.view({t, heads * qk});
  // Keys and values: [k_nope | v] per head into kv_b; the shared k_rope sums over the heads.
  dk = dk.view({t * heads, qk});
  Tensor dkvb = ops::empty({t * heads, nope + v_dim}, dk.dtype(), dk.device(), "kv_b output gradient");
  ops::copy_columns(dk, qk, 0, 1, dkvb, nope + v_dim, 0, nope);
  ops::copy_columns(dv, v_dim, 0, 1, dkvb, nope + v_dim, nope, v_dim);
  Tensor dk_rope = rotate_backward(ops::sum_row_groups(dk, qk, nope, rope, heads).view({t, 1, rope}), cos, sin, interleave);
  dk = dv = Tensor();
  const Tensor dlatent_n = kv_b_proj.backward(ps, c.latent_n, dkvb.view({t, heads * (nope + v_dim)}));
  dkvb = Tensor();
  const Tensor dlatent = kv_a_norm.backward(ps, c.latent, dlatent_n, c.rstd_kv.defined() ? &c.rstd_kv : nullptr);
  Tensor dckv = ops::empty({t, kv_rank + rope}, dlatent.dtype(), dlatent.device(), "kv_a output gradient");
  ops::copy_columns(dlatent, kv_rank, 0, 1, dckv, kv_rank + rope, 0, kv_rank);
  ops::copy_columns(dk_rope, rope, 0, 1, dckv, kv_rank + rope, kv_rank, rope);
  Tensor dx = ops::empty({t, c.x.size(1)}, dy.dtype(), dy.device(), "latent attention input gradient");
  kv_a_proj.backward_into(ps, c.x, dckv, dx, false);
  if (q_proj) {
    q_proj->backward_into(ps, c.x, dq, dx, true);
  } else {
    const Tensor dqn = q_b_proj->backward(ps, c.qn, dq);
    const Tensor dqa = q_a_norm->backward(ps, c.qa, dqn, c.rstd_qa.defined() ? &c.rstd_qa : nullptr);
    q_a_proj->backward_into(ps, c.x, dqa, dx, true);
  }
  return dx;
}

}  // namespace moeforge::nn
