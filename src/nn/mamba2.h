// Nemotron-H's Mamba2 mixer and relu^2 MLP, as Transformers' NemotronHMamba2Mixer (its torch path)
// and NemotronHMLP compute them:
//   [z | xBC | dt] = in_proj(x); xBC = silu(causal depthwise conv1d(xBC)); [x | B | C] = xBC
//   y = selective scan (dt = max(softplus(dt + dt_bias), time_step_min), A = -exp(A_log), D skip)
//   out = out_proj(gated_rms_norm(y, z))  (y * silu(z), RMS over n_groups column groups, weight)
// with I = heads * head_dim channels and B, C of n_groups x ssm_state_size each. The documents of a
// packed row are separate sequences (the conv window and the scan state restart at each).
#pragma once
#include <optional>
#include <string>

#include "core/tensor.h"
#include "hf/config.h"
#include "nn/generation_state.h"
#include "nn/layers.h"
#include "nn/params.h"

namespace moeforge::nn {

struct Mamba2Mixer {
  struct Cache {
    Tensor x, proj, conv, y;  // input; in_proj output [T, I + C + H]; conv + SiLU output [T, C]; scan output [T, I]
  };
  Linear in_proj, out_proj;
  size_t conv_weight = 0, dt_bias = 0, a_log = 0, d = 0, norm_weight = 0;
  std::optional<size_t> conv_bias;
  int64_t heads = 0, head_dim = 0, groups = 1, state = 0, inner = 0, conv_dim = 0;
  float dt_min = 0.f, eps = 1e-5f;
  // prefix: "model.layers.3.mixer"; eps: the gated norm's (layer_norm_epsilon).
  void init(ParamStore& ps, const std::string& prefix, int64_t hidden, const hf::ModelConfig::Mamba2& m, float eps_);
  // x [B*S, hidden]; doc_ids [B, S] (optional). `states` (generation; x's rows are the new tokens
  // of one or more sequences, batch 1): each sequence's conv window and scan state, which its rows
  // continue and update (Transformers' cached decode: causal_conv1d_update and
  // selective_state_update); empty tensors: the sequence's start.
  Tensor forward(const ParamAccess& ps, const Tensor& x, int64_t batch, const Tensor* doc_ids, Cache* cache = nullptr,
                 const MambaStates* states = nullptr) const;
  Tensor backward(ParamAccess& ps, Cache& c, int64_t batch, const Tensor* doc_ids, const Tensor& dy) const;

 private:
  // The conv and scan of a generation step from the in_proj output `proj` [T, ...]: the scan output [T, I].
  Tensor step(const ParamAccess& ps, const Tensor& proj, MambaState& st) const;
};

// down(relu(up(x))^2): Nemotron-H's dense MLP and shared expert.
struct Relu2MLP {
  struct Cache {
    Tensor x, h;  // input; up's output (the activation is recomputed from it)
  };
  Linear up_proj, down_proj;
  void init(ParamStore& ps, const std::string& prefix, int64_t hidden, int64_t inter, bool bias);
  Tensor forward(const ParamAccess& ps, const Tensor& x, Cache* cache = nullptr) const;
  Tensor backward(ParamAccess& ps, Cache& c, const Tensor& dy) const;
};

}  // namespace moeforge::nn
