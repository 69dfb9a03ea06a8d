#include "data/token_batches.h"

#include <algorithm>

#include "core/error.h"
#include "data/seeded_order.h"

namespace moeforge::data {

TokenBatches::TokenBatches(std::vector<TokenRow> rows, int64_t seq_len, uint64_t seed, bool packing)
    : seed_(seed), packing_(packing) {
  for (auto& r : rows) {
    ++stats_.documents;
    if (static_cast<int64_t>(r.input_ids.size()) > seq_len) {
      ++stats_.truncated;
      r.input_ids.resize(static_cast<size_t>(seq_len));
      if (r.labels) r.labels->resize(static_cast<size_t>(seq_len));
    }
    if (r.input_ids.size() < 2) {  // nothing to predict
      ++stats_.dropped;
      continue;
    }
    stats_.tokens += static_cast<int64_t>(r.input_ids.size());
    rows_.push_back(std::move(r));
  }
  MF_CHECK(!rows_.empty(), "dataset: no row has the 2 tokens a causal-LM loss needs");
  if (!packing_) return;
  // Pack in a seeded order (epoch -1 of the shuffle), then shuffle the packed rows each epoch.
  const std::vector<int64_t> order = seeded_order(rows_.size(), seed_ * 1000003ull - 1);
  std::vector<TokenRow> packed;
  for (int64_t idx : order) {
    TokenRow& d = rows_[idx];
    const int64_t len = static_cast<int64_t>(d.input_ids.size());
    if (packed.empty() || static_cast<int64_t>(packed.back().input_ids.size()) + len > seq_len) {
      packed.emplace_back();
      packed.back().labels.emplace();
      packed.back().line = d.line;
      doc_lengths_.emplace_back();
    }
    TokenRow& row = packed.back();
    const auto& lab = d.labels ? *d.labels : d.input_ids;
    row.input_ids.insert(row.input_ids.end(), d.input_ids.begin(), d.input_ids.end());
    const size_t first = row.labels->size();
    row.labels->insert(row.labels->end(), lab.begin(), lab.end());
    (*row.labels)[first] = -100;  // nothing predicts a document's first token from the one before
    doc_lengths_.back().push_back(len);
    // The document's tokens now live in the packed row: free them as we go (peak: one copy, not two).
    std::vector<TokenId>().swap(d.input_ids);
    d.labels.reset();
  }
  rows_ = std::move(packed);
  stats_.packed_rows = static_cast<int64_t>(rows_.size());
}

const std::vector<int64_t>& TokenBatches::order(int64_t epoch) const {
  if (epoch != cached_epoch_) {
    cached_order_ = seeded_order(rows_.size(), seed_ * 1000003ull + static_cast<uint64_t>(epoch));
    cached_epoch_ = epoch;
  }
  return cached_order_;
}

const TokenRow& TokenBatches::row_at(int64_t cursor) const {
  const int64_t n = rows();
  return rows_[order(cursor / n)[cursor % n]];
}

namespace {
int64_t row_index(const std::vector<TokenRow>& rows, const TokenRow& r) { return &r - rows.data(); }
}  // namespace

TokenBatches::MicroBatch TokenBatches::micro_batch(int64_t cursor, int64_t n) const {
  int64_t s = 0;
  for (int64_t i = 0; i < n; ++i) s = std::max<int64_t>(s, static_cast<int64_t>(row_at(cursor + i).input_ids.size()));
  std::vector<int64_t> ids(static_cast<size_t>(n * s), 0), labels(static_cast<size_t>(n * s), -100);
  std::vector<int64_t> pos(static_cast<size_t>(n * s), 0), docs(static_cast<size_t>(n * s), -1);
  MicroBatch mb;
  for (int64_t i = 0; i < n; ++i) {
    const TokenRow& r = row_at(cursor + i);
    const auto& lab = r.labels ? *r.labels : r.input_ids;
    for (size_t t = 0; t < r.input_ids.size(); ++t) {
      ids[i * s + t] = r.input_ids[t];
      labels[i * s + t] = lab[t];
      if (t > 0 && lab[t] != -100) ++mb.loss_tokens;
    }
    if (packing_) {
      for (int64_t t = 0; t < s; ++t) pos[i * s + t] = t;  // pads: any position; they are never trained
      int64_t t = 0, doc = 0;
      for (int64_t len : doc_lengths_[row_index(rows_, r)]) {
        for (int64_t k = 0; k < len; ++k, ++t) {
          pos[i * s + t] = k;
          docs[i * s + t] = doc;
        }
        ++doc;
      }
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
