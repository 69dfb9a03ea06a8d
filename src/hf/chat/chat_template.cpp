#include "hf/chat/chat_template.h"

#include <algorithm>
#include <filesystem>

#include "core/error.h"
#include "hf/fs_util.h"
#include "hf/tokenizer/tokenizer.h"

namespace moeforge::hf {

namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;

namespace {

// The special-token attributes transformers passes to templates (its special_tokens_map).
std::vector<std::pair<std::string, std::string>> special_tokens_of(const ojson& cfg, const std::string& where) {
  std::vector<std::pair<std::string, std::string>> out;
  for (const char* key : {"bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"}) {
    if (!cfg.contains(key) || cfg[key].is_null()) continue;
    const ojson& v = cfg[key];
    if (v.is_string()) {
      out.emplace_back(key, v.get<std::string>());
    } else if (v.is_object() && v.contains("content") && v["content"].is_string()) {
      out.emplace_back(key, v["content"].get<std::string>());
    } else {
      MF_THROW(where, ": field '", key, "' must be a string or an object with 'content'");
    }
  }
  return out;
}

}  // namespace

ojson prepare_messages(const ojson& messages) {
  ojson out = ojson::array();
  for (const auto& m : messages) {
    if (!m.is_object()) {
      out.push_back(m);
      continue;
    }
    ojson clean = ojson::object();
    for (auto it = m.begin(); it != m.end(); ++it)
      if (!it.value().is_null()) clean[it.key()] = it.value();
    const ojson* reasoning = nullptr;
    for (const char* key : {"reasoning_content", "thinking", "reasoning"})
      if (clean.contains(key)) {
        reasoning = &clean[key];
        break;
      }
    if (reasoning) {
      // {"thinking": r, **message, "reasoning_content": r}: key order as Python builds it.
      const ojson r = *reasoning;
      ojson aliased = ojson::object();
      aliased["thinking"] = r;
      for (auto it = clean.begin(); it != clean.end(); ++it)
        aliased[it.key()] = it.key() == "thinking" ? r : it.value();
      aliased["reasoning_content"] = r;
      clean = std::move(aliased);
    }
    out.push_back(std::move(clean));
  }
  return out;
}

std::optional<ChatTemplate> ChatTemplate::load(const std::string& dir) {
  const std::string cfg_path = (fs::path(dir) / "tokenizer_config.json").string();
  const std::string jinja_path = (fs::path(dir) / "chat_template.jinja").string();
  ojson cfg = fs::exists(cfg_path) ? read_json_file(cfg_path) : ojson::object();
  if (!cfg.is_object()) MF_THROW(cfg_path, ": expected a JSON object");
  std::string source, origin;
  if (fs::exists(jinja_path)) {  // transformers v5 saves the template here and prefers it
    source = read_text_file(jinja_path);
    origin = jinja_path;
  } else if (cfg.contains("chat_template") && !cfg["chat_template"].is_null()) {
    const ojson& ct = cfg["chat_template"];
    if (ct.is_string()) {
      source = ct.get<std::string>();
      origin = cfg_path + ": chat_template";
    } else if (ct.is_array()) {  // [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
      for (const auto& entry : ct) {
        MF_CHECK(entry.is_object() && entry.contains("name") && entry.contains("template") &&
                     entry["name"].is_string() && entry["template"].is_string(),
                 cfg_path, ": field 'chat_template' entries need string 'name' and 'template'");
        if (entry["name"] == "default") {
          source = entry["template"].get<std::string>();
          origin = cfg_path + ": chat_template[default]";
        }
      }
      MF_CHECK(!origin.empty(), cfg_path, ": field 'chat_template' has no template named 'default'");
    } else {
      MF_THROW(cfg_path, ": field 'chat_template' must be a string or a list of {name, template}");
    }
  } else {
    return std::nullopt;
  }
  ChatTemplate t = compile(source, origin);
  t.special_tokens_ = special_tokens_of(cfg, cfg_path);
  return t;
}

ChatTemplate ChatTemplate::compile(const std::string& source, const std::string& origin) {
  ChatTemplate t;
  try {
    t.tmpl_ = std::make_shared<jinja::Template>(source);
  } catch (const Error& e) {
    MF_THROW(origin, ": ", e.what());
  }
  t.origin_ = origin;
  return t;
}

ChatTemplate ChatTemplate::from_source(const std::string& source, const std::string& origin, const std::string& dir) {
  ChatTemplate t = compile(source, origin);
  const std::string cfg_path = (fs::path(dir) / "tokenizer_config.json").string();
  if (fs::exists(cfg_path)) t.special_tokens_ = special_tokens_of(read_json_file(cfg_path), cfg_path);
  return t;
}

jinja::RenderResult ChatTemplate::render(const ojson& messages, const ChatOptions& opts) const {
  MF_CHECK(messages.is_array(), "messages must be a list");
  std::vector<std::pair<std::string, jinja::Value>> vars;
  for (const auto& [k, v] : special_tokens_) vars.emplace_back(k, jinja::Value::string(v));
  if (opts.extra.is_object())
    for (auto it = opts.extra.begin(); it != opts.extra.end(); ++it) vars.emplace_back(it.key(), jinja::from_json(it.value()));
  vars.emplace_back("messages", jinja::from_json(prepare_messages(messages)));
  vars.emplace_back("tools", opts.tools.is_null() ? jinja::Value::none() : jinja::from_json(opts.tools));
  vars.emplace_back("documents", jinja::Value::none());
  vars.emplace_back("add_generation_prompt", jinja::Value::boolean(opts.add_generation_prompt));
  try {
    return tmpl_->render(vars);
  } catch (const Error& e) {
    MF_THROW(origin_, ": ", e.what());
  }
}

namespace {

size_t common_prefix(const std::string& a, size_t a_from, const std::string& b, size_t b_from) {
  size_t n = 0;
  while (a_from + n < a.size() && b_from + n < b.size() && a[a_from + n] == b[b_from + n]) ++n;
  return n;
}

}  // namespace

// Templates without {% generation %}: for assistant message i, H is the rendering of the messages
// before it and P the same with the generation prompt. H must be a prefix of the full rendering F
// (else the template rewrites history and only generation blocks can say what the assistant wrote);
// the reply starts where F parts from P. It ends as far as F agrees with R, the rendering that stops
// after message i. Some templates render a turn differently once later turns follow it (Qwen3 drops
// the <think> block, GPT-OSS closes with <|end|> instead of <|return|>): then the span runs through
// the message's content in F and on through the closing text that F shares with R. Trailing
// whitespace between turns is not part of the reply.
std::vector<std::pair<size_t, size_t>> ChatTemplate::assistant_spans_by_prefix(const ojson& messages,
                                                                               const ChatOptions& opts,
                                                                               const std::string& full) const {
  std::vector<std::pair<size_t, size_t>> spans;
  const ojson prepared = prepare_messages(messages);
  for (size_t i = 0; i < messages.size(); ++i) {
    if (!messages[i].is_object() || messages[i].value("role", std::string()) != "assistant") continue;
    ChatOptions with_prompt = opts;
    with_prompt.add_generation_prompt = true;
    ChatOptions without_prompt = opts;
    without_prompt.add_generation_prompt = false;
    const ojson head(messages.begin(), messages.begin() + static_cast<long>(i));
    const ojson upto(messages.begin(), messages.begin() + static_cast<long>(i) + 1);
    const std::string p = i == 0 ? std::string() : render(head, with_prompt).text;
    const std::string h = i == 0 ? std::string() : render(head, without_prompt).text;
    const std::string r = render(upto, without_prompt).text;
    // The history must render the same whatever follows; the reply starts where the full rendering
    // leaves the generation prompt (a prompt may add text the full rendering lacks, as Qwen3's empty
    // <think> block with enable_thinking=false).
    if (full.compare(0, h.size(), h) != 0)
      MF_THROW(origin_, ": cannot find assistant message ", i,
               " in the rendering (the template renders earlier turns differently once later ones follow); "
               "give the template {% generation %} blocks (recipe key chat_template) to train on it");
    const size_t start = std::max(h.size(), common_prefix(p, 0, full, 0));
    size_t end = start + common_prefix(r, start, full, start);
    if (end < r.size()) {
      const ojson& m = prepared[i];
      std::string content = m.contains("content") && m["content"].is_string() ? m["content"].get<std::string>() : "";
      // Reasoning written inline ("<think>...</think>answer") is often dropped from earlier turns.
      if (const size_t t = content.rfind("</think>"); t != std::string::npos && full.find(content, start) == std::string::npos) {
        content = content.substr(t + 8);
        content.erase(0, content.find_first_not_of(" \t\r\n") == std::string::npos ? content.size()
                                                                                   : content.find_first_not_of(" \t\r\n"));
      }
      if (!content.empty()) {
        const size_t in_full = full.find(content, start);
        const size_t in_r = r.rfind(content);
        if (in_full != std::string::npos && in_r != std::string::npos && in_r >= start) {
          const size_t content_end = in_full + content.size();
          end = std::max(end, content_end + common_prefix(r, in_r + content.size(), full, content_end));
        }
      }
    }
    // Whitespace between turns is layout, not something the assistant said.
    while (end > start && (full[end - 1] == '\n' || full[end - 1] == ' ' || full[end - 1] == '\t' || full[end - 1] == '\r'))
      --end;
    if (end > start) spans.emplace_back(start, end);
  }
  return spans;
}

ChatEncoding ChatTemplate::encode(const Tokenizer& tok, const ojson& messages, const ChatOptions& opts,
                                  bool with_mask) const {
  jinja::RenderResult rendered = render(messages, opts);
  ChatEncoding out;
  out.text = std::move(rendered.text);
  tok::Encoded e = tok.encode_with_tokens(out.text, /*add_special_tokens=*/false);
  out.ids = e.ids;
  out.assistant_mask.assign(out.ids.size(), 0);
  if (!with_mask) return out;
  std::vector<std::pair<size_t, size_t>> spans =
      has_generation_tags() ? rendered.generation_spans : assistant_spans_by_prefix(messages, opts, out.text);
  if (spans.empty()) return out;
  const auto offsets = tok.token_offsets(out.text, e);
  MF_CHECK(offsets, tok.source(), ": cannot map tokens back onto the rendered chat (the normalizer rewrites the "
                                  "text), so the assistant-token mask is unavailable");
  // transformers: the token holding the span's first character through the one holding its last.
  auto token_at = [&](size_t byte) -> std::optional<size_t> {
    for (size_t k = 0; k < offsets->size(); ++k)
      if ((*offsets)[k].first <= byte && byte < (*offsets)[k].second) return k;
    return std::nullopt;
  };
  for (const auto& [b, e2] : spans) {
    if (e2 <= b) continue;
    const auto first = token_at(b);
    if (!first) break;
    const auto last = token_at(e2 - 1);
    const size_t stop = last ? *last + 1 : out.ids.size();
    for (size_t k = *first; k < stop; ++k) out.assistant_mask[k] = 1;
  }
  return out;
}

nlohmann::ordered_json conversation_row(nlohmann::ordered_json value, const std::string& where) {
  if (value.is_array()) value = nlohmann::ordered_json{{"messages", std::move(value)}};
  MF_CHECK(value.is_object() && value.contains("messages") && value["messages"].is_array(), where,
           ": expected a list of messages or an object with 'messages'");
  return value;
}

ChatOptions chat_options_of(const nlohmann::ordered_json& row, const std::string& where) {
  ChatOptions opts;
  if (row.contains("tools") && !row["tools"].is_null()) {
    nlohmann::ordered_json tools = row["tools"];
    if (tools.is_string()) {
      // Hugging Face datasets often keep tool schemas as a JSON string (their shapes differ from
      // row to row, which a table column cannot hold otherwise): read it as the list it spells.
      const std::string text = tools.get<std::string>();
      check_json_depth(text, where + ": field 'tools'");
      try {
        tools = nlohmann::ordered_json::parse(text);
      } catch (const nlohmann::ordered_json::exception& e) {
        MF_THROW(where, ": field 'tools' is a string that is not JSON (", e.what(), ")");
      }
    }
    MF_CHECK(tools.is_array(), where, ": field 'tools' must be a list (or a JSON string of one)");
    opts.tools = std::move(tools);
  }
  if (row.contains("chat_template_kwargs")) {
    MF_CHECK(row["chat_template_kwargs"].is_object(), where, ": field 'chat_template_kwargs' must be an object");
    opts.extra = row["chat_template_kwargs"];
  }
  return opts;
}

}  // namespace moeforge::hf
