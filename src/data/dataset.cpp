#include "data/dataset.h"

#include <glob.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <regex>
#include <set>
#include <thread>
#include <nlohmann/json.hpp>

#include "core/cpus.h"
#include "core/error.h"
#include "core/logging.h"
#include "data/row_formats.h"
#include "data/seeded_order.h"
#include "data/table_files.h"
#include "hf/chat/chat_template.h"
#include "hf/tokenizer/tokenizer.h"
#include "hf/fs_util.h"

namespace moeforge::data {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// The top-level fields a row may use (the rest of a Parquet or Arrow file's columns are not read).
const std::vector<std::string> kRowFields = {"input_ids", "labels", "text", "prompt", "completion", "messages",
                                             "tools", "chat_template_kwargs", "conversations", "system",
                                             "instruction", "input", "output", "history"};

// The split a file of a Hugging Face dataset folder belongs to, from its name: "train" for
// train-00000-of-00003.parquet or train.jsonl, "test_sft" for test_sft-00001-of-00002.parquet; ""
// for a name that says none.
std::string split_of(const fs::path& file) {
  static const std::regex shard(R"(^(.+)-\d{5}-of-\d{5}$)");
  static const std::vector<std::string> splits = {"train", "test", "validation", "valid", "val", "dev", "eval"};
  const std::string stem = file.stem().string();
  std::smatch m;
  if (std::regex_match(stem, m, shard)) return m[1].str();
  if (std::find(splits.begin(), splits.end(), stem) != splits.end()) return stem;
  // The datasets cache's single-file splits: NAME-train.arrow beside NAME-test.arrow.
  for (const auto& sp : splits)
    if (stem.size() > sp.size() + 1 && stem.compare(stem.size() - sp.size() - 1, std::string::npos, "-" + sp) == 0)
      return stem;
  return "";
}

// A folder written by `datasets`' save_to_disk: state.json lists its Arrow files in order; a
// DatasetDict's folder holds one such folder per split (dataset_dict.json names them).
std::optional<std::vector<std::string>> saved_dataset_files(const fs::path& dir) {
  if (fs::exists(dir / "dataset_dict.json")) {
    const auto dict = hf::read_json_file((dir / "dataset_dict.json").string());
    MF_CHECK(dict.contains("splits") && dict["splits"].is_array() && !dict["splits"].empty(), (dir / "dataset_dict.json").string(),
             ": field 'splits' must be a non-empty list");
    std::string names;
    for (const auto& sp : dict["splits"]) names += (names.empty() ? "" : ", ") + (sp.is_string() ? sp.get<std::string>() : sp.dump());
    const std::string first = dict["splits"][0].is_string() ? dict["splits"][0].get<std::string>() : "train";
    MF_THROW(dir.string(), ": a saved DatasetDict with the splits ", names, " (dataset_dict.json); choose one, e.g. ",
             (dir / first).string());
  }
  if (!fs::exists(dir / "state.json")) return std::nullopt;
  const std::string state_path = (dir / "state.json").string();
  const auto state = hf::read_json_file(state_path);
  MF_CHECK(state.contains("_data_files") && state["_data_files"].is_array() && !state["_data_files"].empty(), state_path,
           ": field '_data_files' must be a non-empty list (a folder written by datasets' save_to_disk)");
  std::vector<std::string> files;
  for (size_t i = 0; i < state["_data_files"].size(); ++i) {
    const auto& f = state["_data_files"][i];
    MF_CHECK(f.is_object() && f.contains("filename") && f["filename"].is_string(), state_path, ": _data_files[", i,
             "] must be an object with a string 'filename'");
    const std::string name = f["filename"].get<std::string>();
    MF_CHECK(name.find('/') == std::string::npos && name != ".." && fs::exists(dir / name), state_path, ": _data_files[", i,
             "]: ", (dir / name).string(), " is missing");
    files.push_back((dir / name).string());
  }
  return files;
}

}  // namespace

std::vector<std::string> dataset_files(const std::string& path) {
  std::vector<std::string> files;
  if (fs::is_directory(path)) {
    if (auto saved = saved_dataset_files(path)) return *saved;
    std::set<std::string> splits;
    for (const auto& de : fs::directory_iterator(path))
      if (de.is_regular_file() && (de.path().extension() == ".jsonl" || is_table_file(de.path().string()))) {
        files.push_back(de.path().string());
        if (const std::string split = split_of(de.path()); !split.empty()) splits.insert(split);
      }
    std::sort(files.begin(), files.end());
    MF_CHECK(!files.empty(), path, ": folder has no *.jsonl, *.parquet or *.arrow files");
    // A dataset folder as the hub lays it out holds every split: training on all of them would
    // train on the test rows. One is chosen with a glob.
    if (splits.size() > 1) {
      std::string names;
      for (const auto& sp : splits) names += (names.empty() ? "" : ", ") + sp;
      const std::string first = splits.count("train") ? "train" : *splits.begin();
      MF_THROW(path, ": folder holds the splits ", names, " (by their file names); choose one with a glob, e.g. ",
               (fs::path(path) / (first + "*")).string());
    }
    return files;
  }
  if (path.find_first_of("*?[") != std::string::npos) {
    glob_t g{};
    if (::glob(path.c_str(), 0, nullptr, &g) == 0)
      for (size_t i = 0; i < g.gl_pathc; ++i) files.push_back(g.gl_pathv[i]);
    ::globfree(&g);
    std::sort(files.begin(), files.end());
    MF_CHECK(!files.empty(), path, ": no file matches");
    return files;
  }
  MF_CHECK(fs::exists(path), path, ": no such file");
  return {path};
}

namespace {

std::string string_field(const nlohmann::ordered_json& j, const char* key, const std::string& where) {
  MF_CHECK(j[key].is_string(), where, ": field '", key, "' must be a string");
  return j[key].get<std::string>();
}

TokenRow messages_row(const nlohmann::ordered_json& j, const std::string& where, const DatasetOptions& o) {
  const auto& messages = j["messages"];
  MF_CHECK(messages.is_array() && !messages.empty(), where, ": field 'messages' must be a non-empty list");
  for (size_t i = 0; i < messages.size(); ++i) {
    const auto& m = messages[i];
    MF_CHECK(m.is_object() && m.contains("role") && m["role"].is_string(), where, ": messages[", i,
             "] must be an object with a string 'role'");
    MF_CHECK(!m.contains("content") || m["content"].is_string() || m["content"].is_null() || m["content"].is_array(),
             where, ": messages[", i, "].content must be a string, a list of parts or null");
  }
  MF_CHECK(o.tokenizer, where, ": messages rows need a tokenizer (the model folder's tokenizer.json, or set 'tokenizer')");
  MF_CHECK(o.chat_template, where, ": messages rows need a chat template, and ", o.chat_template_origin,
           " has none (tokenizer_config.json 'chat_template' or chat_template.jinja); or set recipe key chat_template");
  const hf::ChatOptions opts = hf::chat_options_of(j, where);
  hf::ChatEncoding enc;
  try {
    enc = o.chat_template->encode(*o.tokenizer, messages, opts);
  } catch (const Error& e) {
    MF_THROW(where, ": ", e.what());
  }
  TokenRow r;
  r.input_ids.assign(enc.ids.begin(), enc.ids.end());
  r.labels = std::vector<TokenId>(r.input_ids.size(), -100);
  int64_t trained = 0;
  for (size_t k = 0; k < r.input_ids.size(); ++k)
    if (enc.assistant_mask[k]) {
      (*r.labels)[k] = r.input_ids[k];
      ++trained;
    }
  MF_CHECK(trained > 0, where, ": the conversation has no assistant tokens to train on");
  return r;
}

TokenRow parse_row(const nlohmann::ordered_json& j, const std::string& where, const DatasetOptions& o) {
  MF_CHECK(j.is_object(), where, ": each line must be a JSON object");
  if (j.contains("input_ids")) {
    return token_row_of(j, where);  // without labels: every token trained
  }
  if (j.contains("messages")) return messages_row(j, where, o);
  const bool text = j.contains("text"), pc = j.contains("prompt") || j.contains("completion");
  // A ShareGPT or Alpaca row that also holds its formatted "text" (as some do) trains on that text.
  if (!text && !pc) {
    if (auto conversation = sharegpt_conversation(j, where)) return messages_row(*conversation, where, o);
    if (auto conversation = alpaca_conversation(j, where)) return messages_row(*conversation, where, o);
  }
  MF_CHECK(text || pc, where, ": row has none of the known fields (input_ids, messages, conversations, text, "
           "prompt/completion, instruction/output)");
  MF_CHECK(o.tokenizer, where, ": text rows need a tokenizer (the model folder's tokenizer.json, or set 'tokenizer')");
  TokenRow r;
  if (text) {
    const auto ids = o.tokenizer->encode(string_field(j, "text", where), true);
    r.input_ids.assign(ids.begin(), ids.end());
    if (o.eos_id) r.input_ids.push_back(static_cast<TokenId>(*o.eos_id));  // every token trained: no labels
  } else {
    MF_CHECK(j.contains("prompt") && j.contains("completion"), where, ": a prompt row needs both 'prompt' and 'completion'");
    // The prompt gets the tokenizer's special tokens (BOS), the completion none; loss on the completion.
    auto p = o.tokenizer->encode(string_field(j, "prompt", where), true);
    auto c = o.tokenizer->encode(string_field(j, "completion", where), false);
    if (o.eos_id) c.push_back(*o.eos_id);
    r.input_ids.assign(p.begin(), p.end());
    r.input_ids.insert(r.input_ids.end(), c.begin(), c.end());
    r.labels = std::vector<TokenId>(p.size(), -100);
    r.labels->insert(r.labels->end(), c.begin(), c.end());
  }
  MF_CHECK(!r.input_ids.empty(), where, ": row encodes to no tokens");
  return r;
}

}  // namespace

TokenRow parse_dataset_line(const std::string& line, const std::string& where, const DatasetOptions& o) {
  nlohmann::ordered_json j;  // ordered: chat templates see the keys in the file's order (tojson)
  hf::check_json_depth(line, where);
  try {
    j = nlohmann::ordered_json::parse(line);
  } catch (const nlohmann::ordered_json::exception& e) {
    MF_THROW(where, ": invalid JSON (", e.what(), ")");
  }
  return parse_row(j, where, o);
}


namespace {

// Rows waiting to be parsed and tokenized: a jsonl line or a table row's JSON, with its number and
// where errors name it.
struct PendingRow {
  int64_t n = 0;
  std::string where, line;
  nlohmann::ordered_json json;
  bool from_table = false;
};

int worker_count(int asked) {
  if (asked > 0) return asked;
  return static_cast<int>(std::clamp<int64_t>(core::idle_cpus(), 1, 16));
}

}  // namespace

Dataset load_dataset(const DatasetOptions& o) {
  Dataset d;
  d.files = dataset_files(o.path);
  const auto t0 = std::chrono::steady_clock::now();
  auto last_report = t0;
  LoadProgress progress;
  progress.files = d.files.size();
  const int workers = worker_count(o.workers);
  // Rows are parsed and tokenized in batches, each split over the workers, and taken in file
  // order: the rows, their errors and what is skipped are those of one thread.
  constexpr size_t kBatch = 4096;
  std::vector<PendingRow> pending;
  pending.reserve(kBatch);
  std::vector<std::optional<TokenRow>> parsed;
  std::vector<std::exception_ptr> failed;
  const auto parse_one = [&](size_t i) {
    PendingRow& p = pending[i];
    try {
      TokenRow r = p.from_table ? parse_row(p.json, p.where, o) : parse_dataset_line(p.line, p.where, o);
      r.input_ids.shrink_to_fit();  // a dataset's rows are most of a large load's memory
      if (r.labels) r.labels->shrink_to_fit();
      r.line = p.n;
      parsed[i] = std::move(r);
    } catch (...) {
      failed[i] = std::current_exception();
    }
  };
  // A malformed row is fatal, or skipped and counted (the first five named) with skip_bad_lines.
  const auto flush = [&] {
    parsed.assign(pending.size(), std::nullopt);
    failed.assign(pending.size(), nullptr);
    const size_t threads = std::min<size_t>(static_cast<size_t>(workers), pending.size());
    if (threads <= 1) {
      for (size_t i = 0; i < pending.size(); ++i) parse_one(i);
    } else {
      std::atomic<size_t> next{0};
      std::vector<std::thread> pool;
      for (size_t w = 0; w < threads; ++w)
        pool.emplace_back([&] {
          for (size_t i = next++; i < pending.size(); i = next++) parse_one(i);
        });
      for (auto& t : pool) t.join();
    }
    for (size_t i = 0; i < pending.size(); ++i) {
      if (failed[i]) {
        try {
          std::rethrow_exception(failed[i]);
        } catch (const Error& e) {
          if (!o.skip_bad_lines) throw;
          if (d.skipped_lines < 5) log::warn("skipping ", e.what());
          ++d.skipped_lines;
        }
        continue;
      }
      parsed[i]->file = static_cast<int32_t>(progress.file_number - 1);
      d.rows.push_back(std::move(*parsed[i]));
    }
    pending.clear();
    if (o.on_progress) {
      const auto now = std::chrono::steady_clock::now();
      if (std::chrono::duration<double>(now - last_report).count() >= o.progress_seconds) {
        last_report = now;
        progress.rows = static_cast<int64_t>(d.rows.size());
        progress.skipped = d.skipped_lines;
        progress.seconds = std::chrono::duration<double>(now - t0).count();
        o.on_progress(progress);
      }
    }
  };
  for (const auto& file : d.files) {
    progress.file = file;
    ++progress.file_number;
    if (is_table_file(file)) {
      // Rows counted from 1, as lines are.
      for_each_table_row(file, kRowFields, [&](int64_t row, nlohmann::ordered_json&& j) {
        PendingRow p;
        p.n = row + 1;
        p.where = file + ": row " + std::to_string(row + 1);
        p.json = std::move(j);
        p.from_table = true;
        pending.push_back(std::move(p));
        if (pending.size() == kBatch) flush();
      });
      flush();  // a file's rows carry its number
      continue;
    }
    std::ifstream in(file);
    MF_CHECK(in.good(), file, ": cannot open (", std::strerror(errno), ")");
    std::string line;
    int64_t n = 0;
    while (std::getline(in, line)) {
      ++n;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      PendingRow p;
      p.n = n;
      p.where = file + ":" + std::to_string(n);
      p.line = std::move(line);
      pending.push_back(std::move(p));
      if (pending.size() == kBatch) flush();
    }
    flush();
  }
  MF_CHECK(!d.rows.empty(), o.path, ": no usable rows", d.skipped_lines ? " (all malformed lines were skipped)" : "");
  return d;
}

std::string Dataset::where(const TokenRow& r) const {
  return where_in_file(files.at(static_cast<size_t>(r.file)), r.line);
}

HeldOutRows hold_out_rows(int64_t n, double fraction, uint64_t seed, const std::string& where) {
  const int64_t k = std::max<int64_t>(1, std::llround(fraction * static_cast<double>(n)));
  MF_CHECK(fraction > 0 && fraction < 1 && k < n, where, ": eval_split ", fraction, " of ", n,
           " rows leaves no row to train on");
  const std::vector<int64_t> order = seeded_order(static_cast<size_t>(n), seed * 1000003ull + 7919);
  std::vector<char> held(static_cast<size_t>(n), 0);
  for (int64_t i = 0; i < k; ++i) held[static_cast<size_t>(order[static_cast<size_t>(i)])] = 1;
  HeldOutRows out;
  for (int64_t i = 0; i < n; ++i) (held[static_cast<size_t>(i)] ? out.eval : out.train).push_back(i);
  return out;
}

HeldOut hold_out(std::vector<TokenRow> rows, double fraction, uint64_t seed, const std::string& where) {
  const HeldOutRows split = hold_out_rows(static_cast<int64_t>(rows.size()), fraction, seed, where);
  HeldOut out;
  for (int64_t i : split.train) out.train.push_back(std::move(rows[static_cast<size_t>(i)]));
  for (int64_t i : split.eval) out.eval.push_back(std::move(rows[static_cast<size_t>(i)]));
  return out;
}

RankSlice rank_slice(int64_t global_batch, int64_t rank, int64_t world) {
  MF_CHECK(world >= 1 && rank >= 0 && rank < world, "data rank ", rank, " is outside a world of ", world);
  MF_CHECK(global_batch % world == 0, "global_batch ", global_batch, " must be a multiple of the data-parallel size ",
           world);
  const int64_t count = global_batch / world;
  return {rank * count, count};
}

}  // namespace moeforge::data
