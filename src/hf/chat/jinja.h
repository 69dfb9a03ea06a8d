// A Jinja2 interpreter for chat templates: the statements, expressions, filters, tests and Python
// methods that Hugging Face chat templates use, rendered in the environment apply_chat_template
// builds (trim_blocks, lstrip_blocks, loop controls, `{% generation %}`, raise_exception,
// strftime_now, namespace, tojson without HTML escaping). Unsupported syntax is an error naming the
// template line, never silently different output.
#pragma once
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "hf/chat/value.h"

namespace moeforge::hf::jinja {

struct Stmt;

struct RenderResult {
  std::string text;
  // Byte ranges [begin, end) of `text` produced inside {% generation %} blocks.
  std::vector<std::pair<size_t, size_t>> generation_spans;
};

class Template {
 public:
  explicit Template(const std::string& source);
  // `vars` are the template's top-level variables (messages, add_generation_prompt, bos_token, ...).
  RenderResult render(const std::vector<std::pair<std::string, Value>>& vars) const;
  bool has_generation_tags() const { return has_generation_; }

 private:
  std::vector<std::shared_ptr<Stmt>> body_;
  bool has_generation_ = false;
};

// Overrides strftime_now's clock for reproducible tests: seconds since the epoch, or -1 for now.
void set_fixed_time_for_tests(long long epoch_seconds);

}  // namespace moeforge::hf::jinja
