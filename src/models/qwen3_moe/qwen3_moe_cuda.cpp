// Qwen3-MoE's forward composed from the CUDA ops: the same computation as Qwen3Moe::forward, layer
// by layer, with each residual add fused into the next RMSNorm and the experts run as routing plan
// -> permute -> grouped gate_up -> SwiGLU -> grouped down -> weighted unpermute.
#include "core/error.h"
#include "models/qwen3_moe/qwen3_moe.h"

#ifdef MOEFORGE_HAVE_CUDA
#include <cmath>
#include <cstring>

#include "ops/cuda/ops_cuda.h"
#include "ops/cuda/runtime.h"
#endif

namespace moeforge::models {

#ifndef MOEFORGE_HAVE_CUDA
Tensor Qwen3Moe::forward_logits_on_gpu(const ForwardInputs&, DType) const {
  MF_THROW("this moeforge was built without the CUDA backend");
}
#else

Tensor Qwen3Moe::forward_logits_on_gpu(const ForwardInputs& in, DType dt) const {
  const Batch bt = prepare(in);
  const int64_t t = bt.b * bt.s, hd = cfg_.head_dim;
  auto up = [&](size_t idx) { return cuda::to_device(params_.at(idx), dt); };
  auto linear_w = [&](const nn::Linear& lin, const char* what) {
    MF_CHECK(!lin.bias, "GPU forward: ", what, " has a bias, which the GPU path does not support yet");
    return up(lin.weight);
  };
  Tensor ids = cuda::to_device(in.input_ids.view({t}), DType::I64);
  Tensor cos = cuda::to_device(bt.cos, DType::F32), sin = cuda::to_device(bt.sin, DType::F32);
  Tensor docs;
  if (bt.doc_ids) docs = cuda::to_device(*bt.doc_ids, DType::I64);
  Tensor x = cuda::embedding(ids, up(embed_));
  Tensor pending;  // the last sub-block's output, added to x by the next fused add+norm
  for (size_t l = 0; l < layers_.size(); ++l) {
    const Layer& L = layers_[l];
    const float eps = L.input_norm.eps;
    Tensor n = pending.defined() ? cuda::add_rms_norm(pending, x, up(L.input_norm.weight), eps)
                                 : cuda::rms_norm(x, up(L.input_norm.weight), eps);
    const auto& A = L.attn;
    Tensor q = cuda::linear(n, linear_w(A.q_proj, "q_proj")).view({t * A.heads, hd});
    Tensor k = cuda::linear(n, linear_w(A.k_proj, "k_proj")).view({t * A.kv_heads, hd});
    Tensor v = cuda::linear(n, linear_w(A.v_proj, "v_proj"));
    if (A.q_norm) {
      q = cuda::rms_norm(q, up(A.q_norm->weight), A.q_norm->eps);
      k = cuda::rms_norm(k, up(A.k_norm->weight), A.k_norm->eps);
    }
    q = q.view({t, A.heads, hd});
    k = k.view({t, A.kv_heads, hd});
    cuda::rope_inplace(q, cos, sin);
    cuda::rope_inplace(k, cos, sin);
    Tensor o = cuda::attention(q.view({bt.b, bt.s, A.heads, hd}), k.view({bt.b, bt.s, A.kv_heads, hd}),
                               v.view({bt.b, bt.s, A.kv_heads, hd}), 1.0f / std::sqrt(static_cast<float>(hd)),
                               A.window ? *A.window : 0, bt.doc_ids ? &docs : nullptr, nullptr);
    Tensor a = cuda::linear(o.view({t, A.heads * hd}), linear_w(A.o_proj, "o_proj"));
    Tensor n2 = cuda::add_rms_norm(a, x, up(L.post_attention_norm.weight), L.post_attention_norm.eps);
    if (const auto* moe = std::get_if<nn::SparseMoE>(&L.mlp)) {
      MF_CHECK(!(bt.routing && bt.routing->mode == RoutingControl::Mode::Replay), "GPU forward: routing replay is not supported yet");
      Tensor router_logits = cuda::linear(n2, up(moe->router));
      Tensor probs, weights, chosen;
      cuda::router_softmax_topk(router_logits, moe->top_k, moe->norm_topk_prob, probs, weights, chosen);
      const auto plan = cuda::plan_routing(chosen, moe->experts);
      Tensor xp = cuda::permute_tokens(n2, plan);
      Tensor gu = cuda::empty({t * moe->top_k, 2 * moe->inter}, dt, "expert gate_up output");
      cuda::grouped_linear(xp, up(moe->gate_up), plan.offsets, gu);
      Tensor act = cuda::swiglu(gu);
      Tensor y = cuda::empty({t * moe->top_k, moe->hidden}, dt, "expert output");
      cuda::grouped_linear(act, up(moe->down), plan.offsets, y);
      pending = cuda::unpermute_tokens(y, weights, plan);
    } else {
      const auto& mlp = std::get<nn::DenseMLP>(L.mlp);
      // gate and up as one [2I, H] weight, so SwiGLU reads them side by side.
      const Tensor& g = params_.at(mlp.gate_proj.weight);
      const Tensor& u = params_.at(mlp.up_proj.weight);
      Tensor gu_w = Tensor::empty({g.size(0) + u.size(0), g.size(1)}, g.dtype());
      std::memcpy(gu_w.raw(), g.raw(), g.nbytes());
      std::memcpy(static_cast<char*>(gu_w.raw()) + g.nbytes(), u.raw(), u.nbytes());
      Tensor act = cuda::swiglu(cuda::linear(n2, cuda::to_device(gu_w, dt)));
      pending = cuda::linear(act, linear_w(mlp.down_proj, "down_proj"));
    }
  }
  Tensor n = pending.defined() ? cuda::add_rms_norm(pending, x, up(final_norm_.weight), final_norm_.eps)
                               : cuda::rms_norm(x, up(final_norm_.weight), final_norm_.eps);
  Tensor logits = cuda::linear(n, up(lm_head_));
  return cuda::to_host_f32(logits).view({bt.b, bt.s, cfg_.vocab_size});
}

#endif

}  // namespace moeforge::models
