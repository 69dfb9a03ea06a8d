// DeepSeek-V3's multi-head latent attention (MLA), as Transformers' DeepseekV3Attention computes it:
//   q   = q_b(rms(q_a(x)))  (or q_proj(x) without q LoRA), per head [nope | rope]
//   ckv = kv_a_proj_with_mqa(x) = [latent (kv_lora_rank) | k_rope (qk_rope_head_dim, one head)]
//   [k_nope | v] per head = kv_b(rms(latent))
//   q_rope, k_rope rotated (interleaved pairs when rope_interleave), k_rope shared by every head
//   o = softmax(scale * [q_nope|q_rope] . [k_nope|k_rope]) v ; out = o_proj(o)
// Keys are nope + rope wide, values v_head_dim wide. The norms' eps is 1e-6 whatever rms_norm_eps
// says (DeepseekV3RMSNorm's default, which the attention's norms keep).
#pragma once
#include <optional>

#include "core/tensor.h"
#include "hf/config.h"
#include "nn/generation_state.h"
#include "nn/layers.h"
#include "nn/params.h"

namespace moeforge::nn {

struct LatentAttention {
  struct Cache {
    Tensor x, qa, qn, rstd_qa;         // input; q LoRA's projection, its normalised value and statistics
    Tensor latent, latent_n, rstd_kv;  // the kv latent before and after its norm, and its statistics
    Tensor q, k, v, o, lse;            // attention inputs [B,S,H,*] (after RoPE), output [T, H*v], log-sum-exp
  };
  std::optional<Linear> q_proj, q_a_proj, q_b_proj;
  std::optional<RMSNorm> q_a_norm;
  Linear kv_a_proj, kv_b_proj, o_proj;
  RMSNorm kv_a_norm;
  int64_t heads = 0, nope = 0, rope = 0, v_dim = 0, kv_rank = 0;
  bool interleave = true;
  float scale = 1.f;

  // `scale`: the softmax scale (DeepSeek-V3 multiplies qk_head_dim^-0.5 by YaRN's mscale squared).
  void init(ParamStore& ps, const std::string& prefix, int64_t hidden, int64_t heads_,
            const hf::ModelConfig::LatentAttention& mla, bool bias, float scale_);
  // x [B*S, hidden]; cos/sin [B*S, rope]; doc_ids [B,S] optional. `kv` (generation; x's rows are the
  // new tokens of one or more sequences, batch 1): each sequence's per-head keys [nope | rope] and
  // values of its earlier positions (Transformers' cache holds the same).
  Tensor forward(const ParamAccess& ps, const Tensor& x, int64_t batch, int64_t seq, const Tensor& cos,
                 const Tensor& sin, const Tensor* doc_ids, Cache* cache = nullptr, const KvCaches* kv = nullptr) const;
  Tensor backward(ParamAccess& ps, Cache& c, int64_t batch, int64_t seq, const Tensor& cos, const Tensor& sin,
                  const Tensor* doc_ids, const Tensor& dy) const;
};

// The softmax scale of DeepSeek-V3's attention: qk_head_dim^-0.5, times mscale(factor,
// mscale_all_dim)^2 under a RoPE scaling with mscale_all_dim (yarn_apply_mscale).
float latent_attention_scale(const hf::RopeConfig& rope, int64_t qk_head_dim);

}  // namespace moeforge::nn
