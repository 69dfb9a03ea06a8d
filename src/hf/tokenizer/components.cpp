#include "hf/tokenizer/components.h"

#include "core/error.h"

namespace moeforge::hf::tok {

int64_t token_id(const nlohmann::json& v, const std::string& what) {
  MF_CHECK(v.is_number_integer(), what, " must be an integer token id, got ", v.dump());
  MF_CHECK(v.is_number_unsigned() ? v.get<uint64_t>() < (1ull << 31) : (v.get<int64_t>() >= 0 && v.get<int64_t>() < (1ll << 31)),
           what, " is a token id out of range: ", v.dump());
  return v.get<int64_t>();
}


namespace {

std::string type_of(const json& j, const std::string& where) {
  MF_CHECK(j.is_object() && j.contains("type") && j["type"].is_string(), where, ": expected an object with a 'type'");
  return j["type"].get<std::string>();
}

std::string str_field(const json& j, const char* key, const std::string& where, const std::string& def = "") {
  if (!j.contains(key) || j[key].is_null()) return def;
  MF_CHECK(j[key].is_string(), where, ": field '", key, "' must be a string");
  return j[key].get<std::string>();
}

// A {"String": s} or {"Regex": r} pattern: literal strings are escaped into a regex.
std::unique_ptr<text::Regex> make_pattern(const json& p, const std::string& where) {
  MF_CHECK(p.is_object(), where, ": 'pattern' must be {\"String\": ...} or {\"Regex\": ...}");
  if (p.contains("Regex")) return std::make_unique<text::Regex>(p["Regex"].get<std::string>());
  MF_CHECK(p.contains("String"), where, ": 'pattern' must be {\"String\": ...} or {\"Regex\": ...}");
  std::string lit = p["String"].get<std::string>(), re;
  for (char c : lit) {
    if (std::string("\\^$.|?*+()[]{}").find(c) != std::string::npos) re += '\\';
    re += c;
  }
  return std::make_unique<text::Regex>(re);
}

std::string replace_all(const text::Regex& re, const std::string& s, const std::string& content) {
  std::string out;
  size_t last = 0;
  for (auto [b, e] : re.find_all(s)) {
    out.append(s, last, b - last);
    out += content;
    last = e;
  }
  out.append(s, last, std::string::npos);
  return out;
}

// ---- normalizers
struct Sequence final : Normalizer {
  std::vector<std::unique_ptr<Normalizer>> parts;
  std::string apply(std::string s) const override {
    for (const auto& p : parts) s = p->apply(std::move(s));
    return s;
  }
};
struct UnicodeForm final : Normalizer {
  std::string form;
  std::string apply(std::string s) const override { return text::normalize_unicode(s, form); }
};
struct Lowercase final : Normalizer {
  std::string apply(std::string s) const override { return text::lowercase(s); }
};
struct StripAccents final : Normalizer {
  std::string apply(std::string s) const override { return text::strip_accents(s); }
};
struct ReplaceN final : Normalizer {
  std::unique_ptr<text::Regex> re;
  std::string content;
  std::string apply(std::string s) const override { return replace_all(*re, s, content); }
};
struct Prepend final : Normalizer {
  std::string prefix;
  std::string apply(std::string s) const override { return s.empty() ? s : prefix + s; }
};
struct StripN final : Normalizer {
  bool left = true, right = true;
  std::string apply(std::string s) const override {
    auto cps = text::codepoints(s);
    size_t b = 0, e = cps.size();
    if (left)
      while (b < e && text::is_whitespace(cps[b])) ++b;
    if (right)
      while (e > b && text::is_whitespace(cps[e - 1])) --e;
    std::string out;
    for (size_t i = b; i < e; ++i) text::append_utf8(out, cps[i]);
    return out;
  }
};

// ---- pre-tokenizers
enum class Behavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

Behavior parse_behavior(const std::string& b, const std::string& where) {
  if (b == "Removed") return Behavior::Removed;
  if (b == "Isolated") return Behavior::Isolated;
  if (b == "MergedWithPrevious") return Behavior::MergedWithPrevious;
  if (b == "MergedWithNext") return Behavior::MergedWithNext;
  if (b == "Contiguous") return Behavior::Contiguous;
  MF_THROW(where, ": unknown split behavior '", b, "'");
}

// Splits each piece at the spans `find` reports, as NormalizedString::split does.
template <typename Find>
void split_pieces(std::vector<Piece>& pieces, Behavior behavior, bool invert, Find find) {
  std::vector<Piece> out;
  for (const Piece& p : pieces) {
    const std::string& s = p.text;
    // (begin, end, is_match) covering s.
    std::vector<std::tuple<size_t, size_t, bool>> spans;
    size_t last = 0;
    for (auto [b, e] : find(s)) {
      if (b > last) spans.emplace_back(last, b, invert);
      spans.emplace_back(b, e, !invert);
      last = e;
    }
    if (last < s.size()) spans.emplace_back(last, s.size(), invert);
    std::vector<std::pair<size_t, size_t>> kept;
    bool prev_match = false, pending_next = false;
    size_t pending_begin = 0;
    for (auto [b, e, m] : spans) {
      switch (behavior) {
        case Behavior::Removed:
          if (!m) kept.emplace_back(b, e);
          break;
        case Behavior::Isolated:
          kept.emplace_back(b, e);
          break;
        case Behavior::Contiguous:
          if (m && prev_match && !kept.empty()) kept.back().second = e;
          else kept.emplace_back(b, e);
          break;
        case Behavior::MergedWithPrevious:
          if (m && !kept.empty() && !prev_match) kept.back().second = e;
          else kept.emplace_back(b, e);
          break;
        case Behavior::MergedWithNext:
          if (m) {
            if (pending_next) kept.emplace_back(pending_begin, b);
            pending_next = true;
            pending_begin = b;
          } else if (pending_next) {
            kept.emplace_back(pending_begin, e);
            pending_next = false;
          } else {
            kept.emplace_back(b, e);
          }
          break;
      }
      prev_match = m;
    }
    if (pending_next) kept.emplace_back(pending_begin, s.size());
    for (size_t i = 0; i < kept.size(); ++i) {
      auto [b, e] = kept[i];
      if (e > b) out.push_back({s.substr(b, e - b), p.at_input_start && b == 0});
    }
  }
  pieces = std::move(out);
}

struct PreSequence final : PreTokenizer {
  std::vector<std::unique_ptr<PreTokenizer>> parts;
  void apply(std::vector<Piece>& pieces) const override {
    for (const auto& p : parts) p->apply(pieces);
  }
};

struct Split final : PreTokenizer {
  std::unique_ptr<text::Regex> re;
  Behavior behavior = Behavior::Isolated;
  bool invert = false;
  void apply(std::vector<Piece>& pieces) const override {
    split_pieces(pieces, behavior, invert, [&](const std::string& s) { return re->find_all(s); });
  }
};

// GPT-2's split, used when ByteLevel has use_regex.
const char* kGpt2Pattern = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

struct ByteLevelPre final : PreTokenizer {
  bool add_prefix_space = false;
  std::unique_ptr<text::Regex> re;  // set when use_regex
  void apply(std::vector<Piece>& pieces) const override {
    if (add_prefix_space)
      for (auto& p : pieces)
        if (p.text.empty() || p.text[0] != ' ') p.text = " " + p.text;
    if (re) split_pieces(pieces, Behavior::Isolated, false, [&](const std::string& s) { return re->find_all(s); });
    for (auto& p : pieces) {
      std::string mapped;
      mapped.reserve(p.text.size() * 2);
      for (unsigned char c : p.text) mapped += text::byte_to_char_utf8(c);
      p.text = std::move(mapped);
    }
  }
};

struct Metaspace final : PreTokenizer {
  std::string replacement = "\xE2\x96\x81";  // U+2581
  std::string scheme = "always";
  bool split = true;
  void apply(std::vector<Piece>& pieces) const override {
    for (auto& p : pieces) {
      std::string r;
      for (char c : p.text) {
        if (c == ' ') r += replacement;
        else r += c;
      }
      const bool starts = r.rfind(replacement, 0) == 0;
      if (!starts && (scheme == "always" || (scheme == "first" && p.at_input_start))) r = replacement + r;
      p.text = std::move(r);
    }
    if (split)
      split_pieces(pieces, Behavior::MergedWithNext, false, [&](const std::string& s) {
        std::vector<std::pair<size_t, size_t>> m;
        for (size_t pos = s.find(replacement); pos != std::string::npos; pos = s.find(replacement, pos + 1))
          m.emplace_back(pos, pos + replacement.size());
        return m;
      });
  }
};

struct Digits final : PreTokenizer {
  bool individual = false;
  void apply(std::vector<Piece>& pieces) const override {
    static const text::Regex one("\\p{N}"), run("\\p{N}+");
    const text::Regex& re = individual ? one : run;
    split_pieces(pieces, Behavior::Isolated, false, [&](const std::string& s) { return re.find_all(s); });
  }
};

struct RegexIsolate final : PreTokenizer {  // Whitespace, Punctuation, WhitespaceSplit
  std::unique_ptr<text::Regex> re;
  Behavior behavior = Behavior::Isolated;
  bool invert = false;
  void apply(std::vector<Piece>& pieces) const override {
    split_pieces(pieces, behavior, invert, [&](const std::string& s) { return re->find_all(s); });
  }
};

// ---- decoders
struct DecSequence final : Decoder {
  std::vector<std::unique_ptr<Decoder>> parts;
  std::vector<std::string> apply(std::vector<std::string> t) const override {
    for (const auto& p : parts) t = p->apply(std::move(t));
    return t;
  }
};

struct ByteLevelDec final : Decoder {
  std::vector<std::string> apply(std::vector<std::string> tokens) const override {
    std::string bytes;
    for (const auto& t : tokens)
      for (size_t i = 0; i < t.size();) {
        const size_t start = i;
        const char32_t c = text::next_codepoint(t, i);
        const int b = text::char_to_byte(c);
        if (b >= 0) bytes += static_cast<char>(b);
        else bytes.append(t, start, i - start);
      }
    return {text::utf8_lossy(bytes)};
  }
};

struct ReplaceDec final : Decoder {
  std::unique_ptr<text::Regex> re;
  std::string content;
  std::vector<std::string> apply(std::vector<std::string> tokens) const override {
    for (auto& t : tokens) t = replace_all(*re, t, content);
    return tokens;
  }
};

struct ByteFallbackDec final : Decoder {
  static int byte_of(const std::string& t) {
    if (t.size() != 6 || t.compare(0, 3, "<0x") != 0 || t[5] != '>') return -1;
    const std::string hex = t.substr(3, 2);  // must outlive `end`, which points into it
    char* end = nullptr;
    const long v = std::strtol(hex.c_str(), &end, 16);
    return *end == 0 ? static_cast<int>(v) : -1;
  }
  std::vector<std::string> apply(std::vector<std::string> tokens) const override {
    std::vector<std::string> out;
    std::string pending;
    size_t pending_count = 0;
    auto flush = [&] {
      if (pending_count == 0) return;
      // Valid UTF-8 becomes its text; otherwise each byte becomes U+FFFD, as tokenizers does.
      bool valid = text::utf8_lossy(pending) == pending;
      if (valid) out.push_back(pending);
      else
        for (size_t i = 0; i < pending_count; ++i) out.push_back("\xEF\xBF\xBD");
      pending.clear();
      pending_count = 0;
    };
    for (auto& t : tokens) {
      const int b = byte_of(t);
      if (b >= 0) {
        pending += static_cast<char>(b);
        ++pending_count;
      } else {
        flush();
        out.push_back(std::move(t));
      }
    }
    flush();
    return out;
  }
};

struct FuseDec final : Decoder {
  std::vector<std::string> apply(std::vector<std::string> tokens) const override {
    std::string s;
    for (auto& t : tokens) s += t;
    return {s};
  }
};

struct StripDec final : Decoder {
  char32_t content = ' ';
  size_t start = 0, stop = 0;
  std::vector<std::string> apply(std::vector<std::string> tokens) const override {
    for (auto& t : tokens) {
      auto cps = text::codepoints(t);
      size_t b = 0, e = cps.size();
      for (size_t i = 0; i < start && b < e && cps[b] == content; ++i) ++b;
      for (size_t i = 0; i < stop && e > b && cps[e - 1] == content; ++i) --e;
      std::string r;
      for (size_t i = b; i < e; ++i) text::append_utf8(r, cps[i]);
      t = std::move(r);
    }
    return tokens;
  }
};

struct MetaspaceDec final : Decoder {
  std::string replacement = "\xE2\x96\x81";
  bool strip_first = true;
  std::vector<std::string> apply(std::vector<std::string> tokens) const override {
    for (size_t i = 0; i < tokens.size(); ++i) {
      std::string r;
      const std::string& t = tokens[i];
      for (size_t p = 0; p < t.size();) {
        if (t.compare(p, replacement.size(), replacement) == 0) {
          r += ' ';
          p += replacement.size();
        } else {
          r += t[p++];
        }
      }
      if (i == 0 && strip_first && !r.empty() && r[0] == ' ') r.erase(0, 1);
      tokens[i] = std::move(r);
    }
    return tokens;
  }
};

// ---- post-processors
struct Template final : PostProcessor {
  struct Item {
    bool special;
    std::vector<int64_t> ids;
    std::vector<std::string> tokens;
  };
  std::vector<Item> single;
  Encoded apply(Encoded e, bool add) const override {
    if (!add) return e;
    Encoded out;
    for (const auto& it : single) {
      if (!it.special) {
        out.ids.insert(out.ids.end(), e.ids.begin(), e.ids.end());
        out.tokens.insert(out.tokens.end(), e.tokens.begin(), e.tokens.end());
      } else {
        out.ids.insert(out.ids.end(), it.ids.begin(), it.ids.end());
        out.tokens.insert(out.tokens.end(), it.tokens.begin(), it.tokens.end());
      }
    }
    return out;
  }
};

struct PostSequence final : PostProcessor {
  std::vector<std::unique_ptr<PostProcessor>> parts;
  Encoded apply(Encoded e, bool add) const override {
    for (const auto& p : parts) e = p->apply(std::move(e), add);
    return e;
  }
};

struct NoOpPost final : PostProcessor {  // ByteLevel: adjusts offsets only
  Encoded apply(Encoded e, bool) const override { return e; }
};

struct ClsSep final : PostProcessor {  // RobertaProcessing / BertProcessing
  std::string cls, sep;
  int64_t cls_id = 0, sep_id = 0;
  Encoded apply(Encoded e, bool add) const override {
    if (!add) return e;
    e.ids.insert(e.ids.begin(), cls_id);
    e.tokens.insert(e.tokens.begin(), cls);
    e.ids.push_back(sep_id);
    e.tokens.push_back(sep);
    return e;
  }
};

}  // namespace

std::unique_ptr<Normalizer> make_normalizer(const json& j, const std::string& where) {
  if (j.is_null()) return nullptr;
  const std::string t = type_of(j, where);
  const std::string w = where + " (" + t + ")";
  if (t == "Sequence") {
    auto s = std::make_unique<Sequence>();
    for (const auto& n : j.at("normalizers"))
      if (auto p = make_normalizer(n, where)) s->parts.push_back(std::move(p));
    return s;
  }
  if (t == "NFC" || t == "NFD" || t == "NFKC" || t == "NFKD") {
    auto n = std::make_unique<UnicodeForm>();
    n->form = t;
    return n;
  }
  if (t == "Lowercase") return std::make_unique<Lowercase>();
  if (t == "StripAccents") return std::make_unique<StripAccents>();
  if (t == "Replace") {
    auto n = std::make_unique<ReplaceN>();
    n->re = make_pattern(j.at("pattern"), w);
    n->content = str_field(j, "content", w);
    return n;
  }
  if (t == "Prepend") {
    auto n = std::make_unique<Prepend>();
    n->prefix = str_field(j, "prepend", w);
    return n;
  }
  if (t == "Strip") {
    auto n = std::make_unique<StripN>();
    n->left = j.value("strip_left", true);
    n->right = j.value("strip_right", true);
    return n;
  }
  MF_THROW(where, ": normalizer type '", t, "' is not supported");
}

std::unique_ptr<PreTokenizer> make_pre_tokenizer(const json& j, const std::string& where) {
  if (j.is_null()) return nullptr;
  const std::string t = type_of(j, where);
  const std::string w = where + " (" + t + ")";
  if (t == "Sequence") {
    auto s = std::make_unique<PreSequence>();
    for (const auto& n : j.at("pretokenizers"))
      if (auto p = make_pre_tokenizer(n, where)) s->parts.push_back(std::move(p));
    return s;
  }
  if (t == "Split") {
    auto s = std::make_unique<Split>();
    s->re = make_pattern(j.at("pattern"), w);
    s->behavior = parse_behavior(str_field(j, "behavior", w, "Isolated"), w);
    s->invert = j.value("invert", false);
    return s;
  }
  if (t == "ByteLevel") {
    auto b = std::make_unique<ByteLevelPre>();
    b->add_prefix_space = j.value("add_prefix_space", false);
    if (j.value("use_regex", true)) b->re = std::make_unique<text::Regex>(kGpt2Pattern);
    return b;
  }
  if (t == "Metaspace") {
    auto m = std::make_unique<Metaspace>();
    m->replacement = str_field(j, "replacement", w, m->replacement);
    m->scheme = str_field(j, "prepend_scheme", w, j.value("add_prefix_space", true) ? "always" : "never");
    m->split = j.value("split", true);
    return m;
  }
  if (t == "Digits") {
    auto d = std::make_unique<Digits>();
    d->individual = j.value("individual_digits", false);
    return d;
  }
  if (t == "Whitespace") {
    auto r = std::make_unique<RegexIsolate>();
    r->re = std::make_unique<text::Regex>("\\w+|[^\\w\\s]+");
    r->invert = true;
    r->behavior = Behavior::Removed;
    return r;
  }
  if (t == "WhitespaceSplit") {
    auto r = std::make_unique<RegexIsolate>();
    r->re = std::make_unique<text::Regex>("\\s+");
    r->behavior = Behavior::Removed;
    return r;
  }
  if (t == "Punctuation") {
    auto r = std::make_unique<RegexIsolate>();
    r->re = std::make_unique<text::Regex>("[\\p{P}!-/:-@\\[-`{-~]");
    r->behavior = parse_behavior(str_field(j, "behavior", w, "Isolated"), w);
    return r;
  }
  MF_THROW(where, ": pre_tokenizer type '", t, "' is not supported");
}

std::unique_ptr<Decoder> make_decoder(const json& j, const std::string& where) {
  if (j.is_null()) return nullptr;
  const std::string t = type_of(j, where);
  const std::string w = where + " (" + t + ")";
  if (t == "Sequence") {
    auto s = std::make_unique<DecSequence>();
    for (const auto& n : j.at("decoders"))
      if (auto p = make_decoder(n, where)) s->parts.push_back(std::move(p));
    return s;
  }
  if (t == "ByteLevel") return std::make_unique<ByteLevelDec>();
  if (t == "Replace") {
    auto r = std::make_unique<ReplaceDec>();
    r->re = make_pattern(j.at("pattern"), w);
    r->content = str_field(j, "content", w);
    return r;
  }
  if (t == "ByteFallback") return std::make_unique<ByteFallbackDec>();
  if (t == "Fuse") return std::make_unique<FuseDec>();
  if (t == "Strip") {
    auto s = std::make_unique<StripDec>();
    const auto cps = text::codepoints(str_field(j, "content", w, " "));
    MF_CHECK(cps.size() == 1, w, ": 'content' must be one character");
    s->content = cps[0];
    s->start = j.value("start", 0);
    s->stop = j.value("stop", 0);
    return s;
  }
  if (t == "Metaspace") {
    auto m = std::make_unique<MetaspaceDec>();
    m->replacement = str_field(j, "replacement", w, m->replacement);
    m->strip_first = str_field(j, "prepend_scheme", w, "always") != "never";
    return m;
  }
  MF_THROW(where, ": decoder type '", t, "' is not supported");
}

std::unique_ptr<PostProcessor> make_post_processor(const json& j, const std::string& where) {
  if (j.is_null()) return nullptr;
  const std::string t = type_of(j, where);
  const std::string w = where + " (" + t + ")";
  if (t == "Sequence") {
    auto s = std::make_unique<PostSequence>();
    for (const auto& n : j.at("processors"))
      if (auto p = make_post_processor(n, where)) s->parts.push_back(std::move(p));
    return s;
  }
  if (t == "ByteLevel") return std::make_unique<NoOpPost>();
  if (t == "TemplateProcessing") {
    auto tp = std::make_unique<Template>();
    const json& specials = j.at("special_tokens");
    for (const auto& item : j.at("single")) {
      if (item.contains("Sequence")) {
        tp->single.push_back({false, {}, {}});
        continue;
      }
      MF_CHECK(item.contains("SpecialToken"), w, ": template items must be Sequence or SpecialToken");
      const std::string id = item["SpecialToken"].at("id").get<std::string>();
      MF_CHECK(specials.contains(id), w, ": template names special token '", id, "' missing from special_tokens");
      Template::Item it{true, specials[id].at("ids").get<std::vector<int64_t>>(),
                        specials[id].at("tokens").get<std::vector<std::string>>()};
      tp->single.push_back(std::move(it));
    }
    return tp;
  }
  if (t == "RobertaProcessing" || t == "BertProcessing") {
    auto p = std::make_unique<ClsSep>();
    p->cls = j.at("cls")[0].get<std::string>();
    p->cls_id = token_id(j.at("cls")[1], where + ": post_processor " + t + ".cls");
    p->sep = j.at("sep")[0].get<std::string>();
    p->sep_id = token_id(j.at("sep")[1], where + ": post_processor " + t + ".sep");
    return p;
  }
  MF_THROW(where, ": post_processor type '", t, "' is not supported");
}

}  // namespace moeforge::hf::tok
