// moeforge cache: what the tokenized-data cache holds (data/token_cache.h), and removing it: every
// file with its data, rows, tokens, size and when a run last wrote or mapped it; --clear removes
// them (all, or those unused for --older-than days), skipping any a running process holds.
#include <cstdio>
#include <ctime>
#include <nlohmann/json.hpp>

#include "cli/app.h"
#include "cli/commands.h"
#include "data/token_cache.h"

namespace moeforge::cli {

namespace {

// The key's lines that say what a file holds: its data files (path only) and its tokenizer.
std::string what_it_holds(const std::string& key) {
  std::string data, tokenizer;
  size_t at = 0;
  while (at < key.size()) {
    const size_t nl = std::min(key.find('\n', at), key.size());
    const std::string line = key.substr(at, nl - at);
    if (line.rfind("data ", 0) == 0) {
      const std::string rest = line.substr(5);
      // "data PATH SIZE MTIME": the path is everything before the last two fields.
      const size_t b = rest.rfind(' '), a = b == std::string::npos ? b : rest.rfind(' ', b - 1);
      data += (data.empty() ? "" : ", ") + (a == std::string::npos ? rest : rest.substr(0, a));
    } else if (line.rfind("tokenizer ", 0) == 0) {
      tokenizer = line.substr(10);
    }
    at = nl + 1;
  }
  return data + (tokenizer.empty() || tokenizer == "none" ? "" : " (tokenizer " + tokenizer + ")");
}

std::string date_of(int64_t t) {
  char buf[32];
  const std::time_t tt = static_cast<std::time_t>(t);
  std::tm tm{};
  ::localtime_r(&tt, &tm);
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M", &tm);
  return buf;
}

}  // namespace

int cmd_cache(const std::vector<std::string>& argv) {
  auto app = make_app("cache",
                      "The tokenized-data cache: each file with the data it holds, its rows, tokens and size, and when "
                      "a run last wrote or read it; --clear removes them.",
                      "\nTraining keeps tokenized rows in this folder (the recipe's data_cache; docs/training.md), so "
                      "that the next run over the same data maps them instead of tokenizing.\n"
                      "Examples: moeforge cache\n"
                      "          moeforge cache --clear --older-than 30");
  std::string dir = data::default_token_cache_dir();
  bool clear = false, json = false;
  double older_than = 0;
  app->add_option("--dir", dir, "the cache folder (default: $MOEFORGE_CACHE_DIR/datasets, $XDG_CACHE_HOME/moeforge/"
                                "datasets or ~/.cache/moeforge/datasets)");
  app->add_flag("--clear", clear, "remove the files (those a running process holds are kept and named)");
  app->add_option("--older-than", older_than, "with --clear: only files no run has used for this many days")
      ->check(CLI::Range(0.0, 1e6));
  app->add_flag("--json", json, "print one JSON object");
  if (auto code = parse(*app, argv)) return *code;
  if (dir.empty()) {
    std::fprintf(stderr, "cache: no cache folder: none of MOEFORGE_CACHE_DIR, XDG_CACHE_HOME or HOME is set (pass --dir)\n");
    return 2;
  }

  const int64_t now = static_cast<int64_t>(std::time(nullptr));
  nlohmann::ordered_json out = {{"dir", dir}, {"files", nlohmann::ordered_json::array()}};
  uint64_t total = 0, freed = 0;
  int listed = 0, removed = 0, kept_busy = 0;
  if (!json) std::printf("%s\n", dir.c_str());
  for (const data::TokenCacheEntry& e : data::list_token_caches(dir)) {
    const double idle_days = static_cast<double>(now - e.last_used) / 86400.0;
    std::string action;
    if (clear && idle_days >= older_than) {
      if (data::remove_token_cache(e.path)) {
        action = "removed";
        freed += e.bytes;
        ++removed;
      } else {
        action = "in use, kept";
        ++kept_busy;
      }
    }
    total += e.bytes;
    ++listed;
    nlohmann::ordered_json f = {{"path", e.path}, {"bytes", e.bytes}, {"last_used", date_of(e.last_used)}};
    if (e.error.empty()) {
      f["rows"] = e.rows;
      f["tokens"] = e.tokens;
      f["holds"] = what_it_holds(e.key);
    } else {
      f["error"] = e.error;
    }
    if (!action.empty()) f["action"] = action;
    if (json) {
      out["files"].push_back(std::move(f));
      continue;
    }
    std::printf("  %s  %8.1f MiB  last used %s  %s%s\n", e.path.substr(e.path.find_last_of('/') + 1).c_str(),
                static_cast<double>(e.bytes) / (1 << 20), date_of(e.last_used).c_str(),
                e.error.empty() ? (std::to_string(e.rows) + " rows, " + std::to_string(e.tokens) + " tokens of " +
                                   what_it_holds(e.key)).c_str()
                                : e.error.c_str(),
                action.empty() ? "" : ("  [" + action + "]").c_str());
  }
  out["bytes"] = total;
  if (clear) out["bytes_removed"] = freed;
  if (json) {
    std::printf("%s\n", out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  } else {
    std::printf("%d file%s, %.1f MiB%s\n", listed - removed, listed - removed == 1 ? "" : "s",
                static_cast<double>(total - freed) / (1 << 20), clear ? " left after --clear" : "");
    if (kept_busy) std::printf("%d in use by a running process, kept\n", kept_busy);
  }
  return 0;
}

}  // namespace moeforge::cli
