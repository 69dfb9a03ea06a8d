// moeforge's public C++ API.
//
//   auto m = moeforge::AutoModelForCausalLM::from_pretrained("Qwen3-30B-A3B");
//   auto out = m.model->forward({ids, &labels});
//   moeforge::save_pretrained(*m.model, m.source_dir, "out/");
#pragma once
#include "core/error.h"
#include "core/tensor.h"
#include "hf/config.h"
#include "models/causal_lm.h"
#include "models/pretrained.h"

namespace moeforge {

struct AutoModelForCausalLM {
  static models::LoadedModel from_pretrained(const std::string& dir, const models::LoadOptions& o = {}) {
    return models::from_pretrained(dir, o);
  }
};
using models::save_pretrained;

}  // namespace moeforge
