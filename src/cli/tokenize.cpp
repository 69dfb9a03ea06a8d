// moeforge tokenize: encode text (or decode ids) with a model's tokenizer.json, for checking.
#include <cstdio>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli/args.h"
#include "cli/commands.h"
#include "core/error.h"
#include "hf/fs_util.h"
#include "hf/tokenizer/tokenizer.h"

namespace moeforge::cli {

int cmd_tokenize(const std::vector<std::string>& argv) {
  Args args(argv, {"--tokenizer", "--text", "--file", "--decode"}, {"--no-special-tokens"});
  MF_CHECK(args.positionals().empty(), "tokenize: unexpected argument '", args.positionals().front(), "'");
  auto tok = hf::Tokenizer::load(args.require("--tokenizer"));
  nlohmann::ordered_json out;
  if (auto ids_text = args.get("--decode")) {
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
    MF_CHECK(t.has_value() != f.has_value(), "tokenize needs exactly one of --text, --file or --decode");
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
