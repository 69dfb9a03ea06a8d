// The pipeline stages of a tokenizer.json, each parsed from its JSON object and applied as the
// `tokenizers` library does: normalizers, pre-tokenizers, post-processors and decoders.
#pragma once
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "hf/tokenizer/text.h"

namespace moeforge::hf::tok {

// A token id from tokenizer.json: an integer JSON number in [0, 2^31) (a float, or an integer
// beyond int64 that the JSON parser kept as a float, is an error naming `what`, never a conversion).
int64_t token_id(const nlohmann::json& v, const std::string& what);

using json = nlohmann::json;

// A span of text between added tokens, split further by pre-tokenizers.
struct Piece {
  std::string text;
  bool at_input_start = false;  // starts at offset 0 of the original input (Metaspace "first")
};

class Normalizer {
 public:
  virtual ~Normalizer() = default;
  virtual std::string apply(std::string s) const = 0;
};
// `where` names the file and field in errors; null JSON gives nullptr.
std::unique_ptr<Normalizer> make_normalizer(const json& j, const std::string& where);

class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  virtual void apply(std::vector<Piece>& pieces) const = 0;
};
std::unique_ptr<PreTokenizer> make_pre_tokenizer(const json& j, const std::string& where);

// Decoders transform the token strings; the result is concatenated.
class Decoder {
 public:
  virtual ~Decoder() = default;
  virtual std::vector<std::string> apply(std::vector<std::string> tokens) const = 0;
};
std::unique_ptr<Decoder> make_decoder(const json& j, const std::string& where);

// Post-processors add special tokens around one encoded sequence.
struct Encoded {
  std::vector<int64_t> ids;
  std::vector<std::string> tokens;
};
class PostProcessor {
 public:
  virtual ~PostProcessor() = default;
  virtual Encoded apply(Encoded e, bool add_special_tokens) const = 0;
};
std::unique_ptr<PostProcessor> make_post_processor(const json& j, const std::string& where);

}  // namespace moeforge::hf::tok
