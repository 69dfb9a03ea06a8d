// The BPE model of tokenizer.json: vocabulary, ranked merges, unknown-token and byte-fallback
// handling, `ignore_merges`, subword prefix/suffix, and a cache of encoded words (thread-safe).
#pragma once
#include <array>
#include <cstdint>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace moeforge::hf::tok {

class Bpe {
 public:
  Bpe(const nlohmann::json& model, const std::string& where);
  // Appends the ids of one pre-tokenized word.
  void encode_word(const std::string& word, std::vector<int64_t>& out) const;
  std::optional<int64_t> token_to_id(const std::string& t) const;
  const std::string* id_to_token(int64_t id) const;
  int64_t vocab_size() const { return static_cast<int64_t>(id_to_token_.size()); }

 private:
  struct PairHash {
    size_t operator()(uint64_t k) const { return std::hash<uint64_t>()(k * 0x9E3779B97F4A7C15ull); }
  };
  static uint64_t key(int64_t a, int64_t b) { return (static_cast<uint64_t>(a) << 32) | static_cast<uint32_t>(b); }
  void merge_word(std::vector<int64_t>& symbols) const;

  std::unordered_map<std::string, int64_t> vocab_;
  std::vector<std::string> id_to_token_;
  std::unordered_map<uint64_t, std::pair<int32_t, int64_t>, PairHash> merges_;  // (a, b) -> (rank, merged id)
  std::optional<int64_t> unk_id_;
  std::string prefix_, suffix_;
  bool fuse_unk_ = false, byte_fallback_ = false, ignore_merges_ = false;
  int64_t byte_ids_[256];
  // Encoded words, in shards by the word's hash so that datasets tokenized on many threads
  // (data::load_dataset) do not queue on one lock.
  struct CacheShard {
    std::mutex mutex;
    std::unordered_map<std::string, std::vector<int64_t>> words;
  };
  static constexpr size_t kCacheShards = 32;
  static constexpr size_t kCachedWordsPerShard = 200000 / kCacheShards;
  mutable std::array<CacheShard, kCacheShards> cache_;
};

}  // namespace moeforge::hf::tok
