// from_pretrained / save_pretrained: a Hugging Face model folder in, the same kind of folder out.
#pragma once
#include <memory>
#include <string>

#include "models/causal_lm.h"

namespace moeforge::models {

struct LoadOptions {
  DType compute_dtype = DType::F32;  // the CPU reference computes in fp32
};

struct LoadedModel {
  std::unique_ptr<CausalLM> model;
  hf::LoadReport report;
  std::string source_dir;
};

// `par`: build the model for this rank's groups (its shard of the experts) and read only what it
// holds from the checkpoint.
LoadedModel from_pretrained(const std::string& dir, const LoadOptions& opts = {}, const Parallel& par = {});

struct SaveOptions {
  uint64_t max_shard_bytes = 5'000'000'000ull;  // Transformers' default "5GB"
  bool overwrite = false;
};

// Writes config.json (every original field kept), the weights under the checkpoint's own names and
// dtypes (sharded with an index when over max_shard_bytes), and copies generation_config.json and
// tokenizer files from `source_dir` when present. The folder is built under a temporary name,
// fsynced and renamed, so `out_dir` is never half written.
void save_pretrained(const CausalLM& model, const std::string& source_dir, const std::string& out_dir,
                     const SaveOptions& opts = {});

// The files of save_pretrained written into an existing folder, without the folder swap (for
// callers that build a larger folder atomically themselves, such as training checkpoints).
void write_pretrained_files(const CausalLM& model, const std::string& source_dir, const std::string& dir,
                            const SaveOptions& opts = {});

// Pieces of the above for writers that share a folder (models/save_across_ranks.h):
// config.json and the companion files; the temporary folder `out_dir` is built in (its name, from
// `tag`; begin_folder creates it empty, and an existing `out_dir` needs `overwrite`); and its swap
// into place once complete.
void write_config_and_companions(const CausalLM& model, const std::string& source_dir, const std::string& dir);
std::string temp_folder_of(const std::string& out_dir, const std::string& tag);
std::string begin_folder(const std::string& out_dir, bool overwrite, const std::string& tag);
void finish_folder(const std::string& tmp_dir, const std::string& out_dir);

}  // namespace moeforge::models
