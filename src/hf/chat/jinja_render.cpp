// The template interpreter: scopes as jinja2 has them (a for-loop iteration and a macro call get a
// fresh scope; `if` does not), loop variables, macros, and output with generation-span tracking.
#include <cmath>
#include <unordered_map>

#include "core/error.h"
#include "hf/chat/jinja.h"
#include "hf/chat/jinja_ast.h"
#include "hf/chat/jinja_builtins.h"

namespace moeforge::hf::jinja {

namespace {

// Templates come from downloaded checkpoints: bound what one render may cost, so a hostile or
// broken template is an error instead of a hang, a stack overflow or an exhausted memory.
constexpr int64_t kMaxSteps = 2'000'000;          // statements and expressions evaluated
constexpr size_t kMaxOutputBytes = 256u << 20;      // rendered text
constexpr int kMaxCallDepth = 256;                  // nested macro calls (Python's limit is ~1000)

struct Scope {
  std::unordered_map<std::string, Value> vars;
  std::shared_ptr<Scope> parent;
  const Value* lookup(const std::string& n) const {
    for (const Scope* s = this; s; s = s->parent.get()) {
      auto it = s->vars.find(n);
      if (it != s->vars.end()) return &it->second;
    }
    return nullptr;
  }
};
using ScopePtr = std::shared_ptr<Scope>;

enum class Flow { Normal, Break, Continue };

[[noreturn]] void fail_at(int line, const std::string& msg) { MF_THROW("chat template line ", line, ": ", msg); }

bool body_has_generation(const Body& body) {
  for (const auto& s : body) {
    if (s->kind == StmtKind::Generation) return true;
    for (const auto& [c, b] : s->branches)
      if (body_has_generation(b)) return true;
    if (body_has_generation(s->else_body) || body_has_generation(s->body)) return true;
  }
  return false;
}

int64_t to_int(const Value& v, int line) {
  if (v.kind == Kind::Int) return v.i;
  if (v.kind == Kind::Bool) return v.b;
  fail_at(line, "expected an integer, got " + type_name(v));
}

// Python arithmetic.
Value arith(const std::string& op, const Value& a, const Value& b, int line) {
  if (a.is_undefined() || b.is_undefined())
    fail_at(line, "'" + (a.is_undefined() ? a.s : b.s) + "' is undefined");
  if (op == "+") {
    if (a.is_string() && b.is_string()) return Value::string(a.s + b.s);
    if (a.is_list() && b.is_list()) {
      List l = *a.list;
      l.insert(l.end(), b.list->begin(), b.list->end());
      return Value::make_list(std::move(l));
    }
  }
  if (op == "*") {
    const Value* seq = a.is_string() || a.is_list() ? &a : (b.is_string() || b.is_list() ? &b : nullptr);
    const Value* cnt = seq == &a ? &b : &a;
    if (seq && (cnt->kind == Kind::Int || cnt->kind == Kind::Bool)) {
      const int64_t n = std::max<int64_t>(0, to_int(*cnt, line));
      const size_t unit = seq->is_string() ? seq->s.size() : seq->list->size();
      if (unit > 0 && static_cast<double>(n) * static_cast<double>(unit) > static_cast<double>(kMaxOutputBytes))
        fail_at(line, "repetition result too large");
      if (seq->is_string()) {
        std::string s;
        for (int64_t k = 0; k < n; ++k) s += seq->s;
        return Value::string(s);
      }
      List l;
      for (int64_t k = 0; k < n; ++k) l.insert(l.end(), seq->list->begin(), seq->list->end());
      return Value::make_list(std::move(l));
    }
  }
  if (!a.is_number() || !b.is_number())
    fail_at(line, "unsupported operand types for " + op + ": '" + type_name(a) + "' and '" + type_name(b) + "'");
  const bool ints = a.kind != Kind::Float && b.kind != Kind::Float;
  if (ints) {
    const int64_t x = to_int(a, line), y = to_int(b, line);
    if (op == "+") return Value::integer(x + y);
    if (op == "-") return Value::integer(x - y);
    if (op == "*") return Value::integer(x * y);
    if (op == "/") {
      if (y == 0) fail_at(line, "division by zero");
      return Value::number(static_cast<double>(x) / static_cast<double>(y));
    }
    if (op == "//" || op == "%") {
      if (y == 0) fail_at(line, "integer division or modulo by zero");
      int64_t q = x / y, r = x % y;
      if (r != 0 && ((r < 0) != (y < 0))) {
        q -= 1;
        r += y;
      }
      return Value::integer(op == "//" ? q : r);
    }
    if (op == "**") {
      if (y < 0) return Value::number(std::pow(static_cast<double>(x), static_cast<double>(y)));
      int64_t r = 1;
      for (int64_t k = 0; k < y; ++k) r *= x;
      return Value::integer(r);
    }
  }
  const double x = as_double(a), y = as_double(b);
  if (op == "+") return Value::number(x + y);
  if (op == "-") return Value::number(x - y);
  if (op == "*") return Value::number(x * y);
  if (op == "/") {
    if (y == 0) fail_at(line, "float division by zero");
    return Value::number(x / y);
  }
  if (op == "//") return Value::number(std::floor(x / y));
  if (op == "%") {
    double r = std::fmod(x, y);
    if (r != 0 && ((r < 0) != (y < 0))) r += y;
    return Value::number(r);
  }
  if (op == "**") return Value::number(std::pow(x, y));
  fail_at(line, "unknown operator " + op);
}

class Interp {
 public:
  RenderResult result;
  int64_t steps = 0;
  int call_depth = 0;

  void tick(int line) {
    if (++steps > kMaxSteps) fail_at(line, "template exceeded " + std::to_string(kMaxSteps) + " evaluation steps");
  }

  void exec_body(const Body& body, const ScopePtr& scope, Flow& flow) {
    for (const auto& s : body) {
      exec(*s, scope, flow);
      if (flow != Flow::Normal) return;
    }
  }

  Value eval(const Expr& e, const ScopePtr& scope) {
    tick(e.line);
    switch (e.kind) {
      case ExprKind::Literal: return e.literal;
      case ExprKind::Name: {
        const Value* v = scope->lookup(e.name);
        return v ? *v : Value::undefined(e.name);
      }
      case ExprKind::Attr: {
        Value obj = eval(*e.a, scope);
        if (obj.is_undefined()) fail_at(e.line, "'" + obj.s + "' is undefined (reading ." + e.name + ")");
        if (!e.name.empty() && e.name[0] == '_') fail_at(e.line, "access to attribute '" + e.name + "' is unsafe");
        Value r = get_attr(obj, e.name);
        if (r.is_undefined()) r.s = describe(*e.a) + "." + e.name;
        return r;
      }
      case ExprKind::Item: {
        Value obj = eval(*e.a, scope);
        if (obj.is_undefined()) fail_at(e.line, "'" + obj.s + "' is undefined (indexing it)");
        Value key = eval(*e.b, scope);
        try {
          Value r = get_item(obj, key);
          if (r.is_undefined()) r.s = describe(*e.a) + "[" + repr(key) + "]";
          return r;
        } catch (const Error& err) {
          fail_at(e.line, err.what());
        }
      }
      case ExprKind::Slice: {
        Value obj = eval(*e.a, scope);
        auto opt = [&](const ExprPtr& x) { return x ? eval(*x, scope) : Value::none(); };
        try {
          return slice(obj, opt(e.items[0]), opt(e.items[1]), opt(e.items[2]));
        } catch (const Error& err) {
          fail_at(e.line, err.what());
        }
      }
      case ExprKind::Call: {
        Value f = eval(*e.a, scope);
        if (f.kind != Kind::Function) fail_at(e.line, "'" + describe(*e.a) + "' is not callable (" + type_name(f) + ")");
        Args args;
        Kwargs kwargs;
        for (const auto& a : e.items) args.push_back(eval(*a, scope));
        for (const auto& [k, v] : e.kwargs) kwargs.emplace_back(k, eval(*v, scope));
        try {
          return (*f.fn)(args, kwargs);
        } catch (const Error& err) {
          const std::string m = err.what();
          if (m.rfind("chat template", 0) == 0) throw;
          fail_at(e.line, m);
        }
      }
      case ExprKind::Filter: {
        Value v = e.a ? eval(*e.a, scope) : Value::undefined();
        Args args;
        Kwargs kwargs;
        for (const auto& a : e.items) args.push_back(eval(*a, scope));
        for (const auto& [k, x] : e.kwargs) kwargs.emplace_back(k, eval(*x, scope));
        try {
          return apply_filter(e.name, v, args, kwargs);
        } catch (const Error& err) {
          fail_at(e.line, std::string("filter '") + e.name + "': " + err.what());
        }
      }
      case ExprKind::Test: {
        Value v = eval(*e.a, scope);
        Args args;
        for (const auto& a : e.items) args.push_back(eval(*a, scope));
        if (!has_test(e.name)) fail_at(e.line, "no test named '" + e.name + "'");
        try {
          const bool r = apply_test(e.name, v, args);
          return Value::boolean(e.negated ? !r : r);
        } catch (const Error& err) {
          fail_at(e.line, std::string("test '") + e.name + "': " + err.what());
        }
      }
      case ExprKind::Unary: {
        Value v = eval(*e.a, scope);
        if (e.name == "not") return Value::boolean(!truthy(v));
        if (!v.is_number()) fail_at(e.line, "bad operand type for unary " + e.name + ": '" + type_name(v) + "'");
        if (e.name == "+") return v.kind == Kind::Bool ? Value::integer(v.b) : v;
        if (v.kind == Kind::Float) return Value::number(-v.f);
        return Value::integer(-(v.kind == Kind::Bool ? v.b : v.i));
      }
      case ExprKind::Binary: return eval_binary(e, scope);
      case ExprKind::Cond: {
        if (truthy(eval(*e.a, scope))) return eval(*e.b, scope);
        return e.c ? eval(*e.c, scope) : Value::undefined();
      }
      case ExprKind::List:
      case ExprKind::Tuple: {
        List l;
        for (const auto& x : e.items) l.push_back(eval(*x, scope));
        return e.kind == ExprKind::Tuple ? Value::make_tuple(std::move(l)) : Value::make_list(std::move(l));
      }
      case ExprKind::Dict: {
        Dict d;
        for (size_t k = 0; k + 1 < e.items.size(); k += 2) {
          Value key = eval(*e.items[k], scope), val = eval(*e.items[k + 1], scope);
          bool replaced = false;
          for (auto& [dk, dv] : d)
            if (equals(dk, key)) {
              dv = val;
              replaced = true;
            }
          if (!replaced) d.emplace_back(std::move(key), std::move(val));
        }
        return Value::make_dict(std::move(d));
      }
    }
    fail_at(e.line, "bad expression");
  }

 private:
  static std::string describe(const Expr& e) {
    if (e.kind == ExprKind::Name) return e.name;
    if (e.kind == ExprKind::Attr) return describe(*e.a) + "." + e.name;
    if (e.kind == ExprKind::Item) return describe(*e.a) + "[...]";
    return "expression";
  }

  Value eval_binary(const Expr& e, const ScopePtr& scope) {
    const std::string& op = e.name;
    if (op == "and") {
      Value l = eval(*e.a, scope);
      return truthy(l) ? eval(*e.b, scope) : l;
    }
    if (op == "or") {
      Value l = eval(*e.a, scope);
      return truthy(l) ? l : eval(*e.b, scope);
    }
    Value l = eval(*e.a, scope), r = eval(*e.b, scope);
    if (op == "~") return Value::string(to_str(l) + to_str(r));
    if (op == "==") return Value::boolean(equals(l, r));
    if (op == "!=") return Value::boolean(!equals(l, r));
    if (op == "in" || op == "not in") {
      if (r.is_undefined()) fail_at(e.line, "'" + r.s + "' is undefined (right side of 'in')");
      try {
        const bool c = contains(r, l);
        return Value::boolean(op == "in" ? c : !c);
      } catch (const Error& err) {
        fail_at(e.line, err.what());
      }
    }
    if (op == "<" || op == ">" || op == "<=" || op == ">=") {
      int c;
      try {
        c = compare(l, r);
      } catch (const Error& err) {
        fail_at(e.line, err.what());
      }
      if (op == "<") return Value::boolean(c < 0);
      if (op == ">") return Value::boolean(c > 0);
      if (op == "<=") return Value::boolean(c <= 0);
      return Value::boolean(c >= 0);
    }
    return arith(op, l, r, e.line);
  }

  void output(const std::string& s) {
    if (result.text.size() + s.size() > kMaxOutputBytes) MF_THROW("rendered text exceeds ", kMaxOutputBytes >> 20, " MiB");
    result.text += s;
  }

  // Binds a set's or a for-loop's target names, unpacking when there are several.
  void assign(const Stmt& s, const ScopePtr& scope, const Value& v) {
    if (s.targets.size() == 1) {
      scope->vars[s.targets[0]] = v;
      return;
    }
    List items = iterate(v);
    if (items.size() != s.targets.size())
      fail_at(s.line, "cannot unpack " + std::to_string(items.size()) + " values into " + std::to_string(s.targets.size()));
    for (size_t k = 0; k < items.size(); ++k) scope->vars[s.targets[k]] = items[k];
  }

  void exec(const Stmt& s, const ScopePtr& scope, Flow& flow) {
    tick(s.line);
    switch (s.kind) {
      case StmtKind::Text: output(s.text); return;
      case StmtKind::Output: {
        Value v = eval(*s.expr, scope);
        output(to_str(v));
        return;
      }
      case StmtKind::If:
        for (const auto& [cond, body] : s.branches)
          if (truthy(eval(*cond, scope))) {
            exec_body(body, scope, flow);
            return;
          }
        exec_body(s.else_body, scope, flow);
        return;
      case StmtKind::For: exec_for(s, scope, flow); return;
      case StmtKind::Set: {
        Value v = eval(*s.expr, scope);
        if (!s.attr.empty()) {
          const Value* ns = scope->lookup(s.targets[0]);
          if (!ns || ns->kind != Kind::Namespace)
            fail_at(s.line, "cannot assign attribute on non-namespace object '" + s.targets[0] + "'");
          if (s.attr[0] == '_') fail_at(s.line, "namespace attributes cannot start with '_'");
          Value nsv = *ns;  // shares the namespace's storage
          nsv.set(s.attr, v);
          return;
        }
        assign(s, scope, v);
        return;
      }
      case StmtKind::SetBlock: {
        Value v = capture(s.body, scope);
        if (s.expr) v = apply_filter_chain(*s.expr, v, scope);
        scope->vars[s.text] = v;
        return;
      }
      case StmtKind::Macro: {
        scope->vars[s.text] = make_macro(s, scope);
        return;
      }
      case StmtKind::Break: flow = Flow::Break; return;
      case StmtKind::Continue: flow = Flow::Continue; return;
      case StmtKind::Generation: {
        const size_t begin = result.text.size();
        exec_body(s.body, scope, flow);
        result.generation_spans.emplace_back(begin, result.text.size());
        return;
      }
      case StmtKind::FilterBlock: {
        Value v = capture(s.body, scope);
        output(to_str(apply_filter_chain(*s.expr, v, scope)));
        return;
      }
    }
  }

  // Renders `body` into a string without touching the main output (spans inside are dropped).
  Value capture(const Body& body, const ScopePtr& scope) {
    RenderResult saved = std::move(result);
    result = RenderResult{};
    Flow f = Flow::Normal;
    exec_body(body, scope, f);
    std::string text = std::move(result.text);
    result = std::move(saved);
    return Value::string(std::move(text));
  }

  // A filter chain parsed with a null innermost operand, applied to `v`.
  Value apply_filter_chain(const Expr& chain, const Value& v, const ScopePtr& scope) {
    Value inner = chain.a ? apply_filter_chain(*chain.a, v, scope) : v;
    Args args;
    Kwargs kwargs;
    for (const auto& a : chain.items) args.push_back(eval(*a, scope));
    for (const auto& [k, x] : chain.kwargs) kwargs.emplace_back(k, eval(*x, scope));
    return apply_filter(chain.name, inner, args, kwargs);
  }

  Value make_macro(const Stmt& s, const ScopePtr& defining_scope) {
    const Stmt* def = &s;
    // A weak reference: the scope holds the macro, so a strong one would be a cycle.
    std::weak_ptr<Scope> weak_scope = defining_scope;
    return Value::function([this, def, weak_scope](Args& args, Kwargs& kwargs) {
      auto local = std::make_shared<Scope>();
      local->parent = weak_scope.lock();
      if (args.size() > def->params.size())
        MF_THROW("macro '", def->text, "' takes not more than ", def->params.size(), " argument(s)");
      for (size_t k = 0; k < def->params.size(); ++k) {
        const auto& [pname, pdef] = def->params[k];
        Value v = Value::undefined(pname);
        if (k < args.size()) v = args[k];
        bool from_kw = false;
        for (const auto& [kn, kv] : kwargs)
          if (kn == pname) {
            v = kv;
            from_kw = true;
          }
        if (k >= args.size() && !from_kw && pdef) v = eval(*pdef, local);
        local->vars[pname] = v;
      }
      for (const auto& [kn, kv] : kwargs) {
        bool known = false;
        for (const auto& p : def->params) known = known || p.first == kn;
        if (!known) MF_THROW("macro '", def->text, "' takes no keyword argument '", kn, "'");
      }
      if (call_depth >= kMaxCallDepth) MF_THROW("macro '", def->text, "': maximum recursion depth exceeded");
      ++call_depth;
      struct Leave {
        int& d;
        ~Leave() { --d; }
      } leave{call_depth};
      return capture(def->body, local);
    });
  }

  void exec_for(const Stmt& s, const ScopePtr& scope, Flow& outer_flow) {
    Value iterable = eval(*s.expr, scope);
    if (!iterable.is_undefined() && !iterable.is_list() && !iterable.is_mapping() && !iterable.is_string())
      fail_at(s.line, "'" + type_name(iterable) + "' object is not iterable");
    List items = iterate(iterable);
    const ExprPtr& filter = s.branches[0].first;
    const Body& body = s.branches[0].second;
    if (filter) {  // `for x in xs if cond`: the loop sees only the items that pass
      List kept;
      for (const auto& item : items) {
        auto probe = std::make_shared<Scope>();
        probe->parent = scope;
        assign(s, probe, item);
        if (truthy(eval(*filter, probe))) kept.push_back(item);
      }
      items = std::move(kept);
    }
    if (items.empty()) {
      Flow f = Flow::Normal;
      exec_body(s.else_body, scope, f);
      if (f != Flow::Normal) outer_flow = f;
      return;
    }
    const int64_t n = static_cast<int64_t>(items.size());
    for (int64_t k = 0; k < n; ++k) {
      tick(s.line);
      auto iter_scope = std::make_shared<Scope>();
      iter_scope->parent = scope;
      assign(s, iter_scope, items[static_cast<size_t>(k)]);
      Dict loop;
      auto put = [&](const char* name, Value v) { loop.emplace_back(Value::string(name), std::move(v)); };
      put("index", Value::integer(k + 1));
      put("index0", Value::integer(k));
      put("revindex", Value::integer(n - k));
      put("revindex0", Value::integer(n - k - 1));
      put("first", Value::boolean(k == 0));
      put("last", Value::boolean(k == n - 1));
      put("length", Value::integer(n));
      put("depth", Value::integer(1));
      put("depth0", Value::integer(0));
      put("previtem", k > 0 ? items[static_cast<size_t>(k - 1)] : Value::undefined("loop.previtem"));
      put("nextitem", k + 1 < n ? items[static_cast<size_t>(k + 1)] : Value::undefined("loop.nextitem"));
      put("cycle", Value::function([k](Args& args, Kwargs&) {
            MF_CHECK(!args.empty(), "loop.cycle() needs at least one value");
            return args[static_cast<size_t>(k) % args.size()];
          }));
      iter_scope->vars["loop"] = Value::make_dict(std::move(loop));
      Flow f = Flow::Normal;
      exec_body(body, iter_scope, f);
      if (f == Flow::Break) break;
    }
  }
};

long long g_fixed_time = -1;

}  // namespace

void set_fixed_time_for_tests(long long epoch_seconds) { g_fixed_time = epoch_seconds; }
long long jinja_now_for_strftime() { return g_fixed_time; }

Template::Template(const std::string& source) {
  body_ = parse_template(lex_template(source));
  has_generation_ = body_has_generation(body_);
}

RenderResult Template::render(const std::vector<std::pair<std::string, Value>>& vars) const {
  auto globals = std::make_shared<Scope>();
  for (auto& [k, v] : global_functions()) globals->vars[k] = v;
  auto top = std::make_shared<Scope>();
  top->parent = globals;
  for (const auto& [k, v] : vars) top->vars[k] = v;
  Interp in;
  Flow f = Flow::Normal;
  in.exec_body(body_, top, f);
  return std::move(in.result);
}

}  // namespace moeforge::hf::jinja
