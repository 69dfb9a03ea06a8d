// config.json model_type -> model builder.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "models/causal_lm.h"

namespace moeforge::models {

std::unique_ptr<CausalLM> build_model(const hf::ModelConfig& cfg);
std::vector<std::string> supported_model_types();

}  // namespace moeforge::models
