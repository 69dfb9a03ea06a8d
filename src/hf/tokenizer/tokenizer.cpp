#include "hf/tokenizer/tokenizer.h"

#include <algorithm>
#include <filesystem>
#include <functional>

#include "core/error.h"
#include "hf/fs_util.h"

namespace moeforge::hf {

namespace fs = std::filesystem;
using nlohmann::json;

Tokenizer Tokenizer::load(const std::string& path) {
  std::string file = path;
  if (fs::is_directory(path)) file = (fs::path(path) / "tokenizer.json").string();
  MF_CHECK(fs::exists(file), file, ": no such file (a tokenizer folder needs a tokenizer.json)");
  return parse(read_text_file(file), file);
}

Tokenizer Tokenizer::parse(const std::string& json_text, const std::string& file) {
  json j;
  check_json_depth(json_text, file);
  try {
    j = json::parse(json_text);
  } catch (const json::exception& e) {
    MF_THROW(file, ": invalid JSON (", e.what(), ")");
  }
  // Any JSON type mismatch the checks below miss still becomes one error naming the file.
  try {
    return from_json(j, file);
  } catch (const json::exception& e) {
    MF_THROW(file, ": ", e.what());
  }
}

Tokenizer Tokenizer::from_json(const nlohmann::json& j, const std::string& file) {
  MF_CHECK(j.is_object() && j.contains("model") && j["model"].is_object(), file, ": missing object field 'model'");
  Tokenizer t;
  t.source_ = file;
  const std::string model_type = j["model"].value("type", std::string("BPE"));
  MF_CHECK(model_type == "BPE", file, ": field 'model.type' value '", model_type,
           "' is not supported (supported: BPE, as in Qwen, Llama, DeepSeek, GPT-OSS and Mixtral tokenizers)");
  // Byte-level tokenizers name a ByteLevel pre-tokenizer or decoder (possibly inside a Sequence).
  const std::function<bool(const json&, int)> mentions_byte_level = [&](const json& x, int depth) {
    MF_CHECK(depth < 64, file, ": pre_tokenizer/decoder nested too deeply");
    if (x.is_object()) {
      if (x.contains("type") && x["type"].is_string() && x["type"] == "ByteLevel") return true;
      for (const auto& [k, v] : x.items())
        if (mentions_byte_level(v, depth + 1)) return true;
    } else if (x.is_array()) {
      for (const auto& v : x)
        if (mentions_byte_level(v, depth + 1)) return true;
    }
    return false;
  };
  t.byte_level_ = mentions_byte_level(j.value("pre_tokenizer", json()), 0) || mentions_byte_level(j.value("decoder", json()), 0);
  try {
    t.model_ = std::make_unique<tok::Bpe>(j["model"], file);
    t.normalizer_ = tok::make_normalizer(j.value("normalizer", json()), file + ": normalizer");
    t.pre_tokenizer_ = tok::make_pre_tokenizer(j.value("pre_tokenizer", json()), file + ": pre_tokenizer");
    t.post_processor_ = tok::make_post_processor(j.value("post_processor", json()), file + ": post_processor");
    t.decoder_ = tok::make_decoder(j.value("decoder", json()), file + ": decoder");
  } catch (const json::exception& e) {
    MF_THROW(file, ": ", e.what());
  }
  if (j.contains("added_tokens") && !j["added_tokens"].is_null()) {
    MF_CHECK(j["added_tokens"].is_array(), file, ": field 'added_tokens' must be a list");
    for (const auto& a : j["added_tokens"]) {
      AddedToken at;
      try {
        at.id = tok::token_id(a.at("id"), file + ": added_tokens[].id");
        at.content = a.at("content").get<std::string>();
        at.special = a.value("special", false);
        at.lstrip = a.value("lstrip", false);
        at.rstrip = a.value("rstrip", false);
        at.single_word = a.value("single_word", false);
        at.normalized = a.value("normalized", !at.special);
      } catch (const json::exception& e) {
        MF_THROW(file, ": added_tokens entry ", a.dump(), ": ", e.what());
      }
      MF_CHECK(!at.content.empty(), file, ": added token ", at.id, " has empty content");
      t.added_.push_back(at);
    }
  }
  for (size_t i = 0; i < t.added_.size(); ++i) {
    const AddedToken& a = t.added_[i];
    t.added_index_by_id_.emplace(a.id, i);
    t.added_index_by_content_.emplace(a.content, i);
    std::string m = a.content;
    if (a.normalized && t.normalizer_) m = t.normalizer_->apply(m);
    t.match_text_.push_back(m);
    if (!m.empty()) t.by_first_byte_[a.normalized ? 1 : 0][static_cast<uint8_t>(m[0])].push_back(i);
  }
  for (auto& kind : t.by_first_byte_)
    for (auto& v : kind)
      std::stable_sort(v.begin(), v.end(), [&](size_t a, size_t b) { return t.match_text_[a].size() > t.match_text_[b].size(); });
  return t;
}

void Tokenizer::split_added(const std::string& s, bool normalized_kind, bool at_start, std::vector<Segment>& out) const {
  const auto& index = by_first_byte_[normalized_kind ? 1 : 0];
  size_t start_offset = 0, pos = 0;
  auto char_before_is_word = [&](size_t p) {
    if (p == 0) return false;
    size_t q = p - 1;
    while (q > 0 && (static_cast<uint8_t>(s[q]) & 0xC0) == 0x80) --q;
    size_t i = q;
    const char32_t c = text::next_codepoint(s, i);
    return text::is_alphanumeric(c) || c == U'_';
  };
  auto char_after_is_word = [&](size_t p) {
    if (p >= s.size()) return false;
    const char32_t c = text::next_codepoint(s, p);
    return text::is_alphanumeric(c) || c == U'_';
  };
  while (pos < s.size()) {
    // Leftmost-longest: the first position where any token matches, the longest token there.
    const size_t* found = nullptr;
    for (const size_t& idx : index[static_cast<uint8_t>(s[pos])]) {
      const std::string& m = match_text_[idx];
      if (s.compare(pos, m.size(), m) != 0) continue;
      const AddedToken& a = added_[idx];
      if (a.single_word && (char_before_is_word(pos) || char_after_is_word(pos + m.size()))) continue;
      found = &idx;
      break;
    }
    if (!found) {
      ++pos;
      continue;
    }
    const AddedToken& a = added_[*found];
    size_t start = pos, stop = pos + match_text_[*found].size();
    if (a.lstrip) {  // swallow the whitespace before it, back to the previous split
      size_t b = start;
      while (b > start_offset) {
        size_t q = b - 1;
        while (q > start_offset && (static_cast<uint8_t>(s[q]) & 0xC0) == 0x80) --q;
        size_t i = q;
        if (!text::is_whitespace(text::next_codepoint(s, i))) break;
        b = q;
      }
      start = b;
    }
    if (a.rstrip) {
      size_t e = stop;
      while (e < s.size()) {
        size_t i = e;
        if (!text::is_whitespace(text::next_codepoint(s, i))) break;
        e = i;
      }
      stop = e;
    }
    if (start_offset < start) out.push_back({s.substr(start_offset, start - start_offset), -1, at_start && start_offset == 0});
    out.push_back({s.substr(start, stop - start), a.id, false});
    start_offset = stop;
    pos = stop;
  }
  if (start_offset < s.size()) out.push_back({s.substr(start_offset), -1, at_start && start_offset == 0});
}

tok::Encoded Tokenizer::encode_with_tokens(const std::string& input, bool add_special_tokens) const {
  const std::string text = text::utf8_lossy(input);
  // 1. Added tokens that match the raw text; 2. normalize the rest; 3. added tokens that match
  // normalized text; 4. pre-tokenize and run the model on what is left.
  std::vector<Segment> raw, segs;
  split_added(text, false, true, raw);
  for (auto& r : raw) {
    if (r.added_id >= 0) {
      segs.push_back(std::move(r));
      continue;
    }
    std::string n = normalizer_ ? normalizer_->apply(r.text) : r.text;
    split_added(n, true, r.at_input_start, segs);
  }
  tok::Encoded e;
  for (const auto& sg : segs) {
    if (sg.added_id >= 0) {
      e.ids.push_back(sg.added_id);
      e.tokens.push_back(sg.text);  // the matched span, stripped whitespace included (as tokenizers)
      continue;
    }
    std::vector<tok::Piece> pieces{{sg.text, sg.at_input_start}};
    if (pre_tokenizer_) pre_tokenizer_->apply(pieces);
    const size_t first = e.ids.size();
    for (const auto& p : pieces) model_->encode_word(p.text, e.ids);
    for (size_t i = first; i < e.ids.size(); ++i) e.tokens.push_back(*model_->id_to_token(e.ids[i]));
  }
  if (post_processor_) e = post_processor_->apply(std::move(e), add_special_tokens);
  return e;
}

std::vector<int64_t> Tokenizer::encode(const std::string& text, bool add_special_tokens) const {
  return encode_with_tokens(text, add_special_tokens).ids;
}

const AddedToken* Tokenizer::added_by_id(int64_t id) const {
  auto it = added_index_by_id_.find(id);
  return it == added_index_by_id_.end() ? nullptr : &added_[it->second];
}

std::optional<int64_t> Tokenizer::token_to_id(const std::string& token) const {
  auto it = added_index_by_content_.find(token);
  if (it != added_index_by_content_.end()) return added_[it->second].id;
  return model_->token_to_id(token);
}

std::string Tokenizer::id_to_token(int64_t id) const {
  if (const AddedToken* a = added_by_id(id)) return a->content;
  const std::string* t = model_->id_to_token(id);
  return t ? *t : std::string();
}

int64_t Tokenizer::vocab_size() const {
  int64_t n = model_->vocab_size();
  for (const auto& a : added_) n = std::max(n, a.id + 1);
  return n;
}

std::string Tokenizer::decode(const std::vector<int64_t>& ids, bool skip_special_tokens) const {
  std::vector<std::string> tokens;
  for (int64_t id : ids) {
    const AddedToken* added = added_by_id(id);
    if (added && added->special && skip_special_tokens) continue;
    std::string t = id_to_token(id);
    MF_CHECK(!t.empty(), source_, ": cannot decode id ", id, " (not in the vocabulary)");
    tokens.push_back(std::move(t));
  }
  if (!decoder_) {
    std::string s;
    for (size_t i = 0; i < tokens.size(); ++i) s += (i ? " " : "") + tokens[i];
    return s;
  }
  std::string s;
  for (auto& t : decoder_->apply(std::move(tokens))) s += t;
  return s;
}

}  // namespace moeforge::hf

namespace moeforge::hf {

std::optional<std::vector<std::pair<size_t, size_t>>> Tokenizer::token_offsets(const std::string& input,
                                                                              const tok::Encoded& e) const {
  const std::string text = text::utf8_lossy(input);
  std::vector<std::pair<size_t, size_t>> out(e.ids.size());
  size_t cursor = 0;
  std::string pending;
  std::vector<size_t> pending_tokens;
  auto place_group = [&]() {
    const size_t limit = std::min(text.size() - cursor, pending.size() * 4 + 16);
    for (size_t len = 1; len <= limit; ++len) {
      if (normalizer_->apply(text.substr(cursor, len)) != pending) continue;
      for (size_t t : pending_tokens) out[t] = {cursor, cursor + len};
      cursor += len;
      pending.clear();
      pending_tokens.clear();
      return true;
    }
    return false;
  };
  for (size_t k = 0; k < e.ids.size(); ++k) {
    // What this token stands for in the input.
    std::string surface;
    if (added_by_id(e.ids[k])) {
      surface = e.tokens[k];
    } else if (byte_level_) {
      const std::string& t = e.tokens[k];
      size_t i = 0;
      while (i < t.size()) {
        const int b = text::char_to_byte(text::next_codepoint(t, i));
        if (b < 0) return std::nullopt;
        surface += static_cast<char>(b);
      }
    } else {
      const std::string& t = e.tokens[k];
      if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>') {
        surface += static_cast<char>(std::stoi(t.substr(3, 2), nullptr, 16));
      } else {
        for (size_t i = 0; i < t.size();) {
          if (t.compare(i, 3, "\xE2\x96\x81") == 0) {  // U+2581, SentencePiece's space
            surface += ' ';
            i += 3;
          } else {
            surface += t[i++];
          }
        }
      }
    }
    auto matches = [&](size_t at, const std::string& s) { return text.compare(at, s.size(), s) == 0; };
    if (!pending.empty()) {  // inside a group of tokens that spell normalized text, see below
      pending += surface;
      pending_tokens.push_back(k);
      place_group();
      continue;
    }
    // Whitespace that a pre-tokenizer removed belongs to no token.
    size_t at = cursor;
    while (!matches(at, surface) && !(surface.size() > 1 && surface[0] == ' ' && matches(at, surface.substr(1))) &&
           at < text.size() && (text[at] == ' ' || text[at] == '\t' || text[at] == '\n' || text[at] == '\r'))
      ++at;
    if (matches(at, surface)) {
      out[k] = {at, at + surface.size()};
      cursor = at + surface.size();
    } else if (!surface.empty() && surface[0] == ' ' && matches(at, surface.substr(1))) {
      // A space the normalizer or Metaspace prepended: no input byte of its own.
      out[k] = {at, at + surface.size() - 1};
      cursor = at + surface.size() - 1;
    } else if (normalizer_) {
      // The normalizer rewrote this part (NFC composing "e\u0301" into "é", ...): collect tokens
      // until their text is the normalization of some input span, and give them all that span.
      pending = surface;
      pending_tokens.assign(1, k);
      place_group();
    } else {
      return std::nullopt;
    }
  }
  if (!pending.empty()) return std::nullopt;
  return out;
}

}  // namespace moeforge::hf
