// Internal to the template engine: lexer tokens and the syntax tree of a parsed template.
#pragma once
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "hf/chat/value.h"

namespace moeforge::hf::jinja {

enum class Tok { Data, VarBegin, VarEnd, BlockBegin, BlockEnd, Name, String, Int, Float, Op, End };

struct Token {
  Tok type = Tok::End;
  std::string text;  // data, name, operator, or the unescaped string literal
  int64_t i = 0;
  double f = 0;
  int line = 1;
};

// Jinja's lexer with the Hugging Face environment's settings: trim_blocks, lstrip_blocks, no
// trailing-newline keeping, {{- -}} / {%- -%} / {%+ +%} whitespace control, comments dropped,
// {% raw %} blocks kept verbatim.
std::vector<Token> lex_template(const std::string& source);

struct Expr;
using ExprPtr = std::shared_ptr<Expr>;

enum class ExprKind { Literal, Name, Attr, Item, Slice, Call, Filter, Test, Unary, Binary, Cond, List, Tuple, Dict };

struct Expr {
  ExprKind kind;
  int line = 0;
  Value literal;                    // Literal
  std::string name;                 // Name, Attr, Filter, Test; operator for Unary/Binary
  ExprPtr a, b, c;                  // operands: object / left / condition ...
  std::vector<ExprPtr> items;       // call args, list/tuple items, dict keys+values (interleaved)
  std::vector<std::pair<std::string, ExprPtr>> kwargs;
  bool negated = false;             // Test: `is not`
};

struct Stmt;
using StmtPtr = std::shared_ptr<Stmt>;
using Body = std::vector<StmtPtr>;

enum class StmtKind { Text, Output, If, For, Set, SetBlock, Macro, Break, Continue, Generation, FilterBlock };

struct Stmt {
  StmtKind kind;
  int line = 0;
  std::string text;                            // Text; Macro / SetBlock name
  ExprPtr expr;                                // Output, Set value, For iterable, FilterBlock filter
  std::vector<std::pair<ExprPtr, Body>> branches;  // If: (condition, body); For: one (filter-or-null, body)
  Body else_body;                              // If / For
  Body body;                                   // Macro, SetBlock, Generation, FilterBlock
  std::vector<std::string> targets;            // For / Set targets (names); Set: "ns.attr" form below
  std::string attr;                            // Set: namespace attribute (target[0] is the namespace)
  std::vector<std::pair<std::string, ExprPtr>> params;  // Macro parameters with defaults (may be null)
};

// Parses a template; errors name the line: "chat template line N: ...".
Body parse_template(const std::vector<Token>& tokens);

}  // namespace moeforge::hf::jinja
