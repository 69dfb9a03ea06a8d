// Text helpers for the tokenizer: UTF-8 code points, Unicode normalisation (utf8proc), the GPT-2
// byte <-> printable-character map of byte-level BPE, and a PCRE2 regex with Unicode properties.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace moeforge::hf::text {

// Decodes one code point at s[i], advancing i; invalid bytes decode as U+FFFD (one byte each).
char32_t next_codepoint(std::string_view s, size_t& i);
void append_utf8(std::string& out, char32_t c);
std::vector<char32_t> codepoints(std::string_view s);
bool is_whitespace(char32_t c);    // Unicode White_Space (Rust's char::is_whitespace)
bool is_alphanumeric(char32_t c);  // letters and numbers (Rust's char::is_alphanumeric)
bool is_punctuation(char32_t c);   // Unicode P* categories or ASCII punctuation

// "NFC", "NFD", "NFKC", "NFKD"
std::string normalize_unicode(std::string_view s, std::string_view form);
std::string lowercase(std::string_view s);
std::string strip_accents(std::string_view s);  // removes combining marks (Mn)

// Byte-level BPE: every byte maps to one printable character (GPT-2's bytes_to_unicode).
const std::string& byte_to_char_utf8(uint8_t b);
// The byte a byte-level character stands for, or -1.
int char_to_byte(char32_t c);
// Replaces invalid UTF-8 sequences with U+FFFD (as String::from_utf8_lossy).
std::string utf8_lossy(std::string_view bytes);

class Regex {
 public:
  // Onig/Rust-style pattern compiled by PCRE2 with UTF and Unicode properties (\uHHHH accepted).
  explicit Regex(const std::string& pattern);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;
  // Non-overlapping matches, left to right, as byte offsets [begin, end); empty matches skipped.
  std::vector<std::pair<size_t, size_t>> find_all(std::string_view s) const;
  const std::string& pattern() const { return pattern_; }

 private:
  std::string pattern_;
  void* code_ = nullptr;  // pcre2_code*
};

}  // namespace moeforge::hf::text
