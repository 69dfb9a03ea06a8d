// Text generation from a causal LM: the prompt in one step through the model's generation cache
// (CausalLM::start_generation), then one token per step; one sequence (generate), or many with
// several per step (generate_many). Greedy, or
// sampled as Transformers' generate(do_sample=True) transforms the logits: repetition penalty,
// then temperature, top-k and top-p, then a draw from the softmax (a seeded generator: the same
// seed gives the same tokens; not Transformers' torch generator, so sampled tokens differ from it).
#pragma once
#include <cstdint>
#include <functional>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "hf/generation_config.h"
#include "models/causal_lm.h"
#include "nn/params.h"

namespace moeforge::models {

struct SamplingOptions {
  bool sample = false;        // false: greedy (the largest logit; ties to the lower id, as torch.argmax)
  double temperature = 1.0;   // > 0
  int64_t top_k = 0;          // 0: off
  double top_p = 1.0;         // in (0, 1]; 1: off
  double repetition_penalty = 1.0;  // Transformers' (CTRL's): logits of tokens seen so far / p (or * p when negative)
  uint64_t seed = 0;
};

struct GenerateOptions {
  int64_t max_new_tokens = 256;
  int64_t min_new_tokens = 0;           // eos ids are not chosen before this many
  std::vector<int64_t> eos_token_ids;   // generating one of them ends the sequence (it is kept)
  SamplingOptions sampling;
};

struct GenerateResult {
  std::vector<int64_t> ids;   // the generated tokens (not the prompt)
  std::string stop_reason;    // "eos", "stopped" (the callback asked), "length"
  double prefill_seconds = 0, decode_seconds = 0;  // the prompt's step; the other steps together
};

// What a caller asked for; every unset field comes from the checkpoint's generation_config.json
// (Transformers' rule: the call's arguments over the file's values over the library defaults).
struct GenerationRequest {
  std::optional<int64_t> max_new_tokens;  // else the file's, else `default_max_new_tokens`
  int64_t default_max_new_tokens = 20;    // Transformers' (max_length 20); the CLI passes its own
  int64_t min_new_tokens = 0;
  std::optional<bool> do_sample;          // else the file's do_sample (false without one)
  std::optional<double> temperature, top_p, repetition_penalty;  // else the file's, else 1
  std::optional<int64_t> top_k;           // else the file's, else 50 (Transformers' default)
  std::optional<std::vector<int64_t>> eos_token_ids;  // else the file's (config.json's as fallback)
  uint64_t seed = 0;
};
GenerateOptions resolve_generation(const GenerationRequest& asked, const hf::GenerationConfig& file);

// Picks the next token from logits [V] (F32, host) given the tokens so far (for the repetition
// penalty). `rng` is only drawn from when sampling.
int64_t next_token(const Tensor& logits, const std::vector<int64_t>& context, const SamplingOptions& opts,
                   std::mt19937_64& rng, const std::vector<int64_t>& banned = {});

// Generates after `prompt` on the parameters `ps` (the model's host store or a device copy).
// `on_token` (optional) sees each new token as it is chosen and returns false to stop there (stop
// strings, a consumer that has enough). `par`: a model whose experts are split over ranks; every
// rank of the run calls this (each with its own prompt and options) and the ranks step together:
// one whose sequence has ended keeps stepping on a filler token, its output unchanged, until every
// rank's has (their MoE layers exchange tokens at every step).
GenerateResult generate(const CausalLM& model, nn::ParamAccess& ps, const std::vector<int64_t>& prompt,
                        const GenerateOptions& opts, const std::function<bool(int64_t)>& on_token = {},
                        const Parallel& par = {});

// Many prompts on one process, `max_batch` sequences per model step (continuous batching: when a
// sequence ends, the next prompt takes its place and runs its prompt in the same step as the
// others' next tokens). Sequence i's tokens equal generate(prompts[i], opts[i]) alone up to
// rounding (the same steps, its own generator seeded alike); what batching changes is that the
// weights are read once per step for all of them. `on_token(i, id)` sees sequence i's tokens and
// returns false to stop it; `on_done(i, result)` gets each result as its sequence ends (in the order
// they end). Timing per result: prefill_seconds is the step that ran its prompt, decode_seconds the
// time from then to its end (shared with the sequences beside it).
void generate_many(const CausalLM& model, nn::ParamAccess& ps, const std::vector<std::vector<int64_t>>& prompts,
                   const std::vector<GenerateOptions>& opts, int64_t max_batch,
                   const std::function<bool(size_t, int64_t)>& on_token,
                   const std::function<void(size_t, GenerateResult)>& on_done);

}  // namespace moeforge::models
