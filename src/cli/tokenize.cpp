// moeforge tokenize: encode text (or decode ids) with a model's tokenizer.json, or render a
// conversation with its chat template and show which tokens a training run would learn from.
#include <cstdio>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli/args.h"
#include "cli/commands.h"
#include "core/error.h"
#include "hf/chat/chat_template.h"
#include "hf/fs_util.h"
#include "hf/tokenizer/tokenizer.h"

namespace moeforge::cli {

int cmd_tokenize(const std::vector<std::string>& argv) {
  Args args(argv, {"--tokenizer", "--text", "--file", "--decode", "--messages", "--chat-template"},
            {"--no-special-tokens", "--add-generation-prompt"});
  MF_CHECK(args.positionals().empty(), "tokenize: unexpected argument '", args.positionals().front(), "'");
  const std::string dir = args.require("--tokenizer");
  auto tok = hf::Tokenizer::load(dir);
  nlohmann::ordered_json out;
  if (auto messages_file = args.get("--messages")) {
    // A JSON list of messages, or a dataset row {"messages": [...], "tools": [...]?, "chat_template_kwargs": {...}?}.
    nlohmann::ordered_json row = hf::read_json_file(*messages_file);
    if (row.is_array()) row = nlohmann::ordered_json{{"messages", row}};
    MF_CHECK(row.is_object() && row.contains("messages") && row["messages"].is_array(), *messages_file,
             ": expected a list of messages or an object with 'messages'");
    std::optional<hf::ChatTemplate> chat;
    if (auto t = args.get("--chat-template")) chat = hf::ChatTemplate::from_source(hf::read_text_file(*t), *t, dir);
    else chat = hf::ChatTemplate::load(dir);
    MF_CHECK(chat, dir, ": no chat template (tokenizer_config.json 'chat_template' or chat_template.jinja); pass --chat-template");
    hf::ChatOptions opts;
    opts.add_generation_prompt = args.has("--add-generation-prompt");
    if (row.contains("tools")) opts.tools = row["tools"];
    if (row.contains("chat_template_kwargs") && row["chat_template_kwargs"].is_object()) opts.extra = row["chat_template_kwargs"];
    const auto enc = chat->encode(tok, row["messages"], opts, !opts.add_generation_prompt);
    out["text"] = enc.text;
    out["count"] = enc.ids.size();
    out["ids"] = enc.ids;
    out["assistant_mask"] = enc.assistant_mask;
    out["template"] = chat->origin();
  } else if (auto ids_text = args.get("--decode")) {
    std::vector<int64_t> ids;
    std::stringstream ss(*ids_text);
    std::string item;
    while (std::getline(ss, item, ',')) {
      try {
        ids.push_back(std::stoll(item));
      } catch (const std::exception&) {
        MF_THROW("--decode: '", item, "' is not a token id (expected comma-separated integers)");
      }
    }
    out["text"] = tok.decode(ids, args.has("--no-special-tokens"));
  } else {
    const auto t = args.get("--text");
    const auto f = args.get("--file");
    MF_CHECK(t.has_value() != f.has_value(), "tokenize needs exactly one of --text, --file, --messages or --decode");
    const std::string text = t ? *t : hf::read_text_file(*f);
    auto e = tok.encode_with_tokens(text, !args.has("--no-special-tokens"));
    out["count"] = e.ids.size();
    out["ids"] = e.ids;
    out["tokens"] = e.tokens;
  }
  std::printf("%s\n", out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  return 0;
}

}  // namespace moeforge::cli
