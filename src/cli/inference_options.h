// Where eval and generate run a loaded model: --device, --precision (the GPU copy's weights) and
// --threads, the same flags and meaning for both commands.
#pragma once
#include <CLI/CLI.hpp>
#include <cstdint>
#include <memory>
#include <string>

#include "models/causal_lm.h"
#include "nn/params.h"

namespace moeforge::cli {

struct InferenceOptions {
  std::string device = "cpu", precision = "bf16";
  int64_t threads = 0;
  void add_to(CLI::App& app);
  // Sets the CPU threads (when given); call once the flags are parsed.
  void apply_threads() const;
  // The parameters to run `model` on: its own (the CPU), or a copy uploaded to the GPU (whose
  // slower paths are noted on stderr); `holder` keeps that copy alive.
  nn::ParamAccess& params_for(models::CausalLM& model, std::unique_ptr<nn::ParamAccess>& holder) const;
};

}  // namespace moeforge::cli
