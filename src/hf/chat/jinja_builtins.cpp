// Filters, tests, Python methods and globals, each with the behaviour of jinja2 3.1 and CPython
// that chat templates rely on (strings index by code point, split() on whitespace runs, ...).
#include "hf/chat/jinja_builtins.h"

#include <algorithm>
#include <cmath>
#include <ctime>
#include <utf8proc.h>

#include "core/error.h"
#include "hf/tokenizer/text.h"

namespace moeforge::hf::jinja {

long long jinja_now_for_strftime();  // jinja_render.cpp: fixed clock for tests, or -1

namespace {

using text::codepoints;

std::string from_cps(const std::vector<char32_t>& cps, size_t b, size_t e) {
  std::string out;
  for (size_t k = b; k < e; ++k) text::append_utf8(out, cps[k]);
  return out;
}

bool py_space(char32_t c) { return text::is_whitespace(c) || (c >= 0x1c && c <= 0x1f); }

std::string py_strip(const std::string& s, const Value* chars, bool left, bool right) {
  auto cps = codepoints(s);
  std::vector<char32_t> set;
  const bool custom = chars && chars->is_string();
  if (custom) set = codepoints(chars->s);
  auto strip_it = [&](char32_t c) { return custom ? std::find(set.begin(), set.end(), c) != set.end() : py_space(c); };
  size_t b = 0, e = cps.size();
  if (left)
    while (b < e && strip_it(cps[b])) ++b;
  if (right)
    while (e > b && strip_it(cps[e - 1])) --e;
  return from_cps(cps, b, e);
}

std::string map_case(const std::string& s, bool upper) {
  if (!upper) return text::lowercase(s);
  std::string out;
  for (char32_t c : codepoints(s)) text::append_utf8(out, static_cast<char32_t>(utf8proc_toupper(static_cast<utf8proc_int32_t>(c))));
  return out;
}

std::string py_title(const std::string& s) {
  std::string out;
  bool prev_cased = false;
  for (char32_t c : codepoints(s)) {
    const bool alpha = text::is_alphanumeric(c) && !(c >= '0' && c <= '9');
    const auto cc = static_cast<utf8proc_int32_t>(c);
    text::append_utf8(out, static_cast<char32_t>(alpha ? (prev_cased ? utf8proc_tolower(cc) : utf8proc_toupper(cc)) : cc));
    prev_cased = alpha;
  }
  return out;
}

std::string py_capitalize(const std::string& s) {
  auto cps = codepoints(s);
  std::string out;
  for (size_t k = 0; k < cps.size(); ++k) {
    const auto cc = static_cast<utf8proc_int32_t>(cps[k]);
    text::append_utf8(out, static_cast<char32_t>(k == 0 ? utf8proc_toupper(cc) : utf8proc_tolower(cc)));
  }
  return out;
}

List py_split(const std::string& s, const Value* sep, int64_t maxsplit) {
  List out;
  if (!sep || sep->is_none()) {  // runs of whitespace, no empty strings
    auto cps = codepoints(s);
    size_t k = 0;
    int64_t splits = 0;
    while (k < cps.size()) {
      while (k < cps.size() && py_space(cps[k])) ++k;
      if (k >= cps.size()) break;
      if (maxsplit >= 0 && splits == maxsplit) {
        size_t e = cps.size();
        while (e > k && py_space(cps[e - 1])) --e;
        out.push_back(Value::string(from_cps(cps, k, e)));
        return out;
      }
      size_t b = k;
      while (k < cps.size() && !py_space(cps[k])) ++k;
      out.push_back(Value::string(from_cps(cps, b, k)));
      ++splits;
    }
    return out;
  }
  MF_CHECK(sep->is_string(), "split(): separator must be a string");
  MF_CHECK(!sep->s.empty(), "empty separator");
  size_t pos = 0;
  int64_t splits = 0;
  while (maxsplit < 0 || splits < maxsplit) {
    size_t f = s.find(sep->s, pos);
    if (f == std::string::npos) break;
    out.push_back(Value::string(s.substr(pos, f - pos)));
    pos = f + sep->s.size();
    ++splits;
  }
  out.push_back(Value::string(s.substr(pos)));
  return out;
}

List py_rsplit(const std::string& s, const Value* sep, int64_t maxsplit) {
  if (maxsplit < 0) return py_split(s, sep, -1);  // without a limit both directions agree
  if (!sep || sep->is_none()) {  // whitespace runs, taken from the end
    auto cps = codepoints(s);
    List rev;
    size_t k = cps.size();
    for (int64_t splits = 0;; ++splits) {
      while (k > 0 && py_space(cps[k - 1])) --k;
      if (k == 0) break;
      if (splits == maxsplit) {  // CPython keeps the remainder's leading whitespace
        rev.push_back(Value::string(from_cps(cps, 0, k)));
        break;
      }
      const size_t e = k;
      while (k > 0 && !py_space(cps[k - 1])) --k;
      rev.push_back(Value::string(from_cps(cps, k, e)));
    }
    std::reverse(rev.begin(), rev.end());
    return rev;
  }
  MF_CHECK(sep->is_string() && !sep->s.empty(), "rsplit(): separator must be a non-empty string");
  List rev;
  size_t end = s.size();
  int64_t splits = 0;
  while (splits < maxsplit) {
    if (end < sep->s.size()) break;
    size_t f = s.rfind(sep->s, end - sep->s.size());
    if (f == std::string::npos) break;
    rev.push_back(Value::string(s.substr(f + sep->s.size(), end - f - sep->s.size())));
    end = f;
    ++splits;
  }
  rev.push_back(Value::string(s.substr(0, end)));
  std::reverse(rev.begin(), rev.end());
  return rev;
}

const Value* arg(Args& args, Kwargs& kwargs, size_t pos, const char* name) {
  for (auto& [k, v] : kwargs)
    if (k == name) return &v;
  return pos < args.size() ? &args[pos] : nullptr;
}

int64_t int_arg(Args& args, Kwargs& kwargs, size_t pos, const char* name, int64_t def) {
  const Value* v = arg(args, kwargs, pos, name);
  if (!v || v->is_none()) return def;
  MF_CHECK(v->kind == Kind::Int || v->kind == Kind::Bool, name, " must be an integer");
  return v->kind == Kind::Bool ? v->b : v->i;
}

std::string str_arg(Args& args, Kwargs& kwargs, size_t pos, const char* name, const std::string& def) {
  const Value* v = arg(args, kwargs, pos, name);
  if (!v || v->is_none()) return def;
  MF_CHECK(v->is_string(), name, " must be a string");
  return v->s;
}

std::string replace_all(const std::string& s, const std::string& from, const std::string& to, int64_t count) {
  if (from.empty()) {  // Python inserts `to` between every character
    auto cps = codepoints(s);
    std::string out;
    int64_t n = 0;
    for (size_t k = 0; k <= cps.size(); ++k) {
      if (count < 0 || n < count) {
        out += to;
        ++n;
      }
      if (k < cps.size()) text::append_utf8(out, cps[k]);
    }
    return out;
  }
  std::string out;
  size_t pos = 0;
  int64_t n = 0;
  while (count < 0 || n < count) {
    size_t f = s.find(from, pos);
    if (f == std::string::npos) break;
    out.append(s, pos, f - pos);
    out += to;
    pos = f + from.size();
    ++n;
  }
  out.append(s, pos, std::string::npos);
  return out;
}

Value method(std::function<Value(Args&, Kwargs&)> f) { return Value::function(std::move(f)); }

Value string_method(const std::string& s, const std::string& name) {
  if (name == "startswith" || name == "endswith") {
    const bool start = name == "startswith";
    return method([s, start](Args& a, Kwargs& k) {
      const Value* p = arg(a, k, 0, "prefix");
      MF_CHECK(p, start ? "startswith" : "endswith", "() takes at least 1 argument");
      auto check = [&](const Value& x) {
        MF_CHECK(x.is_string(), "startswith/endswith argument must be str or a tuple of str");
        if (x.s.size() > s.size()) return false;
        return start ? s.compare(0, x.s.size(), x.s) == 0 : s.compare(s.size() - x.s.size(), x.s.size(), x.s) == 0;
      };
      if (p->is_list()) {
        for (const auto& x : *p->list)
          if (check(x)) return Value::boolean(true);
        return Value::boolean(false);
      }
      return Value::boolean(check(*p));
    });
  }
  if (name == "split" || name == "rsplit") {
    const bool r = name == "rsplit";
    return method([s, r](Args& a, Kwargs& k) {
      const Value* sep = arg(a, k, 0, "sep");
      const int64_t maxsplit = int_arg(a, k, 1, "maxsplit", -1);
      return Value::make_list(r ? py_rsplit(s, sep, maxsplit) : py_split(s, sep, maxsplit));
    });
  }
  if (name == "strip" || name == "lstrip" || name == "rstrip") {
    const bool l = name != "rstrip", r = name != "lstrip";
    return method([s, l, r](Args& a, Kwargs& k) { return Value::string(py_strip(s, arg(a, k, 0, "chars"), l, r)); });
  }
  if (name == "lower") return method([s](Args&, Kwargs&) { return Value::string(map_case(s, false)); });
  if (name == "upper") return method([s](Args&, Kwargs&) { return Value::string(map_case(s, true)); });
  if (name == "title") return method([s](Args&, Kwargs&) { return Value::string(py_title(s)); });
  if (name == "capitalize") return method([s](Args&, Kwargs&) { return Value::string(py_capitalize(s)); });
  if (name == "replace")
    return method([s](Args& a, Kwargs& k) {
      const Value* from = arg(a, k, 0, "old");
      const Value* to = arg(a, k, 1, "new");
      MF_CHECK(from && to && from->is_string() && to->is_string(), "replace() takes two strings");
      return Value::string(replace_all(s, from->s, to->s, int_arg(a, k, 2, "count", -1)));
    });
  if (name == "find" || name == "rfind" || name == "index" || name == "rindex" || name == "count")
    return method([s, name](Args& a, Kwargs& k) {
      const Value* sub = arg(a, k, 0, "sub");
      MF_CHECK(sub && sub->is_string(), name, "() takes a string");
      if (name == "count") {
        if (sub->s.empty()) return Value::integer(static_cast<int64_t>(codepoints(s).size()) + 1);
        int64_t n = 0;
        for (size_t p = s.find(sub->s); p != std::string::npos; p = s.find(sub->s, p + sub->s.size())) ++n;
        return Value::integer(n);
      }
      const size_t f = (name == "find" || name == "index") ? s.find(sub->s) : s.rfind(sub->s);
      if (f == std::string::npos) {
        MF_CHECK(name[0] != 'i' && name[1] != 'i', "substring not found");
        return Value::integer(-1);
      }
      return Value::integer(static_cast<int64_t>(codepoints(s.substr(0, f)).size()));
    });
  if (name == "join")
    return method([s](Args& a, Kwargs&) {
      MF_CHECK(a.size() == 1, "join() takes one argument");
      std::string out;
      List items = iterate(a[0]);
      for (size_t k = 0; k < items.size(); ++k) {
        MF_CHECK(items[k].is_string(), "sequence item ", k, ": expected str instance, ", type_name(items[k]), " found");
        out += (k ? s : "") + items[k].s;
      }
      return Value::string(out);
    });
  if (name == "splitlines")
    return method([s](Args&, Kwargs&) {
      List out;
      size_t b = 0;
      for (size_t k = 0; k < s.size(); ++k)
        if (s[k] == '\n' || s[k] == '\r') {
          out.push_back(Value::string(s.substr(b, k - b)));
          if (s[k] == '\r' && k + 1 < s.size() && s[k + 1] == '\n') ++k;
          b = k + 1;
        }
      if (b < s.size()) out.push_back(Value::string(s.substr(b)));
      return Value::make_list(std::move(out));
    });
  if (name == "isdigit" || name == "isalpha" || name == "isalnum" || name == "isspace" || name == "islower" ||
      name == "isupper")
    return method([s, name](Args&, Kwargs&) {
      auto cps = codepoints(s);
      if (cps.empty()) return Value::boolean(false);
      bool all = true, any_cased = false;
      for (char32_t c : cps) {
        const auto cc = static_cast<utf8proc_int32_t>(c);
        const bool lower = utf8proc_toupper(cc) != cc, upper = utf8proc_tolower(cc) != cc;
        if (name == "isdigit") all = all && c >= '0' && c <= '9';
        else if (name == "isalpha") all = all && text::is_alphanumeric(c) && !(c >= '0' && c <= '9');
        else if (name == "isalnum") all = all && text::is_alphanumeric(c);
        else if (name == "isspace") all = all && py_space(c);
        else if (name == "islower") { all = all && !upper; any_cased = any_cased || lower; }
        else { all = all && !lower; any_cased = any_cased || upper; }
      }
      if (name == "islower" || name == "isupper") return Value::boolean(all && any_cased);
      return Value::boolean(all);
    });
  return Value::undefined(name);
}

Value dict_method(const Value& d, const std::string& name) {
  if (name == "items")
    return method([d](Args&, Kwargs&) {
      List out;
      for (const auto& [k, v] : *d.dict) out.push_back(Value::make_tuple({k, v}));
      return Value::make_list(std::move(out));
    });
  if (name == "keys")
    return method([d](Args&, Kwargs&) {
      List out;
      for (const auto& kv : *d.dict) out.push_back(kv.first);
      return Value::make_list(std::move(out));
    });
  if (name == "values")
    return method([d](Args&, Kwargs&) {
      List out;
      for (const auto& kv : *d.dict) out.push_back(kv.second);
      return Value::make_list(std::move(out));
    });
  if (name == "get")
    return method([d](Args& a, Kwargs& k) {
      MF_CHECK(!a.empty(), "get() takes at least 1 argument");
      const Value* v = d.find(a[0]);
      if (v) return *v;
      const Value* def = arg(a, k, 1, "default");
      return def ? *def : Value::none();
    });
  if (name == "copy") return method([d](Args&, Kwargs&) { return Value::make_dict(*d.dict); });
  return Value::undefined(name);
}

Value list_method(const Value& l, const std::string& name) {
  if (name == "index" || name == "count")
    return method([l, name](Args& a, Kwargs&) {
      MF_CHECK(a.size() == 1, name, "() takes one argument");
      int64_t n = 0;
      for (size_t k = 0; k < l.list->size(); ++k)
        if (equals((*l.list)[k], a[0])) {
          if (name == "index") return Value::integer(static_cast<int64_t>(k));
          ++n;
        }
      MF_CHECK(name == "count", "value is not in list");
      return Value::integer(n);
    });
  if (name == "append" || name == "pop" || name == "insert" || name == "extend" || name == "remove" ||
      name == "clear" || name == "sort" || name == "reverse")
    return method([name](Args&, Kwargs&) -> Value {
      MF_THROW("access to attribute '", name, "' of 'list' object is unsafe (chat templates are immutable)");
    });
  return Value::undefined(name);
}

// `attribute` arguments of filters may be dotted ("function.name") or integer indexes.
Value get_path(const Value& v, const std::string& path) {
  Value cur = v;
  size_t b = 0;
  while (b <= path.size()) {
    size_t e = path.find('.', b);
    if (e == std::string::npos) e = path.size();
    const std::string part = path.substr(b, e - b);
    bool numeric = !part.empty() && std::all_of(part.begin(), part.end(), [](char c) { return c >= '0' && c <= '9'; });
    cur = numeric ? get_item(cur, Value::integer(std::stoll(part))) : get_item(cur, Value::string(part));
    b = e + 1;
  }
  return cur;
}

std::string html_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&#34;"; break;
      case '\'': out += "&#39;"; break;
      default: out += c;
    }
  }
  return out;
}

std::string ascii_json_escape(const std::string& s) {
  std::string out;
  size_t i = 0;
  while (i < s.size()) {
    const size_t start = i;
    char32_t c = text::next_codepoint(s, i);
    if (c < 0x80) {
      out.append(s, start, i - start);
      continue;
    }
    auto put = [&](unsigned u) {
      char b[16];
      std::snprintf(b, sizeof b, "\\u%04x", u);
      out += b;
    };
    if (c >= 0x10000) {
      c -= 0x10000;
      put(0xD800 + (c >> 10));
      put(0xDC00 + (c & 0x3FF));
    } else {
      put(c);
    }
  }
  return out;
}

}  // namespace

List iterate(const Value& v) {
  switch (v.kind) {
    case Kind::Undefined: return {};
    case Kind::List: return *v.list;
    case Kind::Dict: {
      List keys;
      for (const auto& kv : *v.dict) keys.push_back(kv.first);
      return keys;
    }
    case Kind::String: {
      List out;
      for (char32_t c : codepoints(v.s)) {
        std::string s;
        text::append_utf8(s, c);
        out.push_back(Value::string(s));
      }
      return out;
    }
    default: MF_THROW("'", type_name(v), "' object is not iterable");
  }
}

Value length_of(const Value& v) {
  switch (v.kind) {
    case Kind::Undefined: return Value::integer(0);
    case Kind::String: return Value::integer(static_cast<int64_t>(codepoints(v.s).size()));
    case Kind::List: return Value::integer(static_cast<int64_t>(v.list->size()));
    case Kind::Dict:
    case Kind::Namespace: return Value::integer(static_cast<int64_t>(v.dict->size()));
    default: MF_THROW("object of type '", type_name(v), "' has no len()");
  }
}

bool contains(const Value& c, const Value& item) {
  if (c.is_string()) {
    MF_CHECK(item.is_string(), "'in <string>' requires string as left operand, not ", type_name(item));
    return c.s.find(item.s) != std::string::npos;
  }
  if (c.is_list()) {
    for (const auto& x : *c.list)
      if (equals(x, item)) return true;
    return false;
  }
  if (c.is_mapping()) return c.find(item) != nullptr;
  MF_THROW("argument of type '", type_name(c), "' is not iterable");
}

Value get_attr(const Value& obj, const std::string& name) {
  switch (obj.kind) {
    case Kind::Dict: {
      Value m = dict_method(obj, name);
      if (!m.is_undefined()) return m;
      const Value* v = obj.find(name);
      return v ? *v : Value::undefined(name);
    }
    case Kind::Namespace: {
      const Value* v = obj.find(name);
      return v ? *v : Value::undefined(name);
    }
    case Kind::String: return string_method(obj.s, name);
    case Kind::List: return list_method(obj, name);
    default: return Value::undefined(name);
  }
}

Value get_item(const Value& obj, const Value& key) {
  if (obj.is_mapping()) {
    const Value* v = obj.find(key);
    if (v) return *v;
    return key.is_string() ? get_attr(obj, key.s) : Value::undefined();
  }
  if ((obj.is_list() || obj.is_string()) && (key.kind == Kind::Int || key.kind == Kind::Bool)) {
    int64_t i = key.kind == Kind::Bool ? key.b : key.i;
    if (obj.is_list()) {
      const auto n = static_cast<int64_t>(obj.list->size());
      if (i < 0) i += n;
      return (i >= 0 && i < n) ? (*obj.list)[static_cast<size_t>(i)] : Value::undefined();
    }
    auto cps = codepoints(obj.s);
    const auto n = static_cast<int64_t>(cps.size());
    if (i < 0) i += n;
    if (i < 0 || i >= n) return Value::undefined();
    return Value::string(from_cps(cps, static_cast<size_t>(i), static_cast<size_t>(i) + 1));
  }
  if (key.is_string()) return get_attr(obj, key.s);
  if (obj.is_undefined()) MF_THROW("'", obj.s, "' is undefined");
  return Value::undefined();
}

Value slice(const Value& obj, const Value& start, const Value& stop, const Value& step) {
  auto opt = [](const Value& v, int64_t def) -> int64_t {
    if (v.is_none() || v.is_undefined()) return def;
    MF_CHECK(v.kind == Kind::Int || v.kind == Kind::Bool, "slice indices must be integers or None");
    return v.kind == Kind::Bool ? v.b : v.i;
  };
  const int64_t st = opt(step, 1);
  MF_CHECK(st != 0, "slice step cannot be zero");
  std::vector<char32_t> cps;
  int64_t n;
  if (obj.is_string()) {
    cps = codepoints(obj.s);
    n = static_cast<int64_t>(cps.size());
  } else if (obj.is_list()) {
    n = static_cast<int64_t>(obj.list->size());
  } else {
    MF_THROW("'", type_name(obj), "' object is not subscriptable");
  }
  // CPython's PySlice_AdjustIndices.
  auto adjust = [&](int64_t v, bool is_start) {
    if (v < 0) {
      v += n;
      if (v < 0) v = st < 0 ? -1 : 0;
    } else if (v >= n) {
      v = st < 0 ? n - 1 : n;
    }
    (void)is_start;
    return v;
  };
  int64_t b = start.is_none() || start.is_undefined() ? (st < 0 ? n - 1 : 0) : adjust(opt(start, 0), true);
  int64_t e = stop.is_none() || stop.is_undefined() ? (st < 0 ? -1 : n) : adjust(opt(stop, 0), false);
  std::vector<int64_t> idx;
  if (st > 0)
    for (int64_t k = b; k < e; k += st) idx.push_back(k);
  else
    for (int64_t k = b; k > e; k += st) idx.push_back(k);
  if (obj.is_string()) {
    std::string out;
    for (int64_t k : idx) text::append_utf8(out, cps[static_cast<size_t>(k)]);
    return Value::string(out);
  }
  List out;
  for (int64_t k : idx) out.push_back((*obj.list)[static_cast<size_t>(k)]);
  return Value::make_list(std::move(out));
}

bool has_test(const std::string& n) {
  static const char* names[] = {"defined", "undefined", "none",     "string", "number",  "integer",    "float",
                                "mapping", "sequence",  "iterable", "boolean", "true",   "false",      "callable",
                                "odd",     "even",      "divisibleby", "eq",   "equalto", "==",        "ne",
                                "!=",      "lt",        "<",        "le",     "<=",      "gt",         ">",
                                "ge",      ">=",        "in",       "sameas", "lower",   "upper",      "escaped",
                                "filter",  "test"};
  for (const char* x : names)
    if (n == x) return true;
  return false;
}

bool apply_test(const std::string& n, const Value& v, Args& args) {
  auto need = [&](size_t k) { MF_CHECK(args.size() >= k, "needs ", k, " argument(s)"); };
  if (n == "defined") return !v.is_undefined();
  if (n == "undefined") return v.is_undefined();
  if (n == "none") return v.is_none();
  if (n == "string") return v.is_string();
  if (n == "number") return v.is_number();
  if (n == "integer") return v.kind == Kind::Int;
  if (n == "float") return v.kind == Kind::Float;
  if (n == "mapping") return v.kind == Kind::Dict;
  if (n == "sequence") return v.is_list() || v.is_string() || v.kind == Kind::Dict;
  if (n == "iterable") return v.is_list() || v.is_string() || v.is_mapping() || v.is_undefined();
  if (n == "boolean") return v.kind == Kind::Bool;
  if (n == "true") return v.kind == Kind::Bool && v.b;
  if (n == "false") return v.kind == Kind::Bool && !v.b;
  if (n == "callable") return v.kind == Kind::Function;
  if (n == "escaped") return false;
  if (n == "odd" || n == "even") {
    MF_CHECK(v.kind == Kind::Int || v.kind == Kind::Bool, "expects an integer");
    const int64_t x = v.kind == Kind::Bool ? v.b : v.i;
    return n == "odd" ? (x % 2 != 0) : (x % 2 == 0);
  }
  if (n == "divisibleby") {
    need(1);
    const double d = as_double(args[0]);
    MF_CHECK(d != 0, "division by zero");
    return std::fmod(as_double(v), d) == 0;
  }
  if (n == "eq" || n == "equalto" || n == "==") { need(1); return equals(v, args[0]); }
  if (n == "ne" || n == "!=") { need(1); return !equals(v, args[0]); }
  if (n == "lt" || n == "<") { need(1); return compare(v, args[0]) < 0; }
  if (n == "le" || n == "<=") { need(1); return compare(v, args[0]) <= 0; }
  if (n == "gt" || n == ">") { need(1); return compare(v, args[0]) > 0; }
  if (n == "ge" || n == ">=") { need(1); return compare(v, args[0]) >= 0; }
  if (n == "in") { need(1); return contains(args[0], v); }
  if (n == "sameas") {
    need(1);
    const Value& o = args[0];
    if (v.kind != o.kind) return false;
    if (v.is_list()) return v.list == o.list;
    if (v.is_mapping()) return v.dict == o.dict;
    if (v.kind == Kind::Function) return v.fn == o.fn;
    return equals(v, o);  // None, booleans, small ints and interned strings are identical in CPython
  }
  if (n == "lower") return v.is_string() && text::lowercase(v.s) == v.s;
  if (n == "upper") return v.is_string() && map_case(v.s, true) == v.s;
  if (n == "filter" || n == "test") {
    need(0);
    return v.is_string() && (n == "test" ? has_test(v.s) : true);
  }
  MF_THROW("no test named '", n, "'");
}

Value apply_filter(const std::string& n, const Value& v, Args& args, Kwargs& kwargs) {
  auto require_string = [&]() {
    MF_CHECK(!v.is_undefined(), "'", v.s, "' is undefined");
    return v.is_string() ? v.s : to_str(v);
  };
  if (n == "length" || n == "count") return length_of(v);
  if (n == "tojson") {
    const Value* ensure_ascii = arg(args, kwargs, 0, "ensure_ascii");
    const int64_t indent = int_arg(args, kwargs, 1, "indent", -1);
    const Value* seps = arg(args, kwargs, 2, "separators");
    const Value* sort_keys = arg(args, kwargs, 3, "sort_keys");
    std::string isep, ksep;
    const std::string *ip = nullptr, *kp = nullptr;
    if (seps && !seps->is_none()) {
      MF_CHECK(seps->is_list() && seps->list->size() == 2 && (*seps->list)[0].is_string() && (*seps->list)[1].is_string(),
               "separators must be a pair of strings");
      isep = (*seps->list)[0].s;
      ksep = (*seps->list)[1].s;
      ip = &isep;
      kp = &ksep;
    }
    std::string out = to_json(v, static_cast<int>(indent), ip, kp, sort_keys && truthy(*sort_keys));
    if (ensure_ascii && truthy(*ensure_ascii)) out = ascii_json_escape(out);
    return Value::string(out);
  }
  if (n == "trim") return Value::string(py_strip(require_string(), arg(args, kwargs, 0, "chars"), true, true));
  if (n == "upper") return Value::string(map_case(require_string(), true));
  if (n == "lower") return Value::string(map_case(require_string(), false));
  if (n == "title") return Value::string(py_title(require_string()));
  if (n == "capitalize") return Value::string(py_capitalize(require_string()));
  if (n == "string") return Value::string(to_str(v));
  if (n == "safe") return v;
  if (n == "e" || n == "escape") return Value::string(html_escape(to_str(v)));
  if (n == "replace") {
    const std::string from = str_arg(args, kwargs, 0, "old", ""), to = str_arg(args, kwargs, 1, "new", "");
    return Value::string(replace_all(require_string(), from, to, int_arg(args, kwargs, 2, "count", -1)));
  }
  if (n == "default" || n == "d") {
    const Value* def = arg(args, kwargs, 0, "default_value");
    const Value* boolean = arg(args, kwargs, 1, "boolean");
    const bool use_default = v.is_undefined() || (boolean && truthy(*boolean) && !truthy(v));
    return use_default ? (def ? *def : Value::string("")) : v;
  }
  if (n == "join") {
    const std::string sep = str_arg(args, kwargs, 0, "d", "");
    const Value* attribute = arg(args, kwargs, 1, "attribute");
    std::string out;
    List items = iterate(v);
    for (size_t k = 0; k < items.size(); ++k) {
      const Value item = attribute ? get_path(items[k], to_str(*attribute)) : items[k];
      out += (k ? sep : "") + to_str(item);
    }
    return Value::string(out);
  }
  if (n == "first" || n == "last") {
    List items = iterate(v);
    if (items.empty()) return Value::undefined("first of empty sequence");
    return n == "first" ? items.front() : items.back();
  }
  if (n == "list") return Value::make_list(iterate(v));
  if (n == "reverse") {
    if (v.is_string()) {
      auto cps = codepoints(v.s);
      std::reverse(cps.begin(), cps.end());
      return Value::string(from_cps(cps, 0, cps.size()));
    }
    List items = iterate(v);
    std::reverse(items.begin(), items.end());
    return Value::make_list(std::move(items));
  }
  if (n == "int") {
    const int64_t def = int_arg(args, kwargs, 0, "default", 0);
    if (v.kind == Kind::Int) return v;
    if (v.kind == Kind::Bool) return Value::integer(v.b);
    if (v.kind == Kind::Float) return Value::integer(static_cast<int64_t>(v.f));
    if (v.is_string()) {
      try {
        size_t used = 0;
        const std::string t = py_strip(v.s, nullptr, true, true);
        const int64_t x = std::stoll(t, &used);
        if (used == t.size()) return Value::integer(x);
        return Value::integer(static_cast<int64_t>(std::stod(t)));
      } catch (const std::exception&) {
      }
    }
    return Value::integer(def);
  }
  if (n == "float") {
    if (v.is_number()) return Value::number(as_double(v));
    if (v.is_string()) {
      try {
        return Value::number(std::stod(v.s));
      } catch (const std::exception&) {
      }
    }
    const Value* def = arg(args, kwargs, 0, "default");
    return def ? *def : Value::number(0.0);
  }
  if (n == "abs") {
    if (v.kind == Kind::Float) return Value::number(std::fabs(v.f));
    MF_CHECK(v.is_number(), "bad operand type for abs()");
    return Value::integer(std::llabs(v.kind == Kind::Bool ? v.b : v.i));
  }
  if (n == "round") {
    const int64_t prec = int_arg(args, kwargs, 0, "precision", 0);
    const std::string how = str_arg(args, kwargs, 1, "method", "common");
    const double scale = std::pow(10.0, static_cast<double>(prec)), x = as_double(v) * scale;
    const double r = how == "floor" ? std::floor(x) : how == "ceil" ? std::ceil(x) : std::round(x);
    return Value::number(r / scale);
  }
  if (n == "items") {
    if (v.is_undefined()) return Value::make_list();
    MF_CHECK(v.is_mapping(), "items filter expects a mapping, got ", type_name(v));
    List out;
    for (const auto& [k, x] : *v.dict) out.push_back(Value::make_tuple({k, x}));
    return Value::make_list(std::move(out));
  }
  if (n == "dictsort") {
    MF_CHECK(v.is_mapping(), "dictsort expects a mapping");
    List out;
    for (const auto& [k, x] : *v.dict) out.push_back(Value::make_tuple({k, x}));
    std::stable_sort(out.begin(), out.end(), [](const Value& a, const Value& b) {
      const Value &ka = (*a.list)[0], &kb = (*b.list)[0];
      if (ka.is_string() && kb.is_string()) return text::lowercase(ka.s) < text::lowercase(kb.s);
      return compare(ka, kb) < 0;
    });
    return Value::make_list(std::move(out));
  }
  if (n == "unique") {
    List out;
    for (const auto& x : iterate(v))
      if (std::none_of(out.begin(), out.end(), [&](const Value& y) { return equals(x, y); })) out.push_back(x);
    return Value::make_list(std::move(out));
  }
  if (n == "sort") {
    const Value* rev = arg(args, kwargs, 0, "reverse");
    const Value* attribute = arg(args, kwargs, 2, "attribute");
    List items = iterate(v);
    auto key = [&](const Value& x) {
      Value k = attribute ? get_path(x, to_str(*attribute)) : x;
      if (k.is_string()) k = Value::string(text::lowercase(k.s));
      return k;
    };
    std::stable_sort(items.begin(), items.end(), [&](const Value& a, const Value& b) { return compare(key(a), key(b)) < 0; });
    if (rev && truthy(*rev)) std::reverse(items.begin(), items.end());
    return Value::make_list(std::move(items));
  }
  if (n == "min" || n == "max" || n == "sum") {
    List items = iterate(v);
    if (n == "sum") {
      Value total = Value::integer(0);
      for (const auto& x : items) total = total.kind == Kind::Int && x.kind == Kind::Int ? Value::integer(total.i + x.i) : Value::number(as_double(total) + as_double(x));
      return total;
    }
    if (items.empty()) return Value::undefined("empty sequence");
    Value best = items[0];
    for (const auto& x : items)
      if ((n == "min" && compare(x, best) < 0) || (n == "max" && compare(x, best) > 0)) best = x;
    return best;
  }
  if (n == "map") {
    const Value* attribute = nullptr;
    for (auto& [k, x] : kwargs)
      if (k == "attribute") attribute = &x;
    List out;
    for (const auto& x : iterate(v)) {
      if (attribute) {
        Value r = get_path(x, to_str(*attribute));
        if (r.is_undefined())
          for (auto& [k, d] : kwargs)
            if (k == "default") r = d;
        out.push_back(r);
      } else {
        MF_CHECK(!args.empty() && args[0].is_string(), "map needs a filter name or attribute=");
        Args rest(args.begin() + 1, args.end());
        Kwargs none;
        out.push_back(apply_filter(args[0].s, x, rest, none));
      }
    }
    return Value::make_list(std::move(out));
  }
  if (n == "select" || n == "reject" || n == "selectattr" || n == "rejectattr") {
    const bool by_attr = n == "selectattr" || n == "rejectattr";
    const bool keep_true = n == "select" || n == "selectattr";
    size_t k0 = 0;
    std::string attribute;
    if (by_attr) {
      MF_CHECK(!args.empty(), n, " needs an attribute name");
      attribute = to_str(args[0]);
      k0 = 1;
    }
    List out;
    for (const auto& x : iterate(v)) {
      const Value subject = by_attr ? get_path(x, attribute) : x;
      bool r;
      if (args.size() > k0) {
        MF_CHECK(args[k0].is_string(), n, ": test name must be a string");
        Args targs(args.begin() + static_cast<long>(k0) + 1, args.end());
        r = apply_test(args[k0].s, subject, targs);
      } else {
        r = truthy(subject);
      }
      if (r == keep_true) out.push_back(x);
    }
    return Value::make_list(std::move(out));
  }
  if (n == "attr") {
    MF_CHECK(!args.empty(), "attr needs a name");
    return get_attr(v, to_str(args[0]));
  }
  if (n == "indent") {
    const int64_t width = int_arg(args, kwargs, 0, "width", 4);
    const Value* first = arg(args, kwargs, 1, "first");
    const Value* blank = arg(args, kwargs, 2, "blank");
    const std::string pad(static_cast<size_t>(std::max<int64_t>(0, width)), ' ');
    const std::string s = require_string();
    std::string out;
    size_t b = 0;
    bool first_line = true;
    while (b <= s.size()) {
      size_t e = s.find('\n', b);
      const bool last = e == std::string::npos;
      if (last) e = s.size();
      const std::string line = s.substr(b, e - b);
      const bool add = first_line ? (first && truthy(*first)) : (!line.empty() || (blank && truthy(*blank)));
      out += (add ? pad : "") + line;
      if (last) break;
      out += '\n';
      b = e + 1;
      first_line = false;
    }
    return Value::string(out);
  }
  if (n == "wordcount") return Value::integer(static_cast<int64_t>(py_split(require_string(), nullptr, -1).size()));
  if (n == "center") {
    const int64_t width = int_arg(args, kwargs, 0, "width", 80);
    const std::string s = require_string();
    const int64_t len = static_cast<int64_t>(codepoints(s).size());
    if (width <= len) return Value::string(s);
    const int64_t total = width - len, left = total / 2 + (total & width & 1);
    return Value::string(std::string(static_cast<size_t>(left), ' ') + s + std::string(static_cast<size_t>(total - left), ' '));
  }
  MF_THROW("no filter named '", n, "'");
}

std::vector<std::pair<std::string, Value>> global_functions() {
  std::vector<std::pair<std::string, Value>> g;
  g.emplace_back("raise_exception", Value::function([](Args& a, Kwargs&) -> Value {
                   MF_THROW("raise_exception: ", a.empty() ? std::string() : to_str(a[0]));
                 }));
  g.emplace_back("range", Value::function([](Args& a, Kwargs&) {
                   MF_CHECK(!a.empty() && a.size() <= 3, "range expected 1 to 3 arguments");
                   for (const auto& x : a) MF_CHECK(x.kind == Kind::Int || x.kind == Kind::Bool, "range() arguments must be integers");
                   auto iv = [](const Value& x) { return x.kind == Kind::Bool ? static_cast<int64_t>(x.b) : x.i; };
                   const int64_t start = a.size() == 1 ? 0 : iv(a[0]), stop = a.size() == 1 ? iv(a[0]) : iv(a[1]);
                   const int64_t step = a.size() == 3 ? iv(a[2]) : 1;
                   MF_CHECK(step != 0, "range() arg 3 must not be zero");
                   List out;
                   for (int64_t k = start; step > 0 ? k < stop : k > stop; k += step) {
                     out.push_back(Value::integer(k));
                     MF_CHECK(out.size() <= 100000, "range too big (more than 100000 items)");
                   }
                   return Value::make_list(std::move(out));
                 }));
  auto dict_from = [](Args& a, Kwargs& k, bool ns) {
    Value d = ns ? Value::make_namespace() : Value::make_dict();
    for (const auto& x : a) {
      MF_CHECK(x.is_mapping(), ns ? "namespace" : "dict", "() positional argument must be a mapping");
      for (const auto& [kk, vv] : *x.dict) {
        MF_CHECK(!ns || (kk.is_string() && (kk.s.empty() || kk.s[0] != '_')), "namespace attributes cannot start with '_'");
        if (kk.is_string()) d.set(kk.s, vv);
        else d.dict->emplace_back(kk, vv);
      }
    }
    for (const auto& [kk, vv] : k) {
      MF_CHECK(!ns || kk.empty() || kk[0] != '_', "namespace attributes cannot start with '_'");
      d.set(kk, vv);
    }
    return d;
  };
  g.emplace_back("namespace", Value::function([dict_from](Args& a, Kwargs& k) { return dict_from(a, k, true); }));
  g.emplace_back("dict", Value::function([dict_from](Args& a, Kwargs& k) { return dict_from(a, k, false); }));
  g.emplace_back("strftime_now", Value::function([](Args& a, Kwargs&) {
                   MF_CHECK(a.size() == 1 && a[0].is_string(), "strftime_now takes one format string");
                   const long long fixed = jinja_now_for_strftime();
                   const std::time_t t = fixed >= 0 ? static_cast<std::time_t>(fixed) : std::time(nullptr);
                   std::tm tm{};
                   if (fixed >= 0) gmtime_r(&t, &tm);
                   else localtime_r(&t, &tm);
                   char buf[256];
                   const size_t len = std::strftime(buf, sizeof buf, a[0].s.c_str(), &tm);
                   return Value::string(std::string(buf, len));
                 }));
  return g;
}

}  // namespace moeforge::hf::jinja
