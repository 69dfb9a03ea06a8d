#include "data/token_batches.h"

#include <algorithm>

#include "core/error.h"
#include "data/seeded_order.h"

namespace moeforge::data {

TokenBatches::TokenBatches(std::vector<TokenRow> rows, int64_t seq_len, uint64_t seed, bool packing)
    : store_(TokenStore::from_rows(std::move(rows))), seq_len_(seq_len), seed_(seed), packing_(packing) {
  build(store_->every_row());
}

TokenBatches::TokenBatches(std::shared_ptr<const TokenStore> store, std::vector<int64_t> rows, int64_t seq_len,
                           uint64_t seed, bool packing)
    : store_(std::move(store)), seq_len_(seq_len), seed_(seed), packing_(packing) {
  build(std::move(rows));
}

void TokenBatches::build(std::vector<int64_t> rows) {
  const int64_t seq_len = seq_len_;
  docs_.reserve(rows.size());
  for (int64_t i : rows) {
    MF_CHECK(i >= 0 && static_cast<size_t>(i) < store_->size(), "internal: row ", i, " of a store of ", store_->size());
    ++stats_.documents;
    const auto len = static_cast<int64_t>(store_->row(static_cast<size_t>(i)).length);
    if (len > seq_len) ++stats_.truncated;
    if (std::min(len, seq_len) < 2) {  // nothing to predict
      ++stats_.dropped;
      continue;
    }
    stats_.tokens += std::min(len, seq_len);
    docs_.push_back(i);
  }
  MF_CHECK(!docs_.empty(), "dataset: no row has the 2 tokens a causal-LM loss needs");
  if (!packing_) return;
  // Pack in a seeded order (epoch -1 of the shuffle), greedily: a document starts a new row when it
  // would overflow the current one. Then shuffle the packed rows each epoch.
  const std::vector<int64_t> order = seeded_order(docs_.size(), seed_ * 1000003ull - 1);
  packed_docs_.reserve(docs_.size());
  int64_t fill = 0;
  for (int64_t d : order) {
    const int64_t len = length(d);
    if (packed_starts_.empty() || fill + len > seq_len) {
      packed_starts_.push_back(static_cast<int64_t>(packed_docs_.size()));
      fill = 0;
    }
    packed_docs_.push_back(d);
    fill += len;
  }
  packed_starts_.push_back(static_cast<int64_t>(packed_docs_.size()));
  stats_.packed_rows = this->rows();
}

int64_t TokenBatches::length(int64_t d) const {
  return std::min<int64_t>(static_cast<int64_t>(store_->row(static_cast<size_t>(docs_[static_cast<size_t>(d)])).length),
                           seq_len_);
}

std::span<const TokenId> TokenBatches::document_ids(int64_t d) const {
  return store_->input_ids(static_cast<size_t>(docs_[static_cast<size_t>(d)])).first(static_cast<size_t>(length(d)));
}

const std::vector<int64_t>& TokenBatches::order(int64_t epoch) const {
  if (epoch != cached_epoch_) {
    cached_order_ = seeded_order(static_cast<size_t>(rows()), seed_ * 1000003ull + static_cast<uint64_t>(epoch));
    cached_epoch_ = epoch;
  }
  return cached_order_;
}

TokenBatches::MicroBatch TokenBatches::micro_batch(int64_t cursor, int64_t n) const {
  // Stream row -> its documents (indices into docs_): one unless packing.
  const int64_t total = rows();
  std::vector<std::span<const int64_t>> row_docs(static_cast<size_t>(n));
  std::vector<int64_t> single(static_cast<size_t>(n));
  int64_t s = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t row = order((cursor + i) / total)[static_cast<size_t>((cursor + i) % total)];
    if (packing_) {
      const auto b = static_cast<size_t>(packed_starts_[static_cast<size_t>(row)]);
      const auto e = static_cast<size_t>(packed_starts_[static_cast<size_t>(row) + 1]);
      row_docs[static_cast<size_t>(i)] = std::span<const int64_t>(packed_docs_).subspan(b, e - b);
    } else {
      single[static_cast<size_t>(i)] = row;
      row_docs[static_cast<size_t>(i)] = std::span<const int64_t>(&single[static_cast<size_t>(i)], 1);
    }
    int64_t len = 0;
    for (int64_t d : row_docs[static_cast<size_t>(i)]) len += length(d);
    s = std::max(s, len);
  }
  std::vector<int64_t> ids(static_cast<size_t>(n * s), 0), labels(static_cast<size_t>(n * s), -100);
  std::vector<int64_t> pos(static_cast<size_t>(n * s), 0), docs(static_cast<size_t>(n * s), -1);
  MicroBatch mb;
  for (int64_t i = 0; i < n; ++i) {
    int64_t t = 0, doc = 0;
    if (packing_)
      for (int64_t k = 0; k < s; ++k) pos[i * s + k] = k;  // pads: any position; they are never trained
    for (int64_t d : row_docs[static_cast<size_t>(i)]) {
      const size_t row = static_cast<size_t>(docs_[static_cast<size_t>(d)]);
      const int64_t len = length(d);
      const std::span<const TokenId> in = store_->input_ids(row), lab = store_->labels(row);
      for (int64_t k = 0; k < len; ++k, ++t) {
        ids[i * s + t] = in[static_cast<size_t>(k)];
        // Packed: nothing predicts a document's first token from the one before it.
        labels[i * s + t] = packing_ && k == 0 ? -100 : lab[static_cast<size_t>(k)];
        if (t > 0 && labels[i * s + t] != -100) ++mb.loss_tokens;
        if (packing_) {
          pos[i * s + t] = k;
          docs[i * s + t] = doc;
        }
      }
      ++doc;
    }
  }
  mb.input_ids = Tensor::from_i64(ids, {n, s});
  mb.labels = Tensor::from_i64(labels, {n, s});
  if (packing_) {
    mb.position_ids = Tensor::from_i64(pos, {n, s});
    mb.doc_ids = Tensor::from_i64(docs, {n, s});
  }
  return mb;
}

}  // namespace moeforge::data
