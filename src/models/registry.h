// config.json model_type -> model builder.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "models/causal_lm.h"

namespace moeforge::models {

// `par`: the rank's groups in a multi-rank run (they must outlive the model).
std::unique_ptr<CausalLM> build_model(const hf::ModelConfig& cfg, const Parallel& par = {});
std::vector<std::string> supported_model_types();

}  // namespace moeforge::models
