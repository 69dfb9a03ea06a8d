// A Hugging Face tokenizer.json: added tokens (matched before normalisation, with their lstrip /
// rstrip / single_word / normalized flags), normalizer, pre-tokenizer, BPE model, post-processor
// and decoder, applied in the order and with the semantics of the `tokenizers` library.
#pragma once
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <utility>
#include <string>
#include <unordered_map>
#include <vector>

#include "hf/tokenizer/bpe.h"
#include "hf/tokenizer/components.h"

namespace moeforge::hf {

struct AddedToken {
  int64_t id = 0;
  std::string content;
  bool special = false, lstrip = false, rstrip = false, single_word = false, normalized = false;
};

class Tokenizer {
 public:
  // `path` is a tokenizer.json or a folder holding one.
  static Tokenizer load(const std::string& path);
  // The contents of a tokenizer.json; `file` names it in errors.
  static Tokenizer parse(const std::string& json_text, const std::string& file);
  static Tokenizer from_json(const nlohmann::json& j, const std::string& file);

  std::vector<int64_t> encode(const std::string& text, bool add_special_tokens = true) const;
  tok::Encoded encode_with_tokens(const std::string& text, bool add_special_tokens = true) const;
  std::string decode(const std::vector<int64_t>& ids, bool skip_special_tokens = false) const;
  // Byte ranges [begin, end) of `text` that the tokens of `encoded` (an encoding of `text` without
  // special tokens) stand for, as the offsets of the `tokenizers` library. nullopt when a
  // normalizer rewrote the text so that the tokens no longer spell it.
  std::optional<std::vector<std::pair<size_t, size_t>>> token_offsets(const std::string& text,
                                                                      const tok::Encoded& encoded) const;

  std::optional<int64_t> token_to_id(const std::string& token) const;
  std::string id_to_token(int64_t id) const;  // "" when unknown
  int64_t vocab_size() const;                 // model vocabulary and added tokens
  const std::vector<AddedToken>& added_tokens() const { return added_; }
  const std::string& source() const { return source_; }

 private:
  struct Segment {
    std::string text;
    int64_t added_id = -1;  // >= 0: this segment is an added token
    bool at_input_start = false;
  };
  // Splits `s` around added tokens of one kind (normalized or not), as AddedVocabulary does.
  void split_added(const std::string& s, bool normalized_kind, bool at_start, std::vector<Segment>& out) const;

  std::string source_;
  bool byte_level_ = false;  // tokens spell bytes through the GPT-2 byte alphabet
  std::unique_ptr<tok::Bpe> model_;
  std::unique_ptr<tok::Normalizer> normalizer_;
  std::unique_ptr<tok::PreTokenizer> pre_tokenizer_;
  std::unique_ptr<tok::PostProcessor> post_processor_;
  std::unique_ptr<tok::Decoder> decoder_;
  std::vector<AddedToken> added_;
  const AddedToken* added_by_id(int64_t id) const;
  std::unordered_map<int64_t, size_t> added_index_by_id_;          // id -> index in added_
  std::unordered_map<std::string, size_t> added_index_by_content_;  // content -> index in added_
  // Added tokens by the first byte of their (normalized) content, longest first.
  std::vector<size_t> by_first_byte_[2][256];
  std::vector<std::string> match_text_;  // per added token: content, normalized when `normalized`
};

}  // namespace moeforge::hf
