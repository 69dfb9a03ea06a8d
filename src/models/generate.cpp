#include "models/generate.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>
#include <unordered_set>

#include "core/error.h"
#include "parallel/communicator.h"

namespace moeforge::models {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The warpers of Transformers' sampling, in its order, on scores in place.
void warp(std::vector<float>& s, const SamplingOptions& o) {
  if (o.temperature != 1.0)
    for (float& v : s) v = static_cast<float>(v / o.temperature);
  const int64_t v_size = static_cast<int64_t>(s.size());
  if (o.top_k > 0 && o.top_k < v_size) {
    // Keep every score >= the k-th largest (ties at the threshold stay, as torch's `<` comparison).
    std::vector<float> sorted = s;
    std::nth_element(sorted.begin(), sorted.begin() + (o.top_k - 1), sorted.end(), std::greater<float>());
    const float kth = sorted[static_cast<size_t>(o.top_k - 1)];
    for (float& v : s)
      if (v < kth) v = kNegInf;
  }
  if (o.top_p < 1.0) {
    // Sorted ascending, drop the tokens whose cumulative probability is <= 1 - top_p (the least
    // likely ones), always keeping the most likely token.
    std::vector<int64_t> order(s.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return s[a] < s[b]; });
    const float mx = s[order.back()];
    double total = 0;
    for (float v : s) total += std::isinf(v) ? 0.0 : std::exp(static_cast<double>(v - mx));
    double cum = 0;
    for (size_t i = 0; i + 1 < order.size(); ++i) {
      const float v = s[order[i]];
      cum += std::isinf(v) ? 0.0 : std::exp(static_cast<double>(v - mx)) / total;
      if (cum <= 1.0 - o.top_p) s[order[i]] = kNegInf;
    }
  }
}

}  // namespace

GenerateOptions resolve_generation(const GenerationRequest& asked, const hf::GenerationConfig& file) {
  GenerateOptions o;
  o.max_new_tokens = asked.max_new_tokens.value_or(file.max_new_tokens.value_or(asked.default_max_new_tokens));
  o.min_new_tokens = asked.min_new_tokens;
  o.eos_token_ids = asked.eos_token_ids.value_or(file.eos_token_ids);
  SamplingOptions& so = o.sampling;
  so.sample = asked.do_sample.value_or(file.do_sample);
  so.temperature = asked.temperature.value_or(file.temperature.value_or(1.0));
  so.top_k = asked.top_k.value_or(file.top_k.value_or(50));
  so.top_p = asked.top_p.value_or(file.top_p.value_or(1.0));
  so.repetition_penalty = asked.repetition_penalty.value_or(file.repetition_penalty.value_or(1.0));
  so.seed = asked.seed;
  return o;
}

int64_t next_token(const Tensor& logits, const std::vector<int64_t>& context, const SamplingOptions& o,
                   std::mt19937_64& rng, const std::vector<int64_t>& banned) {
  MF_CHECK(logits.dtype() == DType::F32 && logits.device().is_cpu(), "internal: next_token takes host F32 logits");
  const int64_t v_size = logits.numel();
  std::vector<float> s(logits.f32(), logits.f32() + v_size);
  for (int64_t id : banned)
    if (id >= 0 && id < v_size) s[id] = kNegInf;
  if (o.repetition_penalty != 1.0) {
    std::unordered_set<int64_t> seen(context.begin(), context.end());
    for (int64_t id : seen)
      if (id >= 0 && id < v_size)
        s[id] = static_cast<float>(s[id] < 0 ? s[id] * o.repetition_penalty : s[id] / o.repetition_penalty);
  }
  if (!o.sample) return std::max_element(s.begin(), s.end()) - s.begin();  // the first of equal maxima
  warp(s, o);
  const float mx = *std::max_element(s.begin(), s.end());
  MF_CHECK(!std::isinf(mx), "generation: every token's logit is -inf (NaN weights, or everything banned)");
  std::vector<double> p(s.size());
  double total = 0;
  for (size_t i = 0; i < s.size(); ++i) total += p[i] = std::isinf(s[i]) ? 0.0 : std::exp(static_cast<double>(s[i] - mx));
  const double u = std::uniform_real_distribution<double>(0.0, total)(rng);
  double cum = 0;
  int64_t last = 0;
  for (size_t i = 0; i < p.size(); ++i) {
    if (p[i] == 0.0) continue;
    cum += p[i];
    last = static_cast<int64_t>(i);
    if (u < cum) return last;
  }
  return last;  // u rounded to the total
}

namespace {

void check_request(const hf::ModelConfig& cfg, const std::vector<int64_t>& prompt, const GenerateOptions& opts) {
  MF_CHECK(!prompt.empty(), "generation: the prompt has no tokens");
  MF_CHECK(opts.max_new_tokens >= 0, "generation: max_new_tokens must be >= 0, got ", opts.max_new_tokens);
  const auto& so = opts.sampling;
  MF_CHECK(!so.sample || so.temperature > 0, "generation: temperature must be > 0 when sampling, got ", so.temperature);
  MF_CHECK(so.top_p > 0 && so.top_p <= 1, "generation: top_p must be in (0, 1], got ", so.top_p);
  MF_CHECK(so.top_k >= 0, "generation: top_k must be >= 0, got ", so.top_k);
  MF_CHECK(so.repetition_penalty > 0, "generation: repetition_penalty must be > 0, got ", so.repetition_penalty);
  for (int64_t id : prompt)
    MF_CHECK(id >= 0 && id < cfg.vocab_size, "generation: prompt token id ", id, " is outside the vocabulary (",
             cfg.vocab_size, " tokens)");
}

// The token a sequence picks from its logits: eos ids banned before min_new_tokens. Records it in
// `res` and `context`; returns whether the sequence goes on.
bool pick_token(const Tensor& logits, const GenerateOptions& opts, std::mt19937_64& rng, std::vector<int64_t>& context,
                GenerateResult& res, const std::function<bool(int64_t)>& on_token) {
  const int64_t i = static_cast<int64_t>(res.ids.size());
  const std::vector<int64_t> none, &banned = i < opts.min_new_tokens ? opts.eos_token_ids : none;
  const int64_t id = next_token(logits, context, opts.sampling, rng, banned);
  res.ids.push_back(id);
  context.push_back(id);
  const bool eos = std::find(opts.eos_token_ids.begin(), opts.eos_token_ids.end(), id) != opts.eos_token_ids.end();
  const bool go_on = !on_token || on_token(id);
  if (eos) res.stop_reason = "eos";
  else if (!go_on) res.stop_reason = "stopped";
  return !eos && go_on && i + 1 < opts.max_new_tokens;
}

// The sum over the ranks of a generation's groups of one number per rank (the number itself alone).
double sum_over_ranks(const Parallel& par, double v) {
  parallel::Communicator* group = par.world ? par.world : par.ep;
  if (!group || group->size() == 1) return v;
  Tensor t = Tensor::empty({1}, DType::F64);
  t.data<double>()[0] = v;
  group->all_reduce_sum(t);
  return t.data<double>()[0];
}

}  // namespace

GenerateResult generate(const CausalLM& model, nn::ParamAccess& ps, const std::vector<int64_t>& prompt,
                        const GenerateOptions& opts, const std::function<bool(int64_t)>& on_token, const Parallel& par) {
  check_request(model.config(), prompt, opts);
  const auto& so = opts.sampling;
  GenerateResult res;
  res.stop_reason = "length";
  std::mt19937_64 rng(so.seed);
  std::vector<int64_t> context = prompt;
  // Room for this rank's tokens, and for the filler steps it may run while others finish theirs
  // (at most the others' new tokens: their sum bounds their largest).
  const int64_t own = std::max<int64_t>(opts.max_new_tokens, 1);
  const int64_t others = static_cast<int64_t>(sum_over_ranks(par, static_cast<double>(own))) - own;
  auto cache = model.start_generation(static_cast<int64_t>(prompt.size()) + own + others, par);
  auto t0 = std::chrono::steady_clock::now();
  Tensor logits = model.generation_step(ps, prompt, *cache);
  res.prefill_seconds = seconds_since(t0);
  t0 = std::chrono::steady_clock::now();
  bool running = opts.max_new_tokens > 0;
  int64_t last = prompt.back();
  for (;;) {
    if (running) {
      running = pick_token(logits, opts, rng, context, res, on_token);
      last = res.ids.back();
    }
    // Another step where this rank, or any rank stepping with it, still needs one.
    if (sum_over_ranks(par, running ? 1.0 : 0.0) == 0) break;
    logits = model.generation_step(ps, {last}, *cache);  // a finished rank's filler: its logits unused
  }
  res.decode_seconds = seconds_since(t0);
  return res;
}

namespace {
// One sequence of generate_many between its steps.
struct Sequence {
  size_t index = 0;
  std::unique_ptr<GenerationCache> cache;
  std::mt19937_64 rng;
  std::vector<int64_t> context;
  GenerateResult res;
  std::chrono::steady_clock::time_point decode_start;
};
}  // namespace

void generate_many(const CausalLM& model, nn::ParamAccess& ps, const std::vector<std::vector<int64_t>>& prompts,
                   const std::vector<GenerateOptions>& opts, int64_t max_batch,
                   const std::function<bool(size_t, int64_t)>& on_token,
                   const std::function<void(size_t, GenerateResult)>& on_done) {
  MF_CHECK(opts.size() == prompts.size(), "internal: generate_many with ", prompts.size(), " prompts and ",
           opts.size(), " option sets");
  MF_CHECK(max_batch >= 1, "generation: the batch must hold at least one sequence, got ", max_batch);
  for (size_t i = 0; i < prompts.size(); ++i) check_request(model.config(), prompts[i], opts[i]);
  std::vector<Sequence> active;
  size_t next = 0;
  while (next < prompts.size() || !active.empty()) {
    // Free places go to the next prompts, whose whole prompt runs in this step.
    while (next < prompts.size() && static_cast<int64_t>(active.size()) < max_batch) {
      Sequence s;
      s.index = next;
      s.cache = model.start_generation(static_cast<int64_t>(prompts[next].size()) +
                                       std::max<int64_t>(opts[next].max_new_tokens, 1));
      s.rng.seed(opts[next].sampling.seed);
      s.context = prompts[next];
      s.res.stop_reason = "length";
      active.push_back(std::move(s));
      ++next;
    }
    std::vector<std::vector<int64_t>> ids;
    std::vector<GenerationCache*> caches;
    std::vector<bool> prompt_step;  // the sequences whose prompt runs in this step
    for (const Sequence& s : active) {
      prompt_step.push_back(s.cache->length == 0);
      ids.push_back(prompt_step.back() ? prompts[s.index] : std::vector<int64_t>{s.context.back()});
      caches.push_back(s.cache.get());
    }
    const auto t0 = std::chrono::steady_clock::now();
    const Tensor logits = model.generation_step_batch(ps, ids, caches);
    const double step_seconds = seconds_since(t0);
    const int64_t vocab = logits.size(1);
    std::vector<Sequence> still;
    for (size_t b = 0; b < active.size(); ++b) {
      Sequence& s = active[b];
      const GenerateOptions& o = opts[s.index];
      if (prompt_step[b]) {
        s.res.prefill_seconds = step_seconds;
        s.decode_start = std::chrono::steady_clock::now();
      }
      const size_t index = s.index;
      const bool going = o.max_new_tokens > 0 &&
                         pick_token(logits.slice0(static_cast<int64_t>(b), 1).view({vocab}), o, s.rng, s.context, s.res,
                                    on_token ? std::function<bool(int64_t)>([&](int64_t id) { return on_token(index, id); })
                                             : std::function<bool(int64_t)>());
      if (going) {
        still.push_back(std::move(s));
        continue;
      }
      s.res.decode_seconds = seconds_since(s.decode_start);
      if (on_done) on_done(s.index, std::move(s.res));
    }
    active = std::move(still);
  }
}

}  // namespace moeforge::models
