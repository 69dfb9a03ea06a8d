// moeforge tokenize: encode text (or decode ids) with a model's tokenizer.json, or render a
// conversation with its chat template and show which tokens a training run would learn from.
#include <cstdio>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli/app.h"
#include "cli/commands.h"
#include "core/error.h"
#include "hf/chat/chat_template.h"
#include "hf/fs_util.h"
#include "hf/tokenizer/tokenizer.h"

namespace moeforge::cli {

int cmd_tokenize(const std::vector<std::string>& argv) {
  auto app = make_app("tokenize", "Encode text (or decode ids) with a tokenizer.json as the tokenizers library does, or "
                      "render a\nconversation with the chat template as apply_chat_template does (ids, and the "
                      "assistant-token\nmask training uses for the loss). Prints one JSON object.",
                      "\nExamples:\n  moeforge tokenize --tokenizer MODEL_DIR --text 'Hello world'\n"
                      "  moeforge tokenize --tokenizer MODEL_DIR --messages conv.json --add-generation-prompt");
  std::string dir, text_arg, file_arg, decode_arg, messages_arg, template_arg;
  bool no_special = false, gen_prompt = false;
  app->add_option("--tokenizer", dir, "folder with tokenizer.json")->required();
  auto* o_text = app->add_option("--text", text_arg, "text to encode");
  auto* o_file = app->add_option("--file", file_arg, "a file whose text to encode");
  auto* o_decode = app->add_option("--decode", decode_arg, "ids to decode, comma-separated");
  auto* o_messages = app->add_option("--messages", messages_arg,
                                     "conversation: a JSON list of messages or a dataset row {\"messages\": [...]}");
  for (auto* a : {o_text, o_file, o_decode, o_messages})
    for (auto* b : {o_text, o_file, o_decode, o_messages})
      if (a != b) a->excludes(b);
  app->add_option("--chat-template", template_arg, "a chat template file instead of the tokenizer folder's");
  app->add_flag("--no-special-tokens", no_special, "encode without the post-processor's special tokens; decode skipping them");
  app->add_flag("--add-generation-prompt", gen_prompt, "end the rendered conversation with the assistant's turn opening");
  if (auto code = parse(*app, argv)) return *code;
  auto tok = hf::Tokenizer::load(dir);
  nlohmann::ordered_json out;
  if (*o_messages) {
    const nlohmann::ordered_json row = hf::conversation_row(hf::read_json_file(messages_arg), messages_arg);
    std::optional<hf::ChatTemplate> chat;
    if (!template_arg.empty())
      chat = hf::ChatTemplate::from_source(hf::read_text_file(template_arg), template_arg, dir);
    else chat = hf::ChatTemplate::load(dir);
    MF_CHECK(chat, dir, ": no chat template (tokenizer_config.json 'chat_template' or chat_template.jinja); pass --chat-template");
    hf::ChatOptions opts = hf::chat_options_of(row, messages_arg);
    opts.add_generation_prompt = gen_prompt;
    const auto enc = chat->encode(tok, row["messages"], opts, !opts.add_generation_prompt);
    out["text"] = enc.text;
    out["count"] = enc.ids.size();
    out["ids"] = enc.ids;
    out["assistant_mask"] = enc.assistant_mask;
    out["template"] = chat->origin();
  } else if (*o_decode) {
    out["text"] = tok.decode(parse_id_list(decode_arg, "--decode"), no_special);
  } else {
    MF_CHECK(*o_text || *o_file, "tokenize needs one of --text, --file, --messages or --decode");
    const std::string text = *o_text ? text_arg : hf::read_text_file(file_arg);
    auto e = tok.encode_with_tokens(text, !no_special);
    out["count"] = e.ids.size();
    out["ids"] = e.ids;
    out["tokens"] = e.tokens;
  }
  std::printf("%s\n", out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  return 0;
}

}  // namespace moeforge::cli
