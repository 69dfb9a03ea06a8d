// State-dict adapters: Hugging Face tensor names <-> the internal fused layout, both ways.
// Everything maps one to one except expert groups: the hub stores one tensor per expert and
// projection (`...experts.{e}.gate_proj.weight`), Transformers 5 in memory (and some checkpoints)
// a fused `...experts.gate_up_proj` [E, 2I, H] and `...experts.down_proj` [E, H, I]. Loading
// accepts either per group and remembers which; saving writes the layout and dtypes it loaded.
// A model that holds a slice of the experts (expert parallelism) loads and exports that slice.
#pragma once
#include <map>
#include <set>
#include <string>
#include <vector>

#include "hf/safetensors.h"
#include "nn/params.h"

namespace moeforge::hf {

struct ExpertGroup {
  std::string prefix;        // "model.layers.3.mlp.experts."
  std::string gate_up, down;  // internal names of the fused tensors
  // gate_suffix empty: ungated experts (Nemotron-H), whose fused `gate_up` tensor holds only up rows.
  std::string gate_suffix = "gate_proj.weight", up_suffix = "up_proj.weight", down_suffix = "down_proj.weight";
  // The per-expert tensors the fused `gate_up` tensor stacks by rows, in order.
  std::vector<std::string> gate_up_parts() const {
    return gate_suffix.empty() ? std::vector<std::string>{up_suffix} : std::vector<std::string>{gate_suffix, up_suffix};
  }
  int64_t experts = 0;  // in the whole model
  // Under expert parallelism the fused tensors hold experts [first, first + their first dimension)
  // of the model's; loading reads those experts only, and export names them by their model index.
  int64_t first = 0;
  // False where checkpoints hold only the fused tensors (GPT-OSS), possibly MXFP4-quantised as
  // `<name>_blocks` + `<name>_scales` (dequantised on load, transposed as Transformers does).
  bool per_expert = true;
  // More fused tensors of the group, expert-major like gate_up/down (GPT-OSS's biases).
  std::vector<std::string> fused_extra;
  // The fused weights are stored [E, in, out] (GPT-OSS's), not [E, out, in] as Transformers 5's
  // other families hold them.
  bool transposed = false;
};

struct LoadReport {
  int64_t tensors_expected = 0, tensors_found = 0;
  std::vector<std::string> unexpected;  // in the checkpoint, used by nothing (warned about)
};

class StateDictAdapter {
 public:
  void add_expert_group(ExpertGroup g);
  // Checkpoint names that are read and ignored (e.g. lm_head.weight when embeddings are tied).
  void ignore(const std::string& name) { ignored_.insert(name); }
  // A parameter the checkpoint names differently from Transformers' in-memory name (Mixtral's
  // router: block_sparse_moe.gate.weight on disk, mlp.gate.weight in memory). Loading takes either;
  // saving writes the one loaded (the checkpoint name when nothing was).
  void rename(const std::string& internal, const std::string& checkpoint) { renames_[internal] = checkpoint; }
  // Checkpoint tensors under `prefix` that the model knowingly does not use (DeepSeek-V3's
  // multi-token prediction layers): reported once, not as unexpected, and not saved.
  void ignore_prefix(const std::string& prefix, std::string why) { ignored_prefixes_.emplace_back(prefix, std::move(why)); }
  // A checkpoint tensor that is a stored copy of another parameter (DeepSeek-V3's multi-token
  // prediction layers keep copies of the embedding and output head they share with the main model):
  // not read on load (the parameter comes from its own name; the copy may be absent), and written
  // on save with the parameter's value when the loaded checkpoint had it.
  void copy_of(const std::string& checkpoint, const std::string& internal) { copies_[checkpoint] = internal; }
  // FP8 checkpoints (quantization_config fp8): weights stored as e4m3 with `<name>_scale_inv` per
  // [rows, cols] block are dequantised on load.
  void set_fp8_blocks(int64_t rows, int64_t cols) {
    fp8_rows_ = rows;
    fp8_cols_ = cols;
  }

  // Fills every parameter from the checkpoint, converting to `compute` dtype. Throws naming the
  // file and tensor on a missing tensor or a shape the config does not imply.
  LoadReport load(const SafetensorsCheckpoint& ckpt, nn::ParamStore& params, DType compute);
  // The checkpoint spelling of every parameter, in the layout and dtypes that were loaded
  // (per-expert hub names and the model's dtype when nothing was loaded).
  NamedTensors export_tensors(const nn::ParamStore& params, std::optional<DType> default_dtype) const;
  // The names a hub-layout checkpoint of this model holds, with shapes (for `inspect`).
  std::vector<std::pair<std::string, Shape>> expected_hub_tensors(const nn::ParamStore& params) const;

  // The expert group an internal parameter belongs to (null for every other parameter); an expert
  // LoRA adapter ("<fused>.lora_A.weight", "<fused>.lora_B.weight") belongs to its experts' group.
  const ExpertGroup* group_of(const std::string& internal) const;
  // Whether a checkpoint tensor name belongs to an expert group (per-expert or fused).
  bool in_expert_group(const std::string& name) const;
  // Whether any expert group was loaded in the fused layout (export then writes fused tensors).
  bool any_fused() const { return !fused_loaded_.empty(); }
  // Whether any tensor was dequantised on load (the saved folder then holds plain weights, and its
  // config.json drops `quantization_config`).
  bool dequantized() const { return !dequantized_.empty(); }
  // Takes the layout and dtypes another adapter of the same architecture loaded (a whole-model copy
  // of an expert-parallel model, written in the layout its shards were read from).
  void adopt_layout(const StateDictAdapter& other) {
    fused_loaded_ = other.fused_loaded_;
    source_dtype_ = other.source_dtype_;
    loaded_as_ = other.loaded_as_;
    dequantized_ = other.dequantized_;
    copies_found_ = other.copies_found_;
  }

 private:
  std::vector<ExpertGroup> groups_;
  std::map<std::string, size_t> group_index_;  // internal fused name -> group
  std::set<std::string> ignored_;
  std::set<std::string> fused_loaded_;             // groups (by prefix) found fused in the checkpoint
  std::map<std::string, DType> source_dtype_;      // checkpoint name -> dtype it had
  std::map<std::string, std::string> renames_;     // internal -> checkpoint name
  std::map<std::string, std::string> copies_;      // checkpoint name -> the internal parameter it copies
  std::set<std::string> copies_found_;             // the copies the loaded checkpoint held
  std::map<std::string, std::string> loaded_as_;   // internal -> the name it was loaded under
  std::set<std::string> dequantized_;              // internal names read from quantised tensors
  std::vector<std::pair<std::string, std::string>> ignored_prefixes_;  // prefix, why
  int64_t fp8_rows_ = 0, fp8_cols_ = 0;
  // The name an ungrouped parameter is saved under.
  std::string checkpoint_name(const std::string& internal) const;
  // A checkpoint tensor of the shape the config implies, dequantised when it is FP8 with scales.
  Tensor read_weight(const SafetensorsCheckpoint& ckpt, const std::string& name, const Shape& want,
                     std::set<std::string>& used);
};

}  // namespace moeforge::hf
