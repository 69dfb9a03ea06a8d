#include "hf/tokenizer/text.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <array>
#include <cstdio>
#include <cstdlib>

#include "core/error.h"

namespace moeforge::hf::text {

char32_t next_codepoint(std::string_view s, size_t& i) {
  const auto* p = reinterpret_cast<const utf8proc_uint8_t*>(s.data() + i);
  utf8proc_int32_t c = 0;
  const utf8proc_ssize_t n = utf8proc_iterate(p, static_cast<utf8proc_ssize_t>(s.size() - i), &c);
  if (n <= 0) {
    ++i;
    return 0xFFFD;
  }
  i += static_cast<size_t>(n);
  return static_cast<char32_t>(c);
}

void append_utf8(std::string& out, char32_t c) {
  utf8proc_uint8_t buf[4];
  const auto n = utf8proc_encode_char(static_cast<utf8proc_int32_t>(c), buf);
  out.append(reinterpret_cast<const char*>(buf), static_cast<size_t>(n));
}

std::vector<char32_t> codepoints(std::string_view s) {
  std::vector<char32_t> v;
  for (size_t i = 0; i < s.size();) v.push_back(next_codepoint(s, i));
  return v;
}

bool is_whitespace(char32_t c) {
  switch (c) {
    case 0x09: case 0x0A: case 0x0B: case 0x0C: case 0x0D: case 0x20: case 0x85: case 0xA0: case 0x1680:
    case 0x2028: case 0x2029: case 0x202F: case 0x205F: case 0x3000:
      return true;
    default:
      return c >= 0x2000 && c <= 0x200A;
  }
}

bool is_alphanumeric(char32_t c) {
  const auto cat = utf8proc_category(static_cast<utf8proc_int32_t>(c));
  return (cat >= UTF8PROC_CATEGORY_LU && cat <= UTF8PROC_CATEGORY_LO) ||
         (cat >= UTF8PROC_CATEGORY_ND && cat <= UTF8PROC_CATEGORY_NO);
}

bool is_punctuation(char32_t c) {
  if (c < 128 && std::ispunct(static_cast<int>(c))) return true;
  const auto cat = utf8proc_category(static_cast<utf8proc_int32_t>(c));
  return cat >= UTF8PROC_CATEGORY_PC && cat <= UTF8PROC_CATEGORY_PO;
}

std::string normalize_unicode(std::string_view s, std::string_view form) {
  int opts = UTF8PROC_STABLE;
  if (form == "NFC") opts |= UTF8PROC_COMPOSE;
  else if (form == "NFD") opts |= UTF8PROC_DECOMPOSE;
  else if (form == "NFKC") opts |= UTF8PROC_COMPOSE | UTF8PROC_COMPAT;
  else if (form == "NFKD") opts |= UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT;
  else MF_THROW("unknown Unicode normalization form '", form, "'");
  const std::string valid = utf8_lossy(s);  // utf8proc refuses invalid input
  utf8proc_uint8_t* out = nullptr;
  const auto n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(valid.data()),
                              static_cast<utf8proc_ssize_t>(valid.size()), &out, static_cast<utf8proc_option_t>(opts));
  MF_CHECK(n >= 0, "Unicode normalization failed: ", utf8proc_errmsg(n));
  std::string r(reinterpret_cast<char*>(out), static_cast<size_t>(n));
  std::free(out);
  return r;
}

std::string lowercase(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size();)
    append_utf8(out, static_cast<char32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(next_codepoint(s, i)))));
  return out;
}

std::string strip_accents(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size();) {
    const char32_t c = next_codepoint(s, i);
    if (utf8proc_category(static_cast<utf8proc_int32_t>(c)) != UTF8PROC_CATEGORY_MN) append_utf8(out, c);
  }
  return out;
}

namespace {
struct ByteMap {
  std::array<std::string, 256> to_char;
  std::array<int, 512> from_char{};  // byte-level characters are all below U+0200
  ByteMap() {
    from_char.fill(-1);
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      const char32_t c = printable ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + n++);
      append_utf8(to_char[b], c);
      from_char[c] = b;
    }
  }
};
const ByteMap& byte_map() {
  static const ByteMap m;
  return m;
}
}  // namespace

const std::string& byte_to_char_utf8(uint8_t b) { return byte_map().to_char[b]; }

int char_to_byte(char32_t c) { return c < 512 ? byte_map().from_char[c] : -1; }

std::string utf8_lossy(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  for (size_t i = 0; i < bytes.size();) {
    const size_t start = i;
    const auto* p = reinterpret_cast<const utf8proc_uint8_t*>(bytes.data() + i);
    utf8proc_int32_t c = 0;
    const auto n = utf8proc_iterate(p, static_cast<utf8proc_ssize_t>(bytes.size() - i), &c);
    if (n <= 0) {
      out += "\xEF\xBF\xBD";
      ++i;
    } else {
      i += static_cast<size_t>(n);
      out.append(bytes.data() + start, static_cast<size_t>(n));
    }
  }
  return out;
}

namespace {
// Onig accepts \uHHHH; PCRE2 spells it \x{HHHH}.
std::string translate_pattern(const std::string& p) {
  std::string out;
  for (size_t i = 0; i < p.size(); ++i) {
    if (p[i] != '\\' || i + 1 >= p.size()) {
      out += p[i];
      continue;
    }
    bool hex = p[i + 1] == 'u' && i + 6 <= p.size();
    for (size_t k = 2; k < 6 && hex; ++k) hex = std::isxdigit(static_cast<unsigned char>(p[i + k])) != 0;
    if (hex) {
      out += "\\x{" + p.substr(i + 2, 4) + "}";
      i += 5;
    } else {
      out += p[i];
      out += p[i + 1];
      ++i;
    }
  }
  return out;
}
}  // namespace

Regex::Regex(const std::string& pattern) : pattern_(pattern) {
  const std::string p = translate_pattern(pattern);
  int err = 0;
  PCRE2_SIZE off = 0;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(p.data()), p.size(), PCRE2_UTF | PCRE2_UCP, &err, &off,
                                   nullptr);
  if (!code) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof msg);
    MF_THROW("invalid regex '", pattern, "' at offset ", off, ": ", reinterpret_cast<char*>(msg));
  }
  pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // falls back to the interpreter when JIT is unavailable
  code_ = code;
}

Regex::~Regex() { pcre2_code_free(static_cast<pcre2_code*>(code_)); }

std::vector<std::pair<size_t, size_t>> Regex::find_all(std::string_view s) const {
  std::vector<std::pair<size_t, size_t>> out;
  auto* code = static_cast<pcre2_code*>(code_);
  // Match data per thread (datasets are tokenized on several), freed when its thread ends.
  struct ThreadMatchData {
    pcre2_match_data* data = nullptr;
    uint32_t size = 0;
    ~ThreadMatchData() {
      if (data) pcre2_match_data_free(data);
    }
  };
  thread_local ThreadMatchData mine;
  uint32_t need = 0;
  pcre2_pattern_info(code, PCRE2_INFO_CAPTURECOUNT, &need);
  if (!mine.data || mine.size < need + 1) {
    if (mine.data) pcre2_match_data_free(mine.data);
    mine.data = pcre2_match_data_create(need + 1, nullptr);
    mine.size = need + 1;
  }
  pcre2_match_data* md = mine.data;
  size_t pos = 0;
  while (pos <= s.size()) {
    const int rc = pcre2_match(code, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), pos, PCRE2_NO_UTF_CHECK, md, nullptr);
    if (rc < 0) break;
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    size_t b = ov[0], e = ov[1];
    if (e == b) {  // empty match: step over one character
      size_t next = b;
      if (next >= s.size()) break;
      next_codepoint(s, next);
      pos = next;
      continue;
    }
    out.emplace_back(b, e);
    pos = e;
  }
  return out;
}

}  // namespace moeforge::hf::text
