// apply_chat_template: a tokenizer folder's chat template (chat_template.jinja, the v5 layout, or
// the `chat_template` field of tokenizer_config.json, a string or a list of named templates)
// rendered for a conversation exactly as transformers renders it, then tokenized without special
// tokens, with the mask of the tokens the assistant produced (for loss on assistant turns only).
#pragma once
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "hf/chat/jinja.h"

namespace moeforge::hf {

class Tokenizer;

struct ChatOptions {
  bool add_generation_prompt = false;
  nlohmann::ordered_json tools;                                      // null or a list of schemas
  nlohmann::ordered_json extra = nlohmann::ordered_json::object();  // enable_thinking, reasoning_effort, ...
};

// A conversation as a file or dataset row gives it: {"messages": [...], "tools"?: [...],
// "chat_template_kwargs"?: {...}}, or a bare list of messages (wrapped into that form). Errors name `where`.
nlohmann::ordered_json conversation_row(nlohmann::ordered_json value, const std::string& where);
// The row's rendering options: its tools and chat_template_kwargs (checked for type).
ChatOptions chat_options_of(const nlohmann::ordered_json& row, const std::string& where);

struct ChatEncoding {
  std::string text;
  std::vector<int64_t> ids;
  std::vector<uint8_t> assistant_mask;  // 1 where the token was written by an assistant turn
};

class ChatTemplate {
 public:
  // The folder's chat template, or nullopt when it has none. Errors name the file and field.
  static std::optional<ChatTemplate> load(const std::string& tokenizer_dir);
  // A template given directly (recipe override); special tokens come from `tokenizer_dir`'s config.
  static ChatTemplate from_source(const std::string& source, const std::string& origin,
                                  const std::string& tokenizer_dir);

  // The rendered text, plus spans of {% generation %} blocks (bytes of the text).
  jinja::RenderResult render(const nlohmann::ordered_json& messages, const ChatOptions& opts) const;
  // Renders, tokenizes, and marks assistant tokens: from {% generation %} blocks when the template
  // has them (transformers' return_assistant_tokens_mask), else by rendering each assistant turn's
  // prefix (see assistant_spans_by_prefix in the .cpp).
  // with_mask=false skips the mask (all zeros), for inference-style prompts.
  ChatEncoding encode(const Tokenizer& tok, const nlohmann::ordered_json& messages, const ChatOptions& opts,
                      bool with_mask = true) const;

  bool has_generation_tags() const { return tmpl_->has_generation_tags(); }
  const std::string& origin() const { return origin_; }

 private:
  static ChatTemplate compile(const std::string& source, const std::string& origin);
  std::shared_ptr<jinja::Template> tmpl_;
  std::string origin_;  // file (and field) the template came from, for errors
  std::vector<std::pair<std::string, std::string>> special_tokens_;  // bos_token, eos_token, ...
  std::vector<std::pair<size_t, size_t>> assistant_spans_by_prefix(const nlohmann::ordered_json& messages,
                                                                   const ChatOptions& opts,
                                                                   const std::string& full) const;
};

// What transformers does to messages before rendering: None-valued keys dropped, and a message's
// reasoning (reasoning_content / thinking / reasoning) exposed under `thinking` and
// `reasoning_content` both.
nlohmann::ordered_json prepare_messages(const nlohmann::ordered_json& messages);

}  // namespace moeforge::hf
