// moeforge train RECIPE.yaml [key=value ...]
#include <sstream>

#include "cli/app.h"
#include "cli/commands.h"
#include "core/error.h"
#include "train/trainer.h"

namespace moeforge::cli {

int cmd_train(const std::vector<std::string>& argv) {
  // The footer lists every recipe key with its default (the resolved form of an empty recipe).
  std::ostringstream keys;
  const train::Recipe defaults_of_an_empty_recipe;
  std::istringstream defaults(defaults_of_an_empty_recipe.to_yaml());
  keys << "\nRecipe keys and their defaults (docs/training.md explains each):\n";
  for (std::string line; std::getline(defaults, line);)
    if (!line.empty() && line[0] != '#') keys << "  " << line << "\n";
  keys << "\nExamples:\n  moeforge train examples/demo_recipe.yaml\n"
          "  moeforge train recipe.yaml optimizer.lr=1e-5 steps=200 resume=true\n"
          "  moeforge launch --nproc-per-node 8 -- train recipe.yaml device=cuda ep_size=8";
  auto app = make_app("train", "Full or LoRA fine-tuning from a YAML recipe; key=value arguments override its keys.",
                      keys.str());
  std::string recipe;
  std::vector<std::string> overrides;
  app->add_option("recipe", recipe, "the recipe (YAML); its paths are relative to its folder")->required();
  app->add_option("overrides", overrides, "key=value (dotted keys, values as YAML), e.g. optimizer.lr=1e-5")
      ->always_capture_default(false)
      ->default_str("");
  if (auto code = parse(*app, argv)) return *code;
  train::run_training(train::load_recipe(recipe, overrides));
  return 0;
}

}  // namespace moeforge::cli
