// moeforge generate: text from a model folder (optionally with a LoRA adapter), streamed as it is
// produced. The prompt is text (tokenized as tokenizer(prompt) does), a conversation rendered by
// the chat template with the generation prompt (as apply_chat_template(add_generation_prompt=True)),
// or token ids; or many prompts from a JSON-lines file, one result line each, the model loaded
// once. generation_config.json gives the stop tokens and sampling defaults.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <optional>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "cli/app.h"
#include "cli/commands.h"
#include "cli/inference_options.h"
#include "core/error.h"
#include "data/dataset.h"
#include "data/table_files.h"
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

// A prompt as the model takes it: its token ids, the text they came from (empty for ids), and where
// it came from for errors.
struct Prompt {
  std::vector<int64_t> ids;
  std::string text;
  std::string where = "the prompt";
};

// Text as tokenizer(text) encodes it, or a conversation (a {role, content} list or a row holding
// one) rendered by the chat template with the generation prompt.
Prompt encode_text(const hf::Tokenizer& tok, const std::string& text, const std::string& where = "the prompt") {
  return {tok.encode(text), text, where};
}

Prompt encode_conversation(const hf::Tokenizer& tok, const std::string& tokenizer_dir, const Json& messages,
                           const std::string& where) {
  const Json row = hf::conversation_row(messages, where);
  auto tmpl = hf::ChatTemplate::load(tokenizer_dir);
  MF_CHECK(tmpl, tokenizer_dir, ": no chat template (tokenizer_config.json 'chat_template' or chat_template.jinja)");
  hf::ChatOptions co = hf::chat_options_of(row, where);
  co.add_generation_prompt = true;
  const auto enc = tmpl->encode(tok, row["messages"], co, /*with_mask=*/false);
  return {enc.ids, enc.text, where};
}

// One prompt of a --prompts file: an object with one of "prompt" (text; a user message under
// --chat), "messages" (a conversation) or "prompt_ids" (token ids).
Prompt prompt_of_row(const Json& row, const std::string& where, const hf::Tokenizer* tok, const std::string& tokenizer_dir,
                     bool chat) {
  MF_CHECK(row.is_object(), where, ": not a JSON object");
  const int kinds = row.contains("prompt") + row.contains("messages") + row.contains("prompt_ids");
  MF_CHECK(kinds == 1, where, ": needs exactly one of 'prompt', 'messages' or 'prompt_ids'");
  if (row.contains("prompt_ids")) {
    const Json& ids = row["prompt_ids"];
    MF_CHECK(ids.is_array() && !ids.empty(), where, ": 'prompt_ids' must be a non-empty list of token ids");
    Prompt p;
    for (const Json& id : ids) {
      MF_CHECK(id.is_number_integer(), where, ": 'prompt_ids' holds ", id.dump(), ", not a token id");
      p.ids.push_back(id.get<int64_t>());
    }
    p.where = where;
    return p;
  }
  MF_CHECK(tok, tokenizer_dir, ": no tokenizer.json (", where, " needs one; pass --tokenizer DIR or use 'prompt_ids')");
  if (row.contains("messages")) return encode_conversation(*tok, tokenizer_dir, row, where);
  MF_CHECK(row["prompt"].is_string(), where, ": 'prompt' must be a string");
  const std::string text = row["prompt"].get<std::string>();
  return chat ? encode_conversation(*tok, tokenizer_dir, Json::array({Json{{"role", "user"}, {"content", text}}}), where)
              : encode_text(*tok, text, where);
}

// The prompts of a --prompts file: a JSON-lines file (one object per non-empty line), a Parquet or
// an Arrow file (one row each, its prompt / messages / prompt_ids columns read; a held-out split of
// a hub dataset as it is).
std::vector<Prompt> read_prompts_file(const std::string& file, const hf::Tokenizer* tok, const std::string& tokenizer_dir,
                                      bool chat) {
  std::vector<Prompt> prompts;
  if (data::is_table_file(file)) {
    data::for_each_table_row(
        file, {"prompt", "messages", "prompt_ids", "tools", "chat_template_kwargs"}, [&](int64_t row, Json&& j) {
          prompts.push_back(prompt_of_row(j, file + ": row " + std::to_string(row + 1), tok, tokenizer_dir, chat));
        });
    MF_CHECK(!prompts.empty(), file, ": no prompts (no rows)");
    return prompts;
  }
  std::ifstream in(file);
  MF_CHECK(in, file, ": cannot open the prompts file");
  std::string line;
  for (int64_t n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = file + ":" + std::to_string(n);
    Json row;
    try {
      row = Json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      MF_THROW(where, ": not a JSON object (", e.what(), ")");
    }
    prompts.push_back(prompt_of_row(row, where, tok, tokenizer_dir, chat));
  }
  MF_CHECK(!prompts.empty(), file, ": no prompts (one JSON object per line)");
  return prompts;
}

}  // namespace

int cmd_generate(const std::vector<std::string>& argv) {
  auto app = make_app("generate", "Generate text from a model folder (and a LoRA adapter), streamed as it is produced.",
                      "\nExamples:\n"
                      "  moeforge generate --model out/final --prompt 'The capital of France is'\n"
                      "  moeforge generate --model BASE --adapter out/final --chat --prompt 'Hi!' --temperature 0.7\n"
                      "  moeforge generate --model DIR --messages conv.json --json\n"
                      "  moeforge generate --model DIR --prompts prompts.jsonl --chat > out.jsonl\n"
                      "Sampling defaults come from the folder's generation_config.json (do_sample, temperature,\n"
                      "top_k, top_p); --temperature 0 or --greedy picks the most likely token each step.");
  std::string model_dir, adapter, tokenizer_dir, prompt, messages_file, prompt_ids, prompts_file;
  int64_t max_new = 256, min_new = 0, top_k = 0;
  double temperature = 1.0, top_p = 1.0, repetition_penalty = 1.0;
  uint64_t seed = 0;
  std::vector<std::string> stops;
  bool json = false, chat = false, greedy = false, ignore_eos = false;
  int64_t batch_size = 8;
  app->add_option("--model", model_dir, "Hugging Face model folder")->required();
  app->add_option("--adapter", adapter, "PEFT LoRA adapter folder, applied unmerged");
  app->add_option("--tokenizer", tokenizer_dir, "folder with tokenizer.json (default: the model's)");
  auto* o_prompt = app->add_option("--prompt", prompt, "prompt text");
  auto* o_messages = app->add_option("--messages", messages_file,
                                     "conversation: a JSON list of {role, content} (or {\"messages\": [...]})");
  auto* o_ids = app->add_option("--prompt-ids", prompt_ids, "prompt as token ids, comma-separated");
  auto* o_prompts = app->add_option("--prompts", prompts_file,
                                    "many prompts: a JSON-lines, Parquet or Arrow file (or a folder or glob of them), one {\"prompt\"}, {\"messages\"} or "
                                    "{\"prompt_ids\"} object per line; prints one JSON line per prompt");
  o_prompt->excludes(o_messages)->excludes(o_ids)->excludes(o_prompts);
  o_messages->excludes(o_ids)->excludes(o_prompts);
  o_ids->excludes(o_prompts);
  app->add_option("--batch-size", batch_size, "with --prompts: sequences generated together, each step reading the "
                  "weights once for all of them (a finished one's place goes to the next prompt)")
      ->check(at_least(1))->capture_default_str();
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
  MF_CHECK(*o_prompt || *o_messages || *o_ids || *o_prompts,
           "generate needs a prompt: --prompt TEXT, --messages FILE.json, --prompt-ids IDS or --prompts FILE.jsonl");
  MF_CHECK(!chat || *o_prompt || *o_prompts, "--chat wraps --prompt; with --messages the conversation is rendered already");
  run.apply_threads();

  if (tokenizer_dir.empty()) tokenizer_dir = model_dir;
  std::optional<hf::Tokenizer> tok;
  if (fs::exists(fs::path(tokenizer_dir) / "tokenizer.json")) tok = hf::Tokenizer::load(tokenizer_dir);
  MF_CHECK(tok || *o_ids || *o_prompts, tokenizer_dir, ": no tokenizer.json (pass --tokenizer DIR, or the prompt as --prompt-ids)");

  // Every prompt is read and encoded before the model loads: a bad line costs no load.
  std::vector<Prompt> prompts;
  if (*o_prompts) {
    // A file, or a folder or glob of them (a save_to_disk folder too), as a dataset's --data is read.
    for (const auto& file : data::dataset_files(prompts_file)) {
      auto more = read_prompts_file(file, tok ? &*tok : nullptr, tokenizer_dir, chat);
      prompts.insert(prompts.end(), std::make_move_iterator(more.begin()), std::make_move_iterator(more.end()));
    }
  } else if (*o_ids) {
    prompts.push_back({parse_id_list(prompt_ids, "--prompt-ids"), "", "--prompt-ids"});
  } else if (*o_messages) {
    prompts.push_back(encode_conversation(*tok, tokenizer_dir, Json(hf::read_json_file(messages_file)), messages_file));
  } else if (chat) {
    prompts.push_back(encode_conversation(*tok, tokenizer_dir, Json::array({Json{{"role", "user"}, {"content", prompt}}}),
                                          "--prompt"));
  } else {
    prompts.push_back(encode_text(*tok, prompt));
  }
  const bool many = o_prompts->count() > 0;
  if (many) json = true;  // one result line per prompt

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
  const models::GenerateOptions resolved = models::resolve_generation(asked, gc);
  for (size_t i = 0; i < prompts.size(); ++i) {
    const std::string& where = prompts[i].where;
    for (int64_t id : prompts[i].ids)
      MF_CHECK(id >= 0 && id < cfg.vocab_size, where, ": token id ", id, " is outside the vocabulary (", cfg.vocab_size,
               " tokens) of ", cfg.source);
    MF_CHECK(static_cast<int64_t>(prompts[i].ids.size()) < cfg.max_position_embeddings, where, ": its ",
             prompts[i].ids.size(), " tokens leave no room under max_position_embeddings (", cfg.max_position_embeddings,
             ") of ", cfg.source);
  }

  // Each prompt's options: as many new tokens as fit under max_position_embeddings.
  std::vector<models::GenerateOptions> options;
  for (const Prompt& p : prompts) {
    models::GenerateOptions go = resolved;
    const int64_t prompt_len = static_cast<int64_t>(p.ids.size());
    if (prompt_len + go.max_new_tokens > cfg.max_position_embeddings) {
      go.max_new_tokens = cfg.max_position_embeddings - prompt_len;
      std::fprintf(stderr, "generate: %s: at most %lld new tokens fit under max_position_embeddings (%lld)\n",
                   p.where.c_str(), static_cast<long long>(go.max_new_tokens),
                   static_cast<long long>(cfg.max_position_embeddings));
    }
    options.push_back(go);
  }

  std::unique_ptr<nn::ParamAccess> on_device;
  nn::ParamAccess* ps = &run.params_for(*loaded.model, on_device);
  const auto& so = resolved.sampling;
  // One result as a JSON line (the stream holds its text and whether a stop string ended it).
  auto result_json = [&](size_t i, const models::GenerateResult& res, const TextStream& stream) {
    const double decode_tps = res.decode_seconds > 0 ? static_cast<double>(res.ids.size()) / res.decode_seconds : 0;
    Json out;
    if (many) out["index"] = i;
    out["model"] = model_dir;
    if (!adapter.empty()) out["adapter"] = adapter;
    if (!prompts[i].text.empty()) out["prompt"] = prompts[i].text;
    out["prompt_ids"] = prompts[i].ids;
    out["generated_ids"] = res.ids;
    if (tok) out["text"] = stream.text();
    out["stop_reason"] = stream.stopped() ? "stop_string" : res.stop_reason;
    out["sampling"] = so.sample ? Json{{"temperature", so.temperature}, {"top_k", so.top_k}, {"top_p", so.top_p},
                                       {"repetition_penalty", so.repetition_penalty}, {"seed", so.seed}}
                                : Json("greedy");
    out["prefill_seconds"] = res.prefill_seconds;
    out["decode_seconds"] = res.decode_seconds;
    out["tokens_per_second"] = decode_tps;
    return out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  };

  if (many) {
    // Many prompts, --batch-size at a time; each line printed once every earlier prompt's has been
    // (the output keeps the file's order while sequences end in any order).
    std::vector<std::unique_ptr<TextStream>> streams;
    for (size_t i = 0; i < prompts.size(); ++i) streams.push_back(std::make_unique<TextStream>(tok ? &*tok : nullptr, stops, false));
    std::vector<std::optional<std::string>> lines(prompts.size());
    size_t printed = 0, done = 0, tokens = 0;
    std::vector<std::vector<int64_t>> prompt_ids;
    for (const Prompt& p : prompts) prompt_ids.push_back(p.ids);
    const auto t0 = std::chrono::steady_clock::now();
    models::generate_many(
        *loaded.model, *ps, prompt_ids, options, batch_size,
        [&](size_t i, int64_t id) { return streams[i]->add(id); },
        [&](size_t i, models::GenerateResult res) {
          streams[i]->finish();
          lines[i] = result_json(i, res, *streams[i]);
          tokens += res.ids.size();
          std::fprintf(stderr, "generate: prompt %zu/%zu (%s): %zu tokens, stopped: %s\n", ++done, prompts.size(),
                       prompts[i].where.c_str(), res.ids.size(),
                       streams[i]->stopped() ? "stop_string" : res.stop_reason.c_str());
          for (; printed < lines.size() && lines[printed]; ++printed) std::printf("%s\n", lines[printed]->c_str());
          std::fflush(stdout);
        });
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::fprintf(stderr, "generate: %zu prompts, %zu tokens in %.2f s (%.1f tokens/s, up to %lld sequences per step)\n",
                 prompts.size(), tokens, seconds, seconds > 0 ? static_cast<double>(tokens) / seconds : 0.0,
                 static_cast<long long>(std::min<int64_t>(batch_size, static_cast<int64_t>(prompts.size()))));
    return 0;
  }

  const std::vector<int64_t>& ids = prompts[0].ids;
  TextStream stream(tok ? &*tok : nullptr, stops, !json);
  const auto res = models::generate(*loaded.model, *ps, ids, options[0], [&](int64_t id) { return stream.add(id); });
  stream.finish();
  if (json) {
    std::printf("%s\n", result_json(0, res, stream).c_str());
    std::fflush(stdout);
  } else {
    if (!tok) {  // no tokenizer: the ids are the output
      for (size_t j = 0; j < res.ids.size(); ++j) std::printf("%s%lld", j ? "," : "", static_cast<long long>(res.ids[j]));
    }
    std::printf("\n");
    std::fflush(stdout);  // the text's end before the summary on stderr
    const double decode_tps = res.decode_seconds > 0 ? static_cast<double>(res.ids.size()) / res.decode_seconds : 0;
    std::fprintf(stderr, "generate: %zu tokens in %.2f s (%.1f tokens/s; the %zu-token prompt in %.2f s), stopped: %s\n",
                 res.ids.size(), res.decode_seconds, decode_tps, ids.size(), res.prefill_seconds,
                 stream.stopped() ? "stop_string" : res.stop_reason.c_str());
  }
  return 0;
}

}  // namespace moeforge::cli
