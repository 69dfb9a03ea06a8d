// Values of the chat-template interpreter, with Python's semantics where templates can see them:
// str() and repr() spelling, truthiness, ==, ordering, and json.dumps() for the `tojson` filter.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

namespace moeforge::hf::jinja {

struct Value;
using List = std::vector<Value>;
using Dict = std::vector<std::pair<Value, Value>>;  // insertion order, as Python dicts
using Args = std::vector<Value>;
using Kwargs = std::vector<std::pair<std::string, Value>>;
using Function = std::function<Value(Args&, Kwargs&)>;

enum class Kind { Undefined, None, Bool, Int, Float, String, List, Dict, Namespace, Function };

struct Value {
  Kind kind = Kind::Undefined;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string s;                    // String; for Undefined: the name that was looked up
  std::shared_ptr<List> list;       // List (tuples too)
  bool tuple = false;               // a List that Python would hold as a tuple (prints as (a, b))
  std::shared_ptr<Dict> dict;       // Dict and Namespace (namespaces are mutable, shared)
  std::shared_ptr<Function> fn;     // Function (macros, globals, bound methods)

  static Value undefined(std::string name = "") { Value v; v.s = std::move(name); return v; }
  static Value none() { Value v; v.kind = Kind::None; return v; }
  static Value boolean(bool x) { Value v; v.kind = Kind::Bool; v.b = x; return v; }
  static Value integer(int64_t x) { Value v; v.kind = Kind::Int; v.i = x; return v; }
  static Value number(double x) { Value v; v.kind = Kind::Float; v.f = x; return v; }
  static Value string(std::string x) { Value v; v.kind = Kind::String; v.s = std::move(x); return v; }
  static Value make_list(List x = {}) { Value v; v.kind = Kind::List; v.list = std::make_shared<List>(std::move(x)); return v; }
  static Value make_tuple(List x) { Value v = make_list(std::move(x)); v.tuple = true; return v; }
  static Value make_dict(Dict x = {}) { Value v; v.kind = Kind::Dict; v.dict = std::make_shared<Dict>(std::move(x)); return v; }
  static Value make_namespace(Dict x = {}) { Value v = make_dict(std::move(x)); v.kind = Kind::Namespace; return v; }
  static Value function(Function f) { Value v; v.kind = Kind::Function; v.fn = std::make_shared<Function>(std::move(f)); return v; }

  bool is_undefined() const { return kind == Kind::Undefined; }
  bool is_none() const { return kind == Kind::None; }
  bool is_string() const { return kind == Kind::String; }
  bool is_number() const { return kind == Kind::Int || kind == Kind::Float || kind == Kind::Bool; }
  bool is_mapping() const { return kind == Kind::Dict || kind == Kind::Namespace; }
  bool is_list() const { return kind == Kind::List; }

  // Dict lookup by key; nullptr when absent.
  const Value* find(const Value& key) const;
  const Value* find(const std::string& key) const;
  void set(const std::string& key, Value v);  // dicts and namespaces
};

bool truthy(const Value& v);
bool equals(const Value& a, const Value& b);
// <0, 0, >0; throws for values Python cannot order.
int compare(const Value& a, const Value& b);
double as_double(const Value& v);
// Python's str(): what {{ v }} prints (undefined prints nothing).
std::string to_str(const Value& v);
// Python's repr(): used inside str() of lists and dicts.
std::string repr(const Value& v);
// json.dumps(v, ensure_ascii=False, indent=indent, separators=..., sort_keys=...).
std::string to_json(const Value& v, int indent = -1, const std::string* item_sep = nullptr,
                    const std::string* key_sep = nullptr, bool sort_keys = false);
// Python float repr (shortest round-trip, exponent past 1e16 or under 1e-4).
std::string float_repr(double x);
std::string type_name(const Value& v);

Value from_json(const nlohmann::ordered_json& j);

}  // namespace moeforge::hf::jinja
