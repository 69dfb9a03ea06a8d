// save_pretrained for a run whose ranks each hold a slice of the experts: one standard Hugging Face
// folder written by the ranks together, without any rank ever holding the whole model. The ranks
// of the first expert-parallel group (world ranks 0 .. ep-1, which between them hold every expert
// once) write the per-expert tensors of their experts, rank 0 also the dense ones, config.json, the
// companion files and the index; shards are numbered model-0000i-of-0000n across the writers.
// A checkpoint read in the fused expert layout cannot be split over files, so then the experts are
// gathered to rank 0, which writes everything. Every rank of the run calls these, in the same order.
#pragma once
#include <string>
#include <vector>

#include "models/causal_lm.h"
#include "models/pretrained.h"

namespace moeforge::models {

// Per parameter: whether it holds a slice of the experts (split over the expert-parallel group).
std::vector<bool> expert_sharded_params(const CausalLM& model, const Parallel& par);

// The files of save_pretrained, into an existing folder every rank sees.
void write_pretrained_files_across(const CausalLM& part, const Parallel& par, const std::string& source_dir,
                                   const std::string& dir, const SaveOptions& opts);

// save_pretrained across ranks: built under a temporary name, renamed by rank 0 once complete.
void save_pretrained_across(const CausalLM& part, const Parallel& par, const std::string& source_dir,
                            const std::string& out_dir, const SaveOptions& opts);

}  // namespace moeforge::models
