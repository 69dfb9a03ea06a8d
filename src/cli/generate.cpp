// moeforge generate: text from a model folder (optionally with a LoRA adapter), streamed as it is
// produced. The prompt is text (tokenized as tokenizer(prompt) does), a conversation rendered by
// the chat template with the generation prompt (as apply_chat_template(add_generation_prompt=True)),
// or token ids. generation_config.json gives the stop tokens and sampling defaults.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "cli/app.h"
#include "cli/commands.h"
#include "cli/inference_options.h"
#include "core/error.h"
#include "hf/chat/chat_template.h"
#include "hf/fs_util.h"
#include "hf/generation_config.h"
#include "hf/tokenizer/tokenizer.h"
#include "models/generate.h"
#include "models/lora.h"
#include "models/pretrained.h"


namespace moeforge::cli {

namespace {

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;

// Streams the generated text: each token's text once it is complete (a token that ends inside a
// UTF-8 character waits for the next), holding back what could be the start of a stop string, and
// finding the first stop string.
class TextStream {
 public:
  TextStream(const hf::Tokenizer* tok, std::vector<std::string> stops, bool print)
      : tok_(tok), stops_(std::move(stops)), print_(print) {
    for (const auto& s : stops_) hold_ = std::max(hold_, s.size() > 0 ? s.size() - 1 : 0);
  }
  // Adds a token; returns false when a stop string has appeared (the text then ends after it).
  bool add(int64_t id) {
    ids_.push_back(id);
    if (!tok_) return true;
    text_ = tok_->decode(ids_, /*skip_special_tokens=*/true);
    size_t end = std::string::npos;
    for (const auto& s : stops_)
      if (auto at = text_.find(s); at != std::string::npos) end = std::min(end, at + s.size());
    if (end != std::string::npos) {
      text_.resize(end);
      stopped_ = true;
    }
    emit(stopped_ ? text_.size() : safe_end());
    return !stopped_;
  }
  void finish() { emit(text_.size()); }
  const std::string& text() const { return text_; }
  bool stopped() const { return stopped_; }

 private:
  // How much of the text can be printed: not a trailing incomplete character (decoded as U+FFFD),
  // nor the last bytes that a stop string might still continue.
  size_t safe_end() const {
    size_t end = text_.size();
    const std::string replacement = "\xEF\xBF\xBD";
    if (end >= 3 && text_.compare(end - 3, 3, replacement) == 0) end -= 3;
    return end > hold_ ? end - hold_ : 0;
  }
  void emit(size_t end) {
    if (!print_ || end <= printed_) return;
    std::fwrite(text_.data() + printed_, 1, end - printed_, stdout);
    std::fflush(stdout);
    printed_ = end;
  }
  const hf::Tokenizer* tok_;
  std::vector<std::string> stops_;
  bool print_;
  size_t hold_ = 0, printed_ = 0;
  std::vector<int64_t> ids_;
  std::string text_;
  bool stopped_ = false;
};

}  // namespace

int cmd_generate(const std::vector<std::string>& argv) {
  auto app = make_app("generate", "Generate text from a model folder (and a LoRA adapter), streamed as it is produced.",
                      "\nExamples:\n"
                      "  moeforge generate --model out/final --prompt 'The capital of France is'\n"
                      "  moeforge generate --model BASE --adapter out/final --chat --prompt 'Hi!' --temperature 0.7\n"
                      "  moeforge generate --model DIR --messages conv.json --json\n"
                      "Sampling defaults come from the folder's generation_config.json (do_sample, temperature,\n"
                      "top_k, top_p); --temperature 0 or --greedy picks the most likely token each step.");
  std::string model_dir, adapter, tokenizer_dir, prompt, messages_file, prompt_ids;
  int64_t max_new = 256, min_new = 0, top_k = 0;
  double temperature = 1.0, top_p = 1.0, repetition_penalty = 1.0;
  uint64_t seed = 0;
  std::vector<std::string> stops;
  bool json = false, chat = false, greedy = false, ignore_eos = false;
  app->add_option("--model", model_dir, "Hugging Face model folder")->required();
  app->add_option("--adapter", adapter, "PEFT LoRA adapter folder, applied unmerged");
  app->add_option("--tokenizer", tokenizer_dir, "folder with tokenizer.json (default: the model's)");
  auto* o_prompt = app->add_option("--prompt", prompt, "prompt text");
  auto* o_messages = app->add_option("--messages", messages_file,
                                     "conversation: a JSON list of {role, content} (or {\"messages\": [...]})");
  auto* o_ids = app->add_option("--prompt-ids", prompt_ids, "prompt as token ids, comma-separated");
  o_prompt->excludes(o_messages)->excludes(o_ids);
  o_messages->excludes(o_ids);
  app->add_flag("--chat", chat, "wrap --prompt as one user message and render it with the chat template");
  auto* o_max = app->add_option("--max-new-tokens", max_new, "tokens to generate at most (default: "
                                "generation_config.json's max_new_tokens, else 256)")->check(at_least(0));
  app->add_option("--min-new-tokens", min_new, "stop tokens are not chosen before this many")->check(at_least(0));
  auto* o_temp = app->add_option("--temperature", temperature, "sampling temperature; 0: greedy")->check(at_least(0));
  auto* o_top_k = app->add_option("--top-k", top_k, "sample among the k most likely tokens (0: all)")->check(at_least(0));
  auto* o_top_p = app->add_option("--top-p", top_p, "sample among the most likely tokens holding this probability")
                      ->check(CLI::Range(0.0, 1.0));
  auto* o_rep = app->add_option("--repetition-penalty", repetition_penalty, "divide the logits of tokens already seen")
                    ->check(at_least(1e-6));
  app->add_option("--seed", seed, "sampling seed (the same seed gives the same text)");
  app->add_option("--stop", stops, "stop once this text appears (repeatable); the text ends after it")
      ->always_capture_default(false)->default_str("");
  app->add_flag("--greedy", greedy, "the most likely token every step, whatever generation_config.json says");
  app->add_flag("--ignore-eos", ignore_eos, "do not stop at the end-of-sequence tokens");
  app->add_flag("--json", json, "print one JSON object at the end (prompt and generated ids, text, timing) instead of streaming");
  InferenceOptions run;
  run.add_to(*app);
  if (auto code = parse(*app, argv)) return *code;
  MF_CHECK(*o_prompt || *o_messages || *o_ids, "generate needs a prompt: --prompt TEXT, --messages FILE.json or --prompt-ids IDS");
  MF_CHECK(!chat || *o_prompt, "--chat wraps --prompt; with --messages the conversation is rendered already");
  run.apply_threads();

  if (tokenizer_dir.empty()) tokenizer_dir = model_dir;
  std::optional<hf::Tokenizer> tok;
  if (fs::exists(fs::path(tokenizer_dir) / "tokenizer.json")) tok = hf::Tokenizer::load(tokenizer_dir);
  MF_CHECK(tok || *o_ids, tokenizer_dir, ": no tokenizer.json (pass --tokenizer DIR, or the prompt as --prompt-ids)");

  std::vector<int64_t> ids;
  std::string prompt_text;
  if (*o_ids) {
    ids = parse_id_list(prompt_ids, "--prompt-ids");
  } else if (*o_messages || chat) {
    const std::string where = *o_messages ? messages_file : "--prompt";
    const Json row = hf::conversation_row(
        *o_messages ? Json(hf::read_json_file(messages_file)) : Json::array({Json{{"role", "user"}, {"content", prompt}}}),
        where);
    auto tmpl = hf::ChatTemplate::load(tokenizer_dir);
    MF_CHECK(tmpl, tokenizer_dir, ": no chat template (tokenizer_config.json 'chat_template' or chat_template.jinja)");
    hf::ChatOptions co = hf::chat_options_of(row, where);
    co.add_generation_prompt = true;
    const auto enc = tmpl->encode(*tok, row["messages"], co, /*with_mask=*/false);
    ids = enc.ids;
    prompt_text = enc.text;
  } else {
    ids = tok->encode(prompt);
    prompt_text = prompt;
  }

  auto loaded = models::from_pretrained(model_dir);
  if (!adapter.empty()) models::apply_adapter_folder(*loaded.model, adapter);
  const auto& cfg = loaded.model->config();
  const hf::GenerationConfig gc = hf::load_generation_config(model_dir);

  // The flags over generation_config.json (models::resolve_generation). Sampling flags sample even
  // where the file says do_sample: false; --temperature 0 or --greedy never samples.
  models::GenerationRequest asked;
  if (*o_max) asked.max_new_tokens = max_new;
  asked.default_max_new_tokens = 256;
  asked.min_new_tokens = min_new;
  if (ignore_eos) asked.eos_token_ids = std::vector<int64_t>{};
  if (greedy || (*o_temp && temperature == 0)) asked.do_sample = false;
  else if ((*o_temp && temperature > 0) || *o_top_k || *o_top_p) asked.do_sample = true;
  if (*o_temp && temperature > 0) asked.temperature = temperature;
  if (*o_top_k) asked.top_k = top_k;
  if (*o_top_p) asked.top_p = top_p;
  if (*o_rep) asked.repetition_penalty = repetition_penalty;
  asked.seed = seed;
  models::GenerateOptions go = models::resolve_generation(asked, gc);
  for (int64_t id : ids)
    MF_CHECK(id >= 0 && id < cfg.vocab_size, "prompt token id ", id, " is outside the vocabulary (", cfg.vocab_size,
             " tokens) of ", cfg.source);
  const int64_t prompt_len = static_cast<int64_t>(ids.size());
  MF_CHECK(prompt_len < cfg.max_position_embeddings, "the prompt's ", prompt_len,
           " tokens leave no room under max_position_embeddings (", cfg.max_position_embeddings, ") of ", cfg.source);
  if (prompt_len + go.max_new_tokens > cfg.max_position_embeddings) {
    go.max_new_tokens = cfg.max_position_embeddings - prompt_len;
    std::fprintf(stderr, "generate: at most %lld new tokens fit under max_position_embeddings (%lld)\n",
                 static_cast<long long>(go.max_new_tokens), static_cast<long long>(cfg.max_position_embeddings));
  }
  const auto& so = go.sampling;

  std::unique_ptr<nn::ParamAccess> on_device;
  nn::ParamAccess* ps = &run.params_for(*loaded.model, on_device);
  TextStream stream(tok ? &*tok : nullptr, stops, !json);
  const auto res = models::generate(*loaded.model, *ps, ids, go, [&](int64_t id) { return stream.add(id); });
  stream.finish();
  const double decode_tps = res.decode_seconds > 0 ? static_cast<double>(res.ids.size()) / res.decode_seconds : 0;
  const std::string reason = stream.stopped() ? "stop_string" : res.stop_reason;
  if (json) {
    Json out;
    out["model"] = model_dir;
    if (!adapter.empty()) out["adapter"] = adapter;
    if (!prompt_text.empty()) out["prompt"] = prompt_text;
    out["prompt_ids"] = ids;
    out["generated_ids"] = res.ids;
    if (tok) out["text"] = stream.text();
    out["stop_reason"] = reason;
    out["sampling"] = so.sample ? Json{{"temperature", so.temperature}, {"top_k", so.top_k}, {"top_p", so.top_p},
                                       {"repetition_penalty", so.repetition_penalty}, {"seed", so.seed}}
                                : Json("greedy");
    out["prefill_seconds"] = res.prefill_seconds;
    out["decode_seconds"] = res.decode_seconds;
    out["tokens_per_second"] = decode_tps;
    std::printf("%s\n", out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  } else {
    if (!tok) {  // no tokenizer: the ids are the output
      for (size_t i = 0; i < res.ids.size(); ++i) std::printf("%s%lld", i ? "," : "", static_cast<long long>(res.ids[i]));
    }
    std::printf("\n");
    std::fflush(stdout);  // the text's end before the summary on stderr
    std::fprintf(stderr, "generate: %zu tokens in %.2f s (%.1f tokens/s; the %lld-token prompt in %.2f s), stopped: %s\n",
                 res.ids.size(), res.decode_seconds, decode_tps, static_cast<long long>(prompt_len),
                 res.prefill_seconds, reason.c_str());
  }
  return 0;
}

}  // namespace moeforge::cli
