// libFuzzer target: arbitrary bytes as a training recipe (YAML), the first line split off as a
// key=value override: a recipe loads with every number in range, or throws moeforge::Error naming
// the file and key.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "core/error.h"
#include "train/recipe.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string text(reinterpret_cast<const char*>(data), size);
  std::vector<std::string> overrides;
  if (const auto nl = text.find('\n'); nl != std::string::npos && text.find('=') < nl) {
    overrides.push_back(text.substr(0, nl));
    text = text.substr(nl + 1);
  }
  try {
    const auto r = moeforge::train::load_recipe_text(text, "fuzz.yaml", "/nonexistent", overrides);
    if (!std::isfinite(r.optimizer.lr) || r.optimizer.beta1 >= 1 || r.micro_batch < 1 ||
        r.global_batch % r.micro_batch != 0 || (r.steps > 0 && r.epochs > 0))
      __builtin_trap();
  } catch (const moeforge::Error&) {
  }
  return 0;
}
