// moeforge train RECIPE.yaml [key=value ...]
#include "cli/commands.h"
#include "core/error.h"
#include "train/trainer.h"

namespace moeforge::cli {

int cmd_train(const std::vector<std::string>& argv) {
  MF_CHECK(!argv.empty() && argv[0].rfind("--", 0) != 0, "train needs a recipe: moeforge train RECIPE.yaml [key=value ...]");
  const std::vector<std::string> overrides(argv.begin() + 1, argv.end());
  const auto recipe = train::load_recipe(argv[0], overrides);
  train::run_training(recipe);
  return 0;
}

}  // namespace moeforge::cli
