// LoRA (Hu et al., 2021) on a linear layer, as PEFT computes it: y = base(x) + scale * (x A^T) B^T
// with A [r, in] and B [out, r] and scale = alpha / r (alpha / sqrt(r) with rsLoRA). A and B are
// ordinary parameters of the model's ParamStore, registered beside the base weight under PEFT's
// module names (`<module>.lora_A.weight`, `<module>.lora_B.weight`) and flagged `lora`.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "nn/params.h"

namespace moeforge::nn {

// The LoRA dropout of the training step running on this thread: its seed while a scope is alive
// (Decoder::forward_backward opens one from TrainStepOptions::lora_dropout_seed); no scope, no
// dropout (inference and eval, as PEFT in eval mode).
class LoraDropoutScope {
 public:
  explicit LoraDropoutScope(std::optional<uint64_t> seed);
  ~LoraDropoutScope();
  LoraDropoutScope(const LoraDropoutScope&) = delete;
  LoraDropoutScope& operator=(const LoraDropoutScope&) = delete;

 private:
  std::optional<uint64_t> saved_;
};
std::optional<uint64_t> lora_dropout_seed();

struct LoraAdapter {
  size_t a = 0, b = 0;
  float scale = 1.f;
  // PEFT's lora_dropout on the adapter's input (y = W x + scale B A dropout(x)); the mask of a step
  // comes from its seed and `salt` (the module's name), so backward and recomputation reproduce it.
  float dropout = 0.f;
  uint64_t salt = 0;
  // module: the adapted layer's name without ".weight" ("model.layers.0.self_attn.q_proj").
  void init(ParamStore& ps, const std::string& module, int64_t in, int64_t out, int64_t rank, float scale_,
            float dropout_ = 0.f);
  // y += scale * (x A^T) B^T.
  void forward_add(const ParamAccess& ps, const Tensor& x, Tensor& y) const;
  // Accumulates the gradients of A and B and adds the adapter's part of d(x) into dx.
  void backward(ParamAccess& ps, const Tensor& x, const Tensor& dy, Tensor& dx) const;

 private:
  // The adapter's view of an input (or of a gradient w.r.t. it): dropped out when a step's seed is set.
  Tensor dropped(const Tensor& x) const;
};

// LoRA on a MoE layer's local experts, held fused for the grouped GEMMs (no per-expert loop):
//   `<gate_up>.lora_A.weight` [E, blocks*r, width]
//   `<gate_up>.lora_B.weight` [E, gate_up rows, blocks*r]
//   `<down>.lora_A.weight` [E, r, I], `<down>.lora_B.weight` [E, width, r]
// (<gate_up>, <down>: the fused expert weights' internal names; the gate_up rows in the order of the
// fused weight's outputs: gate then up, GPT-OSS's interleaved, or up alone for relu^2 experts).
// blocks = 2: per expert and projection as PEFT names them for checkpoints with per-expert modules
// (experts.{e}.gate_proj / up_proj: A [r, in], B [I, r] each): A stacks gate's rows then up's, and
// B is block-diagonal, its off-diagonal blocks held at zero (their gradient is zeroed), so gate and
// up adapt apart (costing half of gate_up's B more memory than separate tensors).
// blocks = 1: one rank-r adapter on the whole fused parameter, as PEFT's `target_parameters` puts
// it on Transformers 5's 3-D expert weights (gate and up share A).
enum class ExpertAdapters { None, PerExpert, Fused };
struct ExpertLora {
  size_t gate_up_a = 0, gate_up_b = 0, down_a = 0, down_b = 0;
  int64_t blocks = 2;
  float scale = 1.f;
  // gate_up_name, down_name: the fused expert weights' internal names (the adapters are named after
  // them: "<gate_up_name>.lora_A.weight", ...); experts: this rank's; gate_up_rows: the fused
  // gate_up weight's outputs (2I gated, I ungated).
  void init(ParamStore& ps, const std::string& gate_up_name, const std::string& down_name, int64_t experts,
            int64_t width, int64_t inter, int64_t gate_up_rows, int64_t blocks_, int64_t rank, float scale_);
  // h [rows, parts*I] += the adapters' gate|up output for the expert rows xs; y [rows, width] likewise for down.
  void gate_up_forward(const ParamAccess& ps, const Tensor& xs, const std::vector<int64_t>& off, Tensor& h) const;
  void down_forward(const ParamAccess& ps, const Tensor& act, const std::vector<int64_t>& off, Tensor& y) const;
  // Accumulate A's and B's gradients and add the adapters' part of the input gradient.
  void gate_up_backward(ParamAccess& ps, const Tensor& xs, const std::vector<int64_t>& off, const Tensor& d_h,
                        Tensor& d_xs) const;
  void down_backward(ParamAccess& ps, const Tensor& act, const std::vector<int64_t>& off, const Tensor& d_y,
                     Tensor& d_act) const;
};

}  // namespace moeforge::nn
