// Batches of tokenized rows: rows truncated to seq_len, optionally packed (whole documents placed
// greedily into rows of at most seq_len tokens; position ids restart and attention stops at each
// document boundary, and no token is trained to predict the next document), a fresh deterministic
// shuffle each epoch (from the seed and the epoch number, so a position in the stream is all resume
// needs), and micro-batches padded on the right. Right padding needs no attention mask under causal
// attention (real tokens never see later pads); pad positions get label -100.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "core/tensor.h"
#include "data/token_jsonl.h"
#include "data/token_store.h"

namespace moeforge::data {

struct DataStats {
  int64_t documents = 0, tokens = 0, truncated = 0, dropped = 0;
  int64_t packed_rows = 0;  // rows after packing (0 without packing)
};

class TokenBatches {
 public:
  // Rows `rows` of `store` (indices, in the order they count as the dataset's; e.g. what
  // hold_out_rows leaves for training), truncated to seq_len; rows of fewer than 2 tokens dropped.
  TokenBatches(std::shared_ptr<const TokenStore> store, std::vector<int64_t> rows, int64_t seq_len, uint64_t seed,
               bool packing = false);
  // Every row of `rows` (moved into a store of their own).
  TokenBatches(std::vector<TokenRow> rows, int64_t seq_len, uint64_t seed, bool packing = false);
  bool packing() const { return packing_; }
  const DataStats& stats() const { return stats_; }
  // Rows a stream position steps over: documents, or packed rows when packing.
  int64_t rows() const { return packing_ ? static_cast<int64_t>(packed_starts_.size()) - 1 : documents(); }
  // The documents kept (the store's rows of 2 or more tokens), each as it is trained: truncated to
  // seq_len, with the store's row index for errors (TokenStore::where).
  int64_t documents() const { return static_cast<int64_t>(docs_.size()); }
  std::span<const TokenId> document_ids(int64_t d) const;
  int64_t document_row(int64_t d) const { return docs_[static_cast<size_t>(d)]; }
  const TokenStore& store() const { return *store_; }

  struct MicroBatch {
    Tensor input_ids, labels;      // [B, S] I64
    Tensor position_ids, doc_ids;  // [B, S] I64, set when packing
    int64_t loss_tokens = 0;       // targets the shifted loss counts
  };
  // Rows [cursor, cursor + n) of the stream (epoch = cursor / rows(), each epoch a fresh shuffle)
  // as one padded micro-batch.
  MicroBatch micro_batch(int64_t cursor, int64_t n) const;

 private:
  const std::vector<int64_t>& order(int64_t epoch) const;
  void build(std::vector<int64_t> rows);  // the documents kept, and the packing
  int64_t length(int64_t d) const;  // document d's trained length

  std::shared_ptr<const TokenStore> store_;
  std::vector<int64_t> docs_;  // the store's rows kept, in dataset order
  int64_t seq_len_ = 0;
  // Packing: packed row p holds documents packed_docs_[packed_starts_[p], packed_starts_[p + 1]).
  std::vector<int64_t> packed_docs_, packed_starts_;
  uint64_t seed_;
  bool packing_ = false;
  DataStats stats_;
  mutable int64_t cached_epoch_ = -1;
  mutable std::vector<int64_t> cached_order_;
};

}  // namespace moeforge::data
