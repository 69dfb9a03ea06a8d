// Internal to the template engine: filters, tests, attribute/item access with Python's methods on
// str, list and dict, and the globals of the Hugging Face chat-template environment.
#pragma once
#include <string>

#include "hf/chat/value.h"

namespace moeforge::hf::jinja {

Value apply_filter(const std::string& name, const Value& v, Args& args, Kwargs& kwargs);
bool apply_test(const std::string& name, const Value& v, Args& args);
bool has_test(const std::string& name);
// obj.name: dict methods first, then keys (jinja's getattr); string/list methods; namespaces.
Value get_attr(const Value& obj, const std::string& name);
// obj[key]: items first, then attributes (jinja's getitem).
Value get_item(const Value& obj, const Value& key);
Value slice(const Value& obj, const Value& start, const Value& stop, const Value& step);
bool contains(const Value& container, const Value& item);
// The values a for-loop iterates: list items, dict keys, string characters.
List iterate(const Value& v);
Value length_of(const Value& v);
std::vector<std::pair<std::string, Value>> global_functions();

}  // namespace moeforge::hf::jinja
