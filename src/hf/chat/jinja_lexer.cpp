// The template lexer. Whitespace handling follows jinja2's lexer exactly, because chat templates
// are written against it and a stray newline changes the token ids.
#include <cctype>
#include <cstring>

#include "core/error.h"
#include "hf/chat/jinja_ast.h"
#include "hf/tokenizer/text.h"

namespace moeforge::hf::jinja {

namespace {

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

// Python's str.rstrip() on ASCII whitespace (what `{%-` removes).
std::string rstrip_ws(const std::string& s) {
  size_t e = s.size();
  while (e > 0 && is_space(s[e - 1])) --e;
  return s.substr(0, e);
}

// Normalises \r\n and \r to \n, and drops one trailing newline (keep_trailing_newline=False).
std::string normalize_source(const std::string& src) {
  std::string out;
  out.reserve(src.size());
  for (size_t i = 0; i < src.size(); ++i) {
    if (src[i] == '\r') {
      out += '\n';
      if (i + 1 < src.size() && src[i + 1] == '\n') ++i;
    } else {
      out += src[i];
    }
  }
  if (!out.empty() && out.back() == '\n') out.pop_back();
  return out;
}

[[noreturn]] void fail(int line, const std::string& msg) { MF_THROW("chat template line ", line, ": ", msg); }

std::string unescape_string(const std::string& body, int line) {
  // Python's unicode-escape rules for the escapes templates use.
  std::string out;
  for (size_t i = 0; i < body.size(); ++i) {
    if (body[i] != '\\' || i + 1 == body.size()) {
      out += body[i];
      continue;
    }
    const char e = body[++i];
    auto hex = [&](size_t n) {
      if (i + n >= body.size()) fail(line, "truncated escape in string literal");
      uint32_t v = 0;
      for (size_t k = 0; k < n; ++k) {
        const char h = body[i + 1 + k];
        if (!std::isxdigit(static_cast<unsigned char>(h))) fail(line, "bad escape in string literal");
        v = v * 16 + static_cast<uint32_t>(std::isdigit(static_cast<unsigned char>(h)) ? h - '0' : (std::tolower(h) - 'a' + 10));
      }
      i += n;
      return v;
    };
    switch (e) {
      case 'n': out += '\n'; break;
      case 't': out += '\t'; break;
      case 'r': out += '\r'; break;
      case 'b': out += '\b'; break;
      case 'f': out += '\f'; break;
      case 'v': out += '\v'; break;
      case 'a': out += '\a'; break;
      case '0': out += '\0'; break;
      case '\\': out += '\\'; break;
      case '\'': out += '\''; break;
      case '"': out += '"'; break;
      case '\n': break;  // line continuation
      case 'x': text::append_utf8(out, hex(2)); break;
      case 'u': text::append_utf8(out, hex(4)); break;
      case 'U': text::append_utf8(out, hex(8)); break;
      default: out += '\\'; out += e;  // unknown escapes stay as written
    }
  }
  return out;
}

struct Lexer {
  std::string src;
  size_t pos = 0;
  int line = 1;
  std::vector<Token> out;

  void advance_to(size_t p) {
    for (size_t k = pos; k < p && k < src.size(); ++k)
      if (src[k] == '\n') ++line;
    pos = p;
  }
  void emit(Tok t, std::string text = "") { out.push_back({t, std::move(text), 0, 0, line}); }

  // After a block/comment end: `-` eats all whitespace, plain eats one newline (trim_blocks).
  // Returns whether what was consumed ends with a newline (jinja's `line_starting`).
  bool consume_after_end(char sign, bool trim_newline) {
    size_t p = pos;
    if (sign == '-') {
      while (p < src.size() && is_space(src[p])) ++p;
    } else if (sign != '+' && trim_newline && p < src.size() && src[p] == '\n') {
      ++p;
    }
    const bool ends_newline = p > pos && src[p - 1] == '\n';
    advance_to(p);
    return ends_newline;
  }

  // Lexes expression tokens until the tag's end; returns the strip sign of the end ('-', '+', 0).
  char lex_tag(bool is_var) {
    const char* end = is_var ? "}}" : "%}";
    std::vector<char> balance;
    while (true) {
      while (pos < src.size() && is_space(src[pos])) advance_to(pos + 1);
      if (pos >= src.size()) fail(line, is_var ? "unexpected end of template, expected '}}'" : "unexpected end of template, expected '%}'");
      if (balance.empty()) {
        if ((src[pos] == '-' || src[pos] == '+') && src.compare(pos + 1, 2, end) == 0) {
          const char sign = src[pos];
          if (is_var && sign == '+') fail(line, "unexpected '+'");
          advance_to(pos + 3);
          return sign;
        }
        if (src.compare(pos, 2, end) == 0) {
          advance_to(pos + 2);
          return 0;
        }
      }
      const char c = src[pos];
      if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
        size_t e = pos;
        while (e < src.size() && (std::isalnum(static_cast<unsigned char>(src[e])) || src[e] == '_')) ++e;
        emit(Tok::Name, src.substr(pos, e - pos));
        advance_to(e);
      } else if (std::isdigit(static_cast<unsigned char>(c))) {
        size_t e = pos;
        while (e < src.size() && (std::isdigit(static_cast<unsigned char>(src[e])) || src[e] == '_')) ++e;
        bool is_float = false;
        if (e + 1 < src.size() && src[e] == '.' && std::isdigit(static_cast<unsigned char>(src[e + 1]))) {
          is_float = true;
          ++e;
          while (e < src.size() && (std::isdigit(static_cast<unsigned char>(src[e])) || src[e] == '_')) ++e;
        }
        if (e < src.size() && (src[e] == 'e' || src[e] == 'E')) {
          size_t x = e + 1;
          if (x < src.size() && (src[x] == '+' || src[x] == '-')) ++x;
          if (x < src.size() && std::isdigit(static_cast<unsigned char>(src[x]))) {
            is_float = true;
            e = x;
            while (e < src.size() && std::isdigit(static_cast<unsigned char>(src[e]))) ++e;
          }
        }
        std::string num;
        for (size_t k = pos; k < e; ++k)
          if (src[k] != '_') num += src[k];
        Token t{is_float ? Tok::Float : Tok::Int, num, 0, 0, line};
        try {
          if (is_float) t.f = std::stod(num);
          else t.i = std::stoll(num);
        } catch (const std::exception&) {
          fail(line, "number out of range: " + num);
        }
        out.push_back(t);
        advance_to(e);
      } else if (c == '\'' || c == '"') {
        size_t e = pos + 1;
        while (e < src.size() && src[e] != c) e += src[e] == '\\' ? 2 : 1;
        if (e >= src.size()) fail(line, "unterminated string literal");
        const int start_line = line;
        std::string body = src.substr(pos + 1, e - pos - 1);
        advance_to(e + 1);
        out.push_back({Tok::String, unescape_string(body, start_line), 0, 0, start_line});
      } else {
        static const char* ops[] = {"//", "**", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "~", "<", ">",
                                    "=",  "(",  ")",  "[",  "]",  "{",  "}", ".", ",", ":", "|"};
        const char* found = nullptr;
        for (const char* op : ops)
          if (src.compare(pos, std::strlen(op), op) == 0) {
            found = op;
            break;
          }
        if (!found) fail(line, std::string("unexpected character '") + c + "'");
        const std::string op = found;
        if (op == "(" || op == "[" || op == "{") balance.push_back(op == "(" ? ')' : op == "[" ? ']' : '}');
        if (op == ")" || op == "]" || op == "}") {
          if (balance.empty() || balance.back() != op[0]) fail(line, "unexpected '" + op + "'");
          balance.pop_back();
        }
        emit(Tok::Op, op);
        advance_to(pos + op.size());
      }
    }
  }

  // `{% raw %}` ... `{% endraw %}`: the body is data.
  bool try_raw(size_t body_start, char& end_sign) {
    size_t p = body_start;
    while (p < src.size() && is_space(src[p])) ++p;
    if (src.compare(p, 3, "raw") != 0) return false;
    p += 3;
    while (p < src.size() && is_space(src[p])) ++p;
    if (p < src.size() && (src[p] == '-' || src[p] == '+')) ++p;
    if (src.compare(p, 2, "%}") != 0) return false;
    end_sign = src[p - 1] == '-' ? '-' : (src[p - 1] == '+' ? '+' : 0);
    advance_to(p + 2);
    return true;
  }

  void run() {
    bool line_starting = true;
    while (pos < src.size()) {
      size_t idx = pos;
      while (true) {
        idx = src.find('{', idx);
        if (idx == std::string::npos || idx + 1 >= src.size()) {
          idx = std::string::npos;
          break;
        }
        const char k = src[idx + 1];
        if (k == '{' || k == '%' || k == '#') break;
        ++idx;
      }
      if (idx == std::string::npos) {
        emit(Tok::Data, src.substr(pos));
        advance_to(src.size());
        break;
      }
      std::string data = src.substr(pos, idx - pos);
      const char kind = src[idx + 1];
      const char sign = (idx + 2 < src.size() && (src[idx + 2] == '-' || src[idx + 2] == '+')) ? src[idx + 2] : 0;
      if (sign == '-') {
        data = rstrip_ws(data);
      } else if (sign != '+' && kind != '{') {  // lstrip_blocks, for blocks and comments only
        const size_t nl = data.rfind('\n');
        const size_t l_pos = nl == std::string::npos ? 0 : nl + 1;
        if ((l_pos > 0 || line_starting) && l_pos < data.size()) {
          bool only_ws = true;
          for (size_t k = l_pos; k < data.size(); ++k) only_ws = only_ws && is_space(data[k]);
          if (only_ws) data.resize(l_pos);
        }
      }
      if (!data.empty()) emit(Tok::Data, data);
      advance_to(idx + 2 + (sign ? 1 : 0));
      if (kind == '#') {
        size_t e = src.find("#}", pos);
        if (e == std::string::npos) fail(line, "missing end of comment tag");
        const char end_sign = (e > pos && (src[e - 1] == '-' || src[e - 1] == '+')) ? src[e - 1] : 0;
        advance_to(e + 2);
        line_starting = consume_after_end(end_sign, true);
        continue;
      }
      if (kind == '%') {
        char raw_sign = 0;
        if (try_raw(pos, raw_sign)) {
          // Find {%[-+]? endraw [-+]?%}
          size_t search = pos;
          while (true) {
            size_t b = src.find("{%", search);
            if (b == std::string::npos) fail(line, "missing end of raw directive");
            size_t p = b + 2;
            const char inner_sign = (p < src.size() && (src[p] == '-' || src[p] == '+')) ? src[p] : 0;
            if (inner_sign) ++p;
            while (p < src.size() && is_space(src[p])) ++p;
            if (src.compare(p, 6, "endraw") != 0) {
              search = b + 2;
              continue;
            }
            p += 6;
            while (p < src.size() && is_space(src[p])) ++p;
            char close_sign = 0;
            if (p < src.size() && (src[p] == '-' || src[p] == '+')) close_sign = src[p++];
            if (src.compare(p, 2, "%}") != 0) fail(line, "malformed endraw tag");
            std::string body = src.substr(pos, b - pos);
            if (raw_sign == '-') {
              size_t s = 0;
              while (s < body.size() && is_space(body[s])) ++s;
              body = body.substr(s);
            }
            if (inner_sign == '-') body = rstrip_ws(body);
            if (!body.empty()) emit(Tok::Data, body);
            advance_to(p + 2);
            line_starting = consume_after_end(close_sign, true);
            break;
          }
          continue;
        }
        emit(Tok::BlockBegin);
        const char end_sign = lex_tag(false);
        emit(Tok::BlockEnd);
        line_starting = consume_after_end(end_sign, true);
      } else {
        emit(Tok::VarBegin);
        const char end_sign = lex_tag(true);
        emit(Tok::VarEnd);
        line_starting = consume_after_end(end_sign, false);
      }
    }
    emit(Tok::End);
  }
};

}  // namespace

std::vector<Token> lex_template(const std::string& source) {
  Lexer lx;
  lx.src = normalize_source(source);
  lx.run();
  return lx.out;
}

}  // namespace moeforge::hf::jinja
