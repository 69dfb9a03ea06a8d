// generation_config.json: what a checkpoint says about generating from it (the stop tokens and the
// sampling defaults Transformers' generate() starts from), with config.json's eos/bos ids as the
// fallback Transformers uses when the folder has no generation config.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace moeforge::hf {

struct GenerationConfig {
  std::vector<int64_t> eos_token_ids;  // an int or a list in the file
  std::optional<int64_t> bos_token_id, pad_token_id;
  bool do_sample = false;
  std::optional<double> temperature, top_p, repetition_penalty;
  std::optional<int64_t> top_k, max_new_tokens, max_length;
  std::string source;  // the file the values came from ("" when neither file has any)
};

// From a model folder: generation_config.json when present (a malformed file or a field of the
// wrong type is an error naming the file and field), else config.json's token ids.
GenerationConfig load_generation_config(const std::string& model_dir);

}  // namespace moeforge::hf
