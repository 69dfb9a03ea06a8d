// Recursive-descent parser for the Jinja subset chat templates use, with jinja2's operator
// precedence: conditional < or < and < not < comparison < + - < ~ < * / // % < ** < unary <
// postfix (attribute, subscript, call) and filters/tests.
#include "core/error.h"
#include "hf/chat/jinja_ast.h"

namespace moeforge::hf::jinja {

namespace {

class Parser {
 public:
  explicit Parser(const std::vector<Token>& t) : toks_(t) {}

  Body parse_all() {
    Body body = parse_body({});
    if (peek().type != Tok::End) fail("unexpected tag '" + end_tag_seen_ + "'");
    return body;
  }

 private:
  const std::vector<Token>& toks_;
  size_t p_ = 0;
  int depth_ = 0;  // nesting of blocks and parenthesised expressions: bounded so hostile input cannot overflow the stack
  struct Nest {
    Parser& p;
    explicit Nest(Parser& q) : p(q) {
      if (++p.depth_ > 200) p.fail("template nests deeper than 200 levels");
    }
    ~Nest() { --p.depth_; }
  };
  std::string end_tag_seen_;

  const Token& peek(size_t k = 0) const { return toks_[std::min(p_ + k, toks_.size() - 1)]; }
  const Token& next() {
    const Token& t = toks_[p_];
    if (p_ + 1 < toks_.size()) ++p_;
    return t;
  }
  [[noreturn]] void fail(const std::string& msg) const { MF_THROW("chat template line ", peek().line, ": ", msg); }
  bool is_op(const char* op, size_t k = 0) const { return peek(k).type == Tok::Op && peek(k).text == op; }
  bool is_name(const char* n, size_t k = 0) const { return peek(k).type == Tok::Name && peek(k).text == n; }
  void expect_op(const char* op) {
    if (!is_op(op)) fail(std::string("expected '") + op + "', got '" + peek().text + "'");
    next();
  }
  std::string expect_name() {
    if (peek().type != Tok::Name) fail("expected a name, got '" + peek().text + "'");
    return next().text;
  }
  void expect_block_end() {
    if (peek().type != Tok::BlockEnd) fail("expected end of tag '%}', got '" + peek().text + "'");
    next();
  }
  ExprPtr make(ExprKind k) {
    auto e = std::make_shared<Expr>();
    e->kind = k;
    e->line = peek().line;
    return e;
  }

  // Parses statements until a block tag whose first name is in `stops` (left unconsumed, after
  // its BlockBegin) or the end of the template.
  Body parse_body(const std::vector<std::string>& stops) {
    Nest nest(*this);
    Body body;
    while (true) {
      const Token& t = peek();
      if (t.type == Tok::End) {
        if (!stops.empty()) fail("unexpected end of template, expected '" + stops.front() + "'");
        return body;
      }
      if (t.type == Tok::Data) {
        auto s = std::make_shared<Stmt>();
        s->kind = StmtKind::Text;
        s->line = t.line;
        s->text = t.text;
        body.push_back(s);
        next();
      } else if (t.type == Tok::VarBegin) {
        next();
        auto s = std::make_shared<Stmt>();
        s->kind = StmtKind::Output;
        s->line = t.line;
        s->expr = parse_tuple_or_expr();
        if (peek().type != Tok::VarEnd) fail("expected end of print statement '}}', got '" + peek().text + "'");
        next();
        body.push_back(s);
      } else if (t.type == Tok::BlockBegin) {
        const std::string kw = peek(1).type == Tok::Name ? peek(1).text : "";
        for (const auto& st : stops)
          if (kw == st) return body;
        next();
        body.push_back(parse_statement());
      } else {
        fail("unexpected '" + t.text + "'");
      }
    }
  }

  void consume_end_tag(const char* name) {
    // At BlockBegin of an end tag.
    next();
    if (!is_name(name)) fail(std::string("expected '") + name + "'");
    next();
    expect_block_end();
  }

  StmtPtr parse_statement() {
    const int line = peek().line;
    const std::string kw = expect_name();
    auto s = std::make_shared<Stmt>();
    s->line = line;
    if (kw == "if") {
      s->kind = StmtKind::If;
      ExprPtr cond = parse_expression();
      expect_block_end();
      while (true) {
        Body b = parse_body({"elif", "else", "endif"});
        s->branches.emplace_back(cond, std::move(b));
        next();  // BlockBegin
        const std::string which = next().text;
        if (which == "elif") {
          cond = parse_expression();
          expect_block_end();
          continue;
        }
        expect_block_end();
        if (which == "else") {
          s->else_body = parse_body({"endif"});
          consume_end_tag("endif");
        }
        break;
      }
    } else if (kw == "for") {
      s->kind = StmtKind::For;
      s->targets.push_back(expect_name());
      while (is_op(",")) {
        next();
        s->targets.push_back(expect_name());
      }
      if (!is_name("in")) fail("expected 'in' in for loop");
      next();
      s->expr = parse_or();
      ExprPtr filter;
      if (is_name("if")) {
        next();
        filter = parse_expression();
      }
      if (is_name("recursive")) fail("recursive for loops are not supported");
      expect_block_end();
      Body b = parse_body({"else", "endfor"});
      s->branches.emplace_back(filter, std::move(b));
      next();
      const std::string which = next().text;
      expect_block_end();
      if (which == "else") {
        s->else_body = parse_body({"endfor"});
        consume_end_tag("endfor");
      }
    } else if (kw == "set") {
      const std::string first = expect_name();
      if (is_op(".")) {
        next();
        s->kind = StmtKind::Set;
        s->targets.push_back(first);
        s->attr = expect_name();
        expect_op("=");
        s->expr = parse_tuple_or_expr();
        expect_block_end();
      } else {
        s->targets.push_back(first);
        while (is_op(",")) {
          next();
          s->targets.push_back(expect_name());
        }
        if (is_op("=")) {
          next();
          s->kind = StmtKind::Set;
          s->expr = parse_tuple_or_expr();
          expect_block_end();
        } else {
          if (s->targets.size() != 1) fail("block set takes one name");
          s->kind = StmtKind::SetBlock;
          s->text = first;
          if (is_op("|")) s->expr = parse_filter_chain(nullptr);
          expect_block_end();
          s->body = parse_body({"endset"});
          consume_end_tag("endset");
        }
      }
    } else if (kw == "macro") {
      s->kind = StmtKind::Macro;
      s->text = expect_name();
      expect_op("(");
      while (!is_op(")")) {
        std::string pname = expect_name();
        ExprPtr def;
        if (is_op("=")) {
          next();
          def = parse_expression();
        }
        s->params.emplace_back(pname, def);
        if (!is_op(",")) break;
        next();
      }
      expect_op(")");
      expect_block_end();
      s->body = parse_body({"endmacro"});
      consume_end_tag("endmacro");
    } else if (kw == "break" || kw == "continue") {
      s->kind = kw == "break" ? StmtKind::Break : StmtKind::Continue;
      expect_block_end();
    } else if (kw == "generation") {
      s->kind = StmtKind::Generation;
      expect_block_end();
      s->body = parse_body({"endgeneration"});
      consume_end_tag("endgeneration");
    } else if (kw == "filter") {
      s->kind = StmtKind::FilterBlock;
      s->expr = parse_filter_chain(nullptr, /*first_without_bar=*/true);
      expect_block_end();
      s->body = parse_body({"endfilter"});
      consume_end_tag("endfilter");
    } else {
      fail("unsupported tag '" + kw + "' (chat templates support if, for, set, macro, filter, break, continue, generation, raw)");
    }
    return s;
  }

  // Expressions ---------------------------------------------------------------------------------

  ExprPtr parse_tuple_or_expr() {
    ExprPtr first = parse_expression();
    if (!is_op(",")) return first;
    auto t = make(ExprKind::Tuple);
    t->items.push_back(first);
    while (is_op(",")) {
      next();
      if (peek().type == Tok::VarEnd || peek().type == Tok::BlockEnd) break;
      t->items.push_back(parse_expression());
    }
    return t;
  }

  ExprPtr parse_expression() {
    Nest nest(*this);
    ExprPtr e = parse_or();
    while (is_name("if")) {
      next();
      auto c = make(ExprKind::Cond);
      c->a = parse_or();
      c->b = e;
      if (is_name("else")) {
        next();
        c->c = parse_expression();
      }
      e = c;
    }
    return e;
  }

  ExprPtr binary(const std::string& op, ExprPtr l, ExprPtr r) {
    auto e = make(ExprKind::Binary);
    e->name = op;
    e->a = std::move(l);
    e->b = std::move(r);
    return e;
  }

  ExprPtr parse_or() {
    ExprPtr e = parse_and();
    while (is_name("or")) {
      next();
      e = binary("or", e, parse_and());
    }
    return e;
  }
  ExprPtr parse_and() {
    ExprPtr e = parse_not();
    while (is_name("and")) {
      next();
      e = binary("and", e, parse_not());
    }
    return e;
  }
  ExprPtr parse_not() {
    Nest nest(*this);
    if (is_name("not")) {
      next();
      auto u = make(ExprKind::Unary);
      u->name = "not";
      u->a = parse_not();
      return u;
    }
    return parse_compare();
  }
  ExprPtr parse_compare() {
    ExprPtr e = parse_math1();
    // Chained comparisons a < b < c mean (a < b) and (b < c).
    ExprPtr result;
    ExprPtr left = e;
    while (true) {
      std::string op;
      if (peek().type == Tok::Op && (peek().text == "==" || peek().text == "!=" || peek().text == "<" ||
                                     peek().text == ">" || peek().text == "<=" || peek().text == ">=")) {
        op = next().text;
      } else if (is_name("in")) {
        next();
        op = "in";
      } else if (is_name("not") && is_name("in", 1)) {
        next();
        next();
        op = "not in";
      } else {
        break;
      }
      ExprPtr right = parse_math1();
      ExprPtr cmp = binary(op, left, right);
      result = result ? binary("and", result, cmp) : cmp;
      left = right;
    }
    return result ? result : e;
  }
  ExprPtr parse_math1() {
    ExprPtr e = parse_concat();
    while (is_op("+") || is_op("-")) {
      const std::string op = next().text;
      e = binary(op, e, parse_concat());
    }
    return e;
  }
  ExprPtr parse_concat() {
    ExprPtr e = parse_math2();
    while (is_op("~")) {
      next();
      e = binary("~", e, parse_math2());
    }
    return e;
  }
  ExprPtr parse_math2() {
    ExprPtr e = parse_pow();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      const std::string op = next().text;
      e = binary(op, e, parse_pow());
    }
    return e;
  }
  ExprPtr parse_pow() {
    ExprPtr e = parse_unary(true);
    while (is_op("**")) {
      next();
      e = binary("**", e, parse_unary(true));
    }
    return e;
  }
  ExprPtr parse_unary(bool with_filter) {
    Nest nest(*this);
    ExprPtr e;
    if (is_op("-") || is_op("+")) {
      auto u = make(ExprKind::Unary);
      u->name = next().text;
      u->a = parse_unary(false);
      e = u;
    } else {
      e = parse_postfix(parse_primary());
    }
    if (with_filter) e = parse_filters_and_tests(e);
    return e;
  }

  ExprPtr parse_primary() {
    const Token& t = peek();
    if (t.type == Tok::Name) {
      next();
      if (t.text == "true" || t.text == "True") return literal(Value::boolean(true));
      if (t.text == "false" || t.text == "False") return literal(Value::boolean(false));
      if (t.text == "none" || t.text == "None") return literal(Value::none());
      auto n = make(ExprKind::Name);
      n->name = t.text;
      return n;
    }
    if (t.type == Tok::String) {
      std::string s = next().text;
      while (peek().type == Tok::String) s += next().text;  // adjacent literals concatenate
      return literal(Value::string(s));
    }
    if (t.type == Tok::Int) return literal(Value::integer(next().i));
    if (t.type == Tok::Float) return literal(Value::number(next().f));
    if (is_op("(")) {
      next();
      if (is_op(")")) {
        next();
        return make(ExprKind::Tuple);
      }
      ExprPtr e = parse_expression();
      if (is_op(",")) {
        auto tup = make(ExprKind::Tuple);
        tup->items.push_back(e);
        while (is_op(",")) {
          next();
          if (is_op(")")) break;
          tup->items.push_back(parse_expression());
        }
        e = tup;
      }
      expect_op(")");
      return e;
    }
    if (is_op("[")) {
      next();
      auto l = make(ExprKind::List);
      while (!is_op("]")) {
        l->items.push_back(parse_expression());
        if (!is_op(",")) break;
        next();
      }
      expect_op("]");
      return l;
    }
    if (is_op("{")) {
      next();
      auto d = make(ExprKind::Dict);
      while (!is_op("}")) {
        d->items.push_back(parse_expression());
        expect_op(":");
        d->items.push_back(parse_expression());
        if (!is_op(",")) break;
        next();
      }
      expect_op("}");
      return d;
    }
    fail("unexpected '" + t.text + "' in expression");
  }

  ExprPtr literal(Value v) {
    auto e = make(ExprKind::Literal);
    e->literal = std::move(v);
    return e;
  }

  void parse_call_args(Expr& call) {
    expect_op("(");
    while (!is_op(")")) {
      if (peek().type == Tok::Name && is_op("=", 1)) {
        std::string k = next().text;
        next();
        call.kwargs.emplace_back(k, parse_expression());
      } else {
        if (!call.kwargs.empty()) fail("positional argument after keyword argument");
        call.items.push_back(parse_expression());
      }
      if (!is_op(",")) break;
      next();
    }
    expect_op(")");
  }

  ExprPtr parse_postfix(ExprPtr e) {
    while (true) {
      if (is_op(".")) {
        next();
        auto a = make(ExprKind::Attr);
        a->a = e;
        if (peek().type == Tok::Int) a->name = std::to_string(next().i);
        else a->name = expect_name();
        e = a;
      } else if (is_op("[")) {
        next();
        ExprPtr start, stop, step;
        bool is_slice = false;
        if (!is_op(":")) start = parse_expression();
        if (is_op(":")) {
          is_slice = true;
          next();
          if (!is_op("]") && !is_op(":")) stop = parse_expression();
          if (is_op(":")) {
            next();
            if (!is_op("]")) step = parse_expression();
          }
        }
        expect_op("]");
        if (is_slice) {
          auto s = make(ExprKind::Slice);
          s->a = e;
          s->items = {start, stop, step};
          e = s;
        } else {
          auto it = make(ExprKind::Item);
          it->a = e;
          it->b = start;
          e = it;
        }
      } else if (is_op("(")) {
        auto c = make(ExprKind::Call);
        c->a = e;
        parse_call_args(*c);
        e = c;
      } else {
        return e;
      }
    }
  }

  ExprPtr parse_filter_chain(ExprPtr e, bool first_without_bar = false) {
    bool first = true;
    while (is_op("|") || (first && first_without_bar)) {
      if (!(first && first_without_bar)) next();
      first = false;
      auto f = make(ExprKind::Filter);
      f->a = e;
      f->name = expect_name();
      while (is_op(".")) {  // dotted filter names are not a thing in templates, but give a clear error
        fail("unexpected '.' after filter name");
      }
      if (is_op("(")) parse_call_args(*f);
      e = f;
    }
    return e;
  }

  bool starts_test_argument() const {
    const Token& t = peek();
    if (t.type == Tok::String || t.type == Tok::Int || t.type == Tok::Float) return true;
    if (t.type == Tok::Name)
      return t.text != "else" && t.text != "or" && t.text != "and" && t.text != "if" && t.text != "is" &&
             t.text != "in" && t.text != "not";
    return t.type == Tok::Op && (t.text == "[" || t.text == "{" || t.text == "-");
  }

  ExprPtr parse_filters_and_tests(ExprPtr e) {
    while (true) {
      if (is_op("|")) {
        e = parse_filter_chain(e);
      } else if (is_name("is")) {
        next();
        auto t = make(ExprKind::Test);
        if (is_name("not")) {
          next();
          t->negated = true;
        }
        t->a = e;
        t->name = expect_name();
        if (is_op("(")) {
          parse_call_args(*t);
        } else if (starts_test_argument()) {
          t->items.push_back(parse_postfix(parse_primary()));
        }
        e = t;
      } else if (is_op("(")) {
        auto c = make(ExprKind::Call);
        c->a = e;
        parse_call_args(*c);
        e = c;
      } else {
        return e;
      }
    }
  }
};

}  // namespace

Body parse_template(const std::vector<Token>& tokens) {
  Parser p(tokens);
  return p.parse_all();
}

}  // namespace moeforge::hf::jinja
