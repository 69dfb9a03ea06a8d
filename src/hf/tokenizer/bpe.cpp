#include "hf/tokenizer/bpe.h"

#include <queue>

#include "core/error.h"
#include "hf/tokenizer/components.h"
#include "hf/tokenizer/text.h"

namespace moeforge::hf::tok {

Bpe::Bpe(const nlohmann::json& m, const std::string& where) {
  MF_CHECK(m.contains("vocab") && m["vocab"].is_object(), where, ": model.vocab must be an object");
  for (auto it = m["vocab"].begin(); it != m["vocab"].end(); ++it) {
    const int64_t id = token_id(it.value(), where + ": model.vocab['" + it.key() + "']");
    vocab_[it.key()] = id;
    if (static_cast<int64_t>(id_to_token_.size()) <= id) id_to_token_.resize(static_cast<size_t>(id) + 1);
    id_to_token_[id] = it.key();
  }
  auto get_str = [&](const char* k) {
    return m.contains(k) && m[k].is_string() ? m[k].get<std::string>() : std::string();
  };
  prefix_ = get_str("continuing_subword_prefix");
  suffix_ = get_str("end_of_word_suffix");
  fuse_unk_ = m.value("fuse_unk", false);
  byte_fallback_ = m.value("byte_fallback", false);
  ignore_merges_ = m.value("ignore_merges", false);
  const std::string unk = get_str("unk_token");
  if (!unk.empty()) {
    MF_CHECK(vocab_.count(unk), where, ": model.unk_token '", unk, "' is not in the vocabulary");
    unk_id_ = vocab_[unk];
  }
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    auto it = vocab_.find(name);
    byte_ids_[b] = it == vocab_.end() ? -1 : it->second;
  }
  MF_CHECK(m.contains("merges") && m["merges"].is_array(), where, ": model.merges must be a list");
  int32_t rank = 0;
  for (const auto& mj : m["merges"]) {
    std::string a, b;
    if (mj.is_string()) {  // "a b" (older files)
      const std::string s = mj.get<std::string>();
      const auto sp = s.find(' ', 1);
      MF_CHECK(sp != std::string::npos, where, ": merge '", s, "' is not two tokens separated by a space");
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else {
      MF_CHECK(mj.is_array() && mj.size() == 2, where, ": each merge must be \"a b\" or [a, b]");
      a = mj[0].get<std::string>();
      b = mj[1].get<std::string>();
    }
    auto ia = vocab_.find(a), ib = vocab_.find(b);
    MF_CHECK(ia != vocab_.end() && ib != vocab_.end(), where, ": merge '", a, " ", b, "' uses a token not in the vocabulary");
    std::string merged = a + b.substr(std::min(b.size(), prefix_.size() && b.rfind(prefix_, 0) == 0 ? prefix_.size() : 0));
    auto im = vocab_.find(merged);
    MF_CHECK(im != vocab_.end(), where, ": merge '", a, " ", b, "' makes '", merged, "', which is not in the vocabulary");
    merges_.emplace(key(ia->second, ib->second), std::make_pair(rank++, im->second));
  }
}

std::optional<int64_t> Bpe::token_to_id(const std::string& t) const {
  auto it = vocab_.find(t);
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

const std::string* Bpe::id_to_token(int64_t id) const {
  if (id < 0 || id >= static_cast<int64_t>(id_to_token_.size()) || id_to_token_[id].empty()) return nullptr;
  return &id_to_token_[id];
}

void Bpe::merge_word(std::vector<int64_t>& sym) const {
  // Lowest rank first, leftmost first among equal ranks; entries made stale by earlier merges are
  // skipped when popped (the same order as the tokenizers library's heap).
  const size_t n = sym.size();
  if (n < 2) return;
  std::vector<int64_t> prev(n), next(n);
  std::vector<bool> alive(n, true);
  for (size_t i = 0; i < n; ++i) {
    prev[i] = static_cast<int64_t>(i) - 1;
    next[i] = i + 1 < n ? static_cast<int64_t>(i + 1) : -1;
  }
  using Entry = std::tuple<int32_t, int64_t, int64_t>;  // rank, position, merged id
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
  auto push = [&](int64_t i) {
    if (i < 0 || next[i] < 0) return;
    auto it = merges_.find(key(sym[i], sym[next[i]]));
    if (it != merges_.end()) heap.emplace(it->second.first, i, it->second.second);
  };
  for (size_t i = 0; i + 1 < n; ++i) push(static_cast<int64_t>(i));
  while (!heap.empty()) {
    auto [rank, i, merged] = heap.top();
    heap.pop();
    if (!alive[i] || next[i] < 0) continue;
    auto it = merges_.find(key(sym[i], sym[next[i]]));
    if (it == merges_.end() || it->second.second != merged) continue;
    const int64_t j = next[i];
    sym[i] = merged;
    alive[j] = false;
    next[i] = next[j];
    if (next[j] >= 0) prev[next[j]] = i;
    push(prev[i]);
    push(i);
  }
  std::vector<int64_t> out;
  for (int64_t i = 0; i >= 0; i = next[i]) out.push_back(sym[i]);
  sym = std::move(out);
}

void Bpe::encode_word(const std::string& word, std::vector<int64_t>& out) const {
  if (word.empty()) return;
  if (ignore_merges_) {
    auto it = vocab_.find(word);
    if (it != vocab_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  CacheShard& shard = cache_[std::hash<std::string>()(word) % kCacheShards];
  {
    std::lock_guard<std::mutex> lock(shard.mutex);
    auto it = shard.words.find(word);
    if (it != shard.words.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int64_t> sym;
  bool last_unk = false;
  size_t i = 0;
  while (i < word.size()) {
    const size_t start = i;
    text::next_codepoint(word, i);
    std::string piece = word.substr(start, i - start);
    if (start > 0 && !prefix_.empty()) piece = prefix_ + piece;
    if (i == word.size() && !suffix_.empty()) piece += suffix_;
    auto it = vocab_.find(piece);
    if (it != vocab_.end()) {
      sym.push_back(it->second);
      last_unk = false;
      continue;
    }
    if (byte_fallback_) {
      bool all = true;
      for (size_t k = start; k < i && all; ++k) all = byte_ids_[static_cast<uint8_t>(word[k])] >= 0;
      if (all) {
        for (size_t k = start; k < i; ++k) sym.push_back(byte_ids_[static_cast<uint8_t>(word[k])]);
        last_unk = false;
        continue;
      }
    }
    MF_CHECK(unk_id_.has_value(), "tokenizer: character '", word.substr(start, i - start),
             "' is not in the vocabulary and the model has no unk_token");
    if (!(fuse_unk_ && last_unk)) sym.push_back(*unk_id_);
    last_unk = true;
  }
  merge_word(sym);
  out.insert(out.end(), sym.begin(), sym.end());
  std::lock_guard<std::mutex> lock(shard.mutex);
  if (shard.words.size() < kCachedWordsPerShard && word.size() < 256) shard.words.emplace(word, std::move(sym));
}

}  // namespace moeforge::hf::tok
