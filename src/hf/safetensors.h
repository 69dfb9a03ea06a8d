// safetensors files and checkpoint folders (single file or sharded with model.safetensors.index.json).
// Reading memory-maps the file and validates everything before any tensor is handed out: header
// length against the file size, the JSON, dtype names, shapes, byte lengths, and that the tensors
// tile the data area exactly (in range, no overlap, no gap), as the reference Rust reader requires.
// Writing goes to a temporary name, is fsynced and renamed, so a crash never leaves a torn file.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace moeforge::hf {

struct TensorEntry {
  std::string name;
  DType dtype;
  Shape shape;
  uint64_t begin = 0, end = 0;  // byte offsets inside the data area
};

class SafetensorsFile {
 public:
  static SafetensorsFile open(const std::string& path);
  // Parses and validates a header against a data area of `data_bytes`; `where` names the source in errors.
  static std::vector<TensorEntry> parse_header(const std::string& json_text, uint64_t data_bytes,
                                               const std::string& where,
                                               std::map<std::string, std::string>* metadata);

  const std::string& path() const { return path_; }
  const std::vector<TensorEntry>& entries() const { return entries_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  const TensorEntry& entry(const std::string& name) const;
  // A zero-copy tensor over the mapped bytes; the mapping stays alive while any tensor refers to it.
  Tensor get(const std::string& name) const;

 private:
  std::string path_;
  std::shared_ptr<void> mapping_;
  const char* data_ = nullptr;  // start of the data area
  std::vector<TensorEntry> entries_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// All tensors of a checkpoint folder, wherever they are stored.
class SafetensorsCheckpoint {
 public:
  // Reads `dir/model.safetensors.index.json` if present, else `dir/model.safetensors`, else every
  // `*.safetensors` in the folder.
  static SafetensorsCheckpoint open(const std::string& dir);
  std::vector<std::string> names() const;  // sorted
  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  const TensorEntry& entry(const std::string& name) const;
  Tensor get(const std::string& name) const;
  const std::string& file_of(const std::string& name) const;
  const std::string& dir() const { return dir_; }

 private:
  std::string dir_;
  std::vector<SafetensorsFile> files_;
  std::map<std::string, size_t> where_;  // tensor -> index in files_
};

using NamedTensors = std::vector<std::pair<std::string, Tensor>>;

// Writes one file atomically (tmp + fsync + rename). Metadata defaults to {"format": "pt"}.
void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

// Writes `tensors` into `dir` as Hugging Face does: one `model.safetensors` when everything fits in
// `max_shard_bytes`, else `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`.
// Tensors keep their order; a tensor larger than the limit gets a shard of its own.
// Returns the file names written.
std::vector<std::string> save_sharded(const std::string& dir, const NamedTensors& tensors,
                                      uint64_t max_shard_bytes);

// save_sharded's grouping: tensors in order, a new shard whenever the next would pass the limit.
std::vector<NamedTensors> split_into_shards(const NamedTensors& tensors, uint64_t max_shard_bytes);

// "5GB", "500MB", "24KB", "1GiB", or a plain byte count.
uint64_t parse_size(const std::string& text);

}  // namespace moeforge::hf
