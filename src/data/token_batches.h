// Batches of tokenized rows: rows truncated to seq_len, optionally packed (whole documents placed
// greedily into rows of at most seq_len tokens; position ids restart and attention stops at each
// document boundary, and no token is trained to predict the next document), a fresh deterministic
// shuffle each epoch (from the seed and the epoch number, so a position in the stream is all resume
// needs), and micro-batches padded on the right. Right padding needs no attention mask under causal
// attention (real tokens never see later pads); pad positions get label -100.
#pragma once
#include <cstdint>
#include <vector>

#include "core/tensor.h"
#include "data/token_jsonl.h"

namespace moeforge::data {

struct DataStats {
  int64_t documents = 0, tokens = 0, truncated = 0, dropped = 0;
  int64_t packed_rows = 0;  // rows after packing (0 without packing)
};

class TokenBatches {
 public:
  TokenBatches(std::vector<TokenRow> rows, int64_t seq_len, uint64_t seed, bool packing = false);
  bool packing() const { return packing_; }
  const DataStats& stats() const { return stats_; }
  int64_t rows() const { return static_cast<int64_t>(rows_.size()); }
  // The row at position `cursor` of the endless shuffled stream (epoch = cursor / rows()).
  const TokenRow& row_at(int64_t cursor) const;

  struct MicroBatch {
    Tensor input_ids, labels;      // [B, S] I64
    Tensor position_ids, doc_ids;  // [B, S] I64, set when packing
    int64_t loss_tokens = 0;       // targets the shifted loss counts
  };
  // Rows [cursor, cursor + n) of the stream as one padded micro-batch.
  MicroBatch micro_batch(int64_t cursor, int64_t n) const;

 private:
  const std::vector<int64_t>& order(int64_t epoch) const;
  std::vector<TokenRow> rows_;
  std::vector<std::vector<int64_t>> doc_lengths_;  // per packed row: its documents' lengths
  uint64_t seed_;
  bool packing_ = false;
  DataStats stats_;
  mutable int64_t cached_epoch_ = -1;
  mutable std::vector<int64_t> cached_order_;
};

}  // namespace moeforge::data
