// A causal language model: config, parameters in the internal layout, the adapter that maps them
// to the checkpoint's names, and a forward pass that returns logits and the Transformers loss.
#pragma once
#include <cmath>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "parallel/communicator.h"
#include "hf/config.h"
#include "hf/state_dict.h"
#include "nn/lora.h"
#include "nn/params.h"

namespace moeforge::models {

// Routing control for the MoE layers (on every device): Record stores each MoE layer's choice of
// experts; Replay uses stored choices instead of the top-k (gradient checks); Balanced sends token
// t's slot j to expert (t*k + j) mod E, every expert getting the same rows (the benchmarks'
// balanced routing). Under Replay and Balanced the routing weights are still the router's
// probabilities at the experts given, so the router learns.
struct RoutingControl {
  enum class Mode { Record, Replay, Balanced } mode = Mode::Record;
  std::vector<Tensor> chosen;  // one [T, k] I64 tensor per MoE layer, in layer order (Record, Replay)
};

// How this rank takes part in a multi-rank run; all null in a single process. The same groups
// over gloo (host tensors) or NCCL (device tensors): a model's layers are built for the
// expert-parallel group's size, and a run on GPUs passes its NCCL group for the exchange.
struct Parallel {
  parallel::Communicator* world = nullptr;  // every rank; they split the batch (load-balancing statistics, host)
  parallel::Communicator* ep = nullptr;     // the expert-parallel group: MoE layers hold E / its size experts
};

struct ForwardInputs {
  Tensor input_ids;                 // [B, S] I64
  const Tensor* labels = nullptr;   // [B, S] I64, -100 = ignored; shifted inside as Transformers does
  const Tensor* position_ids = nullptr;  // [B, S] I64; default 0..S-1 per row
  const Tensor* doc_ids = nullptr;       // [B, S] I64; packed documents do not attend to each other
  RoutingControl* routing = nullptr;
  // false: no logits, only the loss (the LM head and cross-entropy fused in chunks on the
  // parameters' device: evaluation without [B, S, V] logits on the host). Needs labels.
  bool logits = true;
  // true: the logits stay where the parameters are (F32 on the GPU for a model uploaded there), for
  // the Python API's DLPack export without a host copy; false: F32 on the host.
  bool logits_on_device = false;
};

struct ForwardOutputs {
  Tensor logits;             // [B, S, V] F32 (on the host unless ForwardInputs::logits_on_device)
  float loss = NAN;          // mean cross-entropy over counted tokens (+ coef * aux when enabled)
  float aux_loss = NAN;      // load-balancing loss when the config asks for it
  int64_t loss_tokens = 0;   // tokens the cross-entropy counted
  double ce_sum = 0;         // the summed cross-entropy over them (loss = ce_sum / loss_tokens + aux)
};

// One training micro-step: forward with the saved state backward needs, the loss, and backward
// accumulating into the parameters' gradients.
struct TrainStepOptions {
  float ce_scale = 1.f;   // gradient of the summed token cross-entropy (1 / tokens in the global batch)
  float aux_scale = 0.f;  // gradient of the load-balancing loss (coef / micro-batches), if enabled
  bool activation_checkpointing = false;  // keep only each layer's input; recompute in backward
  // Multi-token prediction (DeepSeek-V3): per depth, the gradient scale of its summed
  // cross-entropy (mtp_loss_scale / depths / the depth's counted targets in the global batch).
  // Empty: the MTP layers are not run (they are kept, unchanged, for saving).
  std::vector<float> mtp_scales;
  // Called during backward with the parameters whose gradients are complete for this micro-batch
  // (a layer's, once its backward is done; under ZeRO-3 after they were summed into this rank's
  // blocks): the optimizer-in-backward path applies AdamW to them and frees their gradients, so
  // all the gradients never exist at once.
  std::function<void(const std::vector<size_t>&)> on_grads_ready;
  // LoRA dropout (nn::LoraDropoutScope): this micro-step's seed; none, no dropout.
  std::optional<uint64_t> lora_dropout_seed;
  // Token chunks a MoE layer splits its expert exchange into (nn::RunContext::ep_chunks).
  int ep_chunks = 1;
  // Marks the end of a named phase of the step (gpu::PhaseTimes; null: not measured).
  std::function<void(const char*)> mark_phase;
};

struct TrainStepResult {
  double ce_sum = 0;       // summed cross-entropy over counted tokens
  int64_t tokens = 0;      // counted tokens
  float aux_loss = NAN;    // load-balancing loss when the config asks for it
  std::vector<double> mtp_ce_sums;   // per multi-token prediction depth run: summed cross-entropy
  std::vector<int64_t> mtp_tokens;   // and the targets it counted
  // Wall time of the forward through the fused LM head + loss (which also produces the head's
  // gradients), and of the rest of the backward; each ends with a device synchronisation.
  double forward_ms = 0, backward_ms = 0;
  // The experts each main-model MoE layer chose [T, k] I64 (on the parameters' device), in layer order.
  std::vector<Tensor> routing;
};

// A generation's state between steps (the layers' key/value caches and recurrent states), made by
// CausalLM::start_generation for one sequence of at most `capacity` positions.
struct GenerationCache {
  virtual ~GenerationCache() = default;
  int64_t capacity = 0;
  int64_t length = 0;  // positions consumed so far
  Parallel par;        // the groups every step runs over (experts split over ranks: all step together)
};

class CausalLM {
 public:
  explicit CausalLM(hf::ModelConfig cfg, Parallel par = {}) : cfg_(std::move(cfg)), par_(par) {}
  virtual ~CausalLM() = default;
  // On the parameters in `ps` (the model's own host ParamStore, or a device copy of it: the
  // computation runs where they live, in their compute dtype), over the groups of `par`. Inputs
  // are host tensors; logits come back as host F32.
  virtual ForwardOutputs forward(nn::ParamAccess& ps, const ForwardInputs& in, const Parallel& par) const = 0;
  // Needs labels in `in`. Gradients accumulate in `ps` (zero them between optimizer steps).
  virtual TrainStepResult forward_backward(nn::ParamAccess& ps, const ForwardInputs& in, const TrainStepOptions& opts,
                                           const Parallel& par) const = 0;
  // The same on the model's own host parameters, over the groups it was built for.
  ForwardOutputs forward(const ForwardInputs& in) const;
  TrainStepResult forward_backward(const ForwardInputs& in, const TrainStepOptions& opts);
  const Parallel& parallel() const { return par_; }

  const hf::ModelConfig& config() const { return cfg_; }
  nn::ParamStore& params() { return params_; }
  const nn::ParamStore& params() const { return params_; }
  hf::StateDictAdapter& adapter() { return adapter_; }
  const hf::StateDictAdapter& adapter() const { return adapter_; }
  // Generation (models/generate.h): a cache for one sequence of up to `capacity` positions, and a
  // step that runs `ids` (the prompt, then one token at a time) at the positions after those the
  // cache has seen, through the layers on `ps` (the host store or a device copy), and returns the
  // logits [V] of its last token as host F32 ([ids, V]: every token's, when `all_positions`).
  // The logits equal forward()'s over the whole sequence at the same positions.
  // `par`: a model whose experts are split over ranks generates on every rank of its expert group
  // at once (models::generate keeps them in step).
  virtual std::unique_ptr<GenerationCache> start_generation(int64_t capacity, const Parallel& par = {}) const;
  virtual Tensor generation_step(nn::ParamAccess& ps, const std::vector<int64_t>& ids, GenerationCache& cache,
                                 bool all_positions = false) const;
  // Several sequences in one step (one process; not with experts split over ranks): sequence i runs
  // ids[i] (its prompt, or its next token) after the positions caches[i] has seen. Returns the
  // logits [B, V] of each sequence's last token (host F32), equal to one generation_step per
  // sequence up to rounding: the projections and experts run over all the sequences' tokens at once,
  // attention and the recurrent states per sequence.
  virtual Tensor generation_step_batch(nn::ParamAccess& ps, const std::vector<std::vector<int64_t>>& ids,
                                       const std::vector<GenerationCache*>& caches) const;
  // Parameters touched per token: everything except the experts a token is not routed to.
  virtual int64_t active_parameters() const = 0;
  // Multi-token prediction depths the model holds (DeepSeek-V3 checkpoints with their MTP layers),
  // and whether their own parameters train (they are frozen unless a recipe asks for their loss).
  virtual int64_t mtp_depths() const { return 0; }
  virtual void set_mtp_trainable(bool) {}
  // LoRA (models/lora.h): every projection of the main layers whose module name `wants` returns
  // true for gets an adapter of `rank` and `scale`, and with `experts` every MoE layer's routed
  // experts too (nn::ExpertLora, in that layout); registered in the ParamStore (and in its layer's
  // ZeRO-3 residency group). Returns the adapted modules' names (for experts, the experts' internal
  // prefix).
  virtual std::vector<std::string> add_lora(int64_t rank, float scale,
                                            const std::function<bool(const std::string& module)>& wants,
                                            nn::ExpertAdapters experts = nn::ExpertAdapters::None, float dropout = 0.f);

 protected:
  hf::ModelConfig cfg_;
  Parallel par_;
  nn::ParamStore params_;
  hf::StateDictAdapter adapter_;
};

// Shifted causal-LM cross-entropy, as Transformers' ForCausalLMLoss: position t predicts label t+1,
// the last position of each row predicts nothing, -100 is ignored, mean over counted tokens.
float causal_lm_loss(const Tensor& logits, const Tensor& labels, int64_t* counted);
// The shifted targets [B*S]: label t+1 for position t, -100 at each row's last position.
Tensor shifted_targets(const Tensor& labels);
// Multi-token prediction at `depth` k >= 1: position t predicts label t+1+k (-100 past the row's
// end, and where `doc_ids` puts that label in another packed document than position t), from
// the embedding of token t+k. mtp_input_ids gives those tokens [B, S] (0 past the row's end, where
// the model uses a zero embedding instead).
Tensor mtp_targets(const Tensor& labels, const Tensor* doc_ids, int64_t depth);
Tensor mtp_input_ids(const Tensor& input_ids, int64_t depth);
int64_t counted_targets(const Tensor& targets);

}  // namespace moeforge::models
