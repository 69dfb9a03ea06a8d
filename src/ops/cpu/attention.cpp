// Reference attention: for each (batch, head), scores = q k^T * scale with the causal, sliding
// window and document masks, softmax in fp32 (with the head's sink logit when given), then the
// weighted sum of v (whose head dim may differ from q/k's, as in MLA). Memory is S x S per
// thread, fine for the reference; the CUDA backend uses a flash kernel. Keys may outnumber queries
// (a generation step over a key/value cache): the queries are then the last positions.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/error.h"
#include "ops/cpu/attention_row.h"
#include "ops/cpu/cpu_ops.h"

namespace moeforge::ops::cpu {


Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, float scale, std::optional<int64_t> window,
                 const Tensor* doc_ids, const Tensor* sinks, Tensor* lse) {
  MF_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention: expected [B,S,H,D] tensors");
  const int64_t b = q.size(0), s = q.size(1), hq = q.size(2), d = q.size(3), hkv = k.size(2), dv = v.size(3);
  const int64_t sk = k.size(1), offset = sk - s;  // a generation step's queries are the last s positions
  MF_CHECK(k.size(0) == b && sk >= s && k.size(3) == d && v.size(0) == b && v.size(1) == sk && v.size(2) == hkv &&
               hkv > 0 && hq % hkv == 0,
           "attention: q ", shape_str(q.shape()), ", k ", shape_str(k.shape()), " and v ", shape_str(v.shape()),
           " do not agree");
  if (doc_ids) MF_CHECK(doc_ids->shape() == Shape({b, s}) && sk == s, "attention: doc_ids must be [B, S] (and keys as many as queries)");
  if (sinks) MF_CHECK(sinks->numel() == hq, "attention: sinks must have one value per query head (", hq, ")");
  const Tensor sinks32 = sinks ? sinks->to(DType::F32) : Tensor();
  Tensor out = Tensor::empty({b, s, hq, dv}, DType::F32);
  if (lse) *lse = Tensor::empty({b, hq, s}, DType::F32);
  float* lp = lse ? lse->f32() : nullptr;
  const float* qp = q.f32();
  const float* kp = k.f32();
  const float* vp = v.f32();
  float* op = out.f32();
  const int64_t* docs = doc_ids ? doc_ids->i64() : nullptr;
  const int64_t group = hq / hkv;
#pragma omp parallel
  {
    std::vector<float> p(static_cast<size_t>(sk));
#pragma omp for collapse(3) schedule(static)
    for (int64_t bi = 0; bi < b; ++bi)
      for (int64_t h = 0; h < hq; ++h)
        for (int64_t i = 0; i < s; ++i) {
          const int64_t kh = h / group, pos = i + offset;
          const float* qi = qp + ((bi * s + i) * hq + h) * d;
          attention_row_probs(qi, kp + (bi * sk * hkv + kh) * d, hkv * d, d, pos, scale, window,
                              docs ? docs + bi * s : nullptr, p.data(),
                              sinks ? sinks32.f32()[h] : -std::numeric_limits<float>::infinity(), nullptr,
                              lp ? lp + (bi * hq + h) * s + i : nullptr);
          float* oi = op + ((bi * s + i) * hq + h) * dv;
          std::fill(oi, oi + dv, 0.f);
          for (int64_t j = 0; j <= pos; ++j) {
            if (p[j] == 0.f) continue;
            const float w = p[j];
            const float* vj = vp + ((bi * sk + j) * hkv + kh) * dv;
            for (int64_t x = 0; x < dv; ++x) oi[x] += w * vj[x];
          }
        }
  }
  return out;
}

}  // namespace moeforge::ops::cpu
