// moeforge dataset: a dataset as training will see it, before a long run spends GPU hours on it:
// the rows read (and skipped), their token counts, how many tokens carry the loss, what a seq_len
// would cut, and a few rows rendered with the trained tokens marked -- the check that a chat
// template, a prompt/completion split or an Alpaca/ShareGPT conversion trains what was meant.
// The same loading as `train` and `eval` (tokenizer, chat template, end-of-sequence token); with
// --recipe, a training recipe's own settings, its eval_split and its packing included.
#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "cli/app.h"
#include "cli/commands.h"
#include "core/error.h"
#include "data/model_text.h"
#include "data/token_batches.h"
#include "hf/config.h"
#include "train/recipe.h"

namespace moeforge::cli {

namespace {

// A row's text in runs of trained / untrained tokens (each run decoded on its own, special tokens shown).
nlohmann::ordered_json segments_of(const data::TokenRow& row, const hf::Tokenizer& tok) {
  nlohmann::ordered_json out = nlohmann::ordered_json::array();
  const auto& labels = row.labels ? *row.labels : row.input_ids;
  size_t start = 0;
  for (size_t i = 1; i <= row.input_ids.size(); ++i) {
    const bool trained = labels[start] != -100;
    if (i < row.input_ids.size() && (labels[i] != -100) == trained) continue;
    nlohmann::ordered_json s;
    s["text"] = tok.decode(std::vector<int64_t>(row.input_ids.begin() + start, row.input_ids.begin() + i), false);
    s["trained"] = trained;
    out.push_back(std::move(s));
    start = i;
  }
  return out;
}

}  // namespace

int cmd_dataset(const std::vector<std::string>& argv) {
  auto app = make_app("dataset",
                      "A dataset as training sees it: rows, tokens, the share that carries the loss, what a seq_len "
                      "cuts, and rows rendered with the trained tokens marked [[like this]].",
                      "\nRows in any training format (docs/training.md), jsonl, Parquet or Arrow, loaded exactly as "
                      "`train` loads them.\nExamples: moeforge dataset --model Qwen/Qwen3-30B-A3B --data "
                      "ultrachat/data/train-*.parquet --seq-len 4096 --show 2\n"
                      "          moeforge dataset --recipe recipe.yaml   (its model, data and data settings)");
  std::string model_dir, data, tokenizer, chat_template, recipe_path;
  int64_t seq_len = 0, show = 2;
  bool no_eos = false, skip_bad = false, json = false;
  app->add_option("--recipe", recipe_path,
                  "a training recipe: its model, data, tokenizer, chat_template, add_eos, skip_bad_lines, seq_len, "
                  "packing and eval_split (flags given here win)");
  app->add_option("--model", model_dir, "Hugging Face model folder (its tokenizer, chat template, eos and vocabulary)");
  app->add_option("--data", data, "dataset: a .jsonl, .parquet or .arrow file, a folder of them (or one written by datasets' save_to_disk) or a glob");
  app->add_option("--tokenizer", tokenizer, "folder with tokenizer.json (default: the model's)");
  app->add_option("--chat-template", chat_template, "a chat template file for conversation rows (default: the tokenizer's)");
  app->add_flag("--no-eos", no_eos, "do not append the end-of-sequence token to text and completion rows");
  app->add_option("--seq-len", seq_len, "report the rows longer than this and the tokens it would cut")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 30));
  app->add_option("--show", show, "rows to render with their trained tokens marked (default 2)")
      ->check(CLI::Range(int64_t{0}, int64_t{1000}));
  app->add_flag("--skip-bad-lines", skip_bad, "count malformed rows instead of stopping at the first");
  app->add_flag("--json", json, "print one JSON object");
  if (auto code = parse(*app, argv)) return *code;

  // A recipe fills what the flags did not give.
  bool packing = false;
  double eval_split = 0;
  uint64_t seed = 0;
  if (!recipe_path.empty()) {
    const train::Recipe r = train::load_recipe(recipe_path, {});
    const auto unless_given = [&](const char* flag, auto& value, const auto& from_recipe) {
      if (app->count(flag) == 0) value = from_recipe;
    };
    unless_given("--model", model_dir, r.model);
    unless_given("--data", data, r.data);
    unless_given("--tokenizer", tokenizer, r.tokenizer);
    unless_given("--chat-template", chat_template, r.chat_template);
    unless_given("--no-eos", no_eos, !r.add_eos);
    unless_given("--skip-bad-lines", skip_bad, r.skip_bad_lines);
    unless_given("--seq-len", seq_len, r.seq_len);
    packing = r.packing;
    eval_split = r.eval_split;
    seed = r.seed;
  }
  if (model_dir.empty() || data.empty()) {
    std::fprintf(stderr, "dataset: usage error: --model and --data are required without --recipe (dataset --help lists "
                         "the options)\n");
    return 2;
  }

  const hf::ModelConfig cfg = hf::load_config(model_dir);
  const data::ModelText text = data::load_model_text(model_dir, tokenizer, chat_template, !no_eos, "dataset");
  data::Dataset ds = data::load_model_dataset(data, text, skip_bad);

  int64_t total = 0, trained = 0, longest = 0, shortest = INT64_MAX, longer = 0, cut = 0;
  for (const auto& r : ds.rows) {
    const auto n = static_cast<int64_t>(r.input_ids.size());
    for (const int64_t id : r.input_ids)
      MF_CHECK(id >= 0 && id < cfg.vocab_size, ds.where(r), ": token id ", id, " is outside the vocabulary (",
               cfg.vocab_size, " tokens) of ", cfg.source);
    total += n;
    longest = std::max(longest, n);
    shortest = std::min(shortest, n);
    for (const int64_t l : r.labels ? *r.labels : r.input_ids) trained += l != -100;
    if (seq_len > 0 && n > seq_len) {
      ++longer;
      cut += n - seq_len;
    }
  }
  const auto rows = static_cast<int64_t>(ds.rows.size());
  nlohmann::ordered_json out;
  out["data"] = data;
  out["files"] = ds.files;
  out["rows"] = rows;
  out["skipped"] = ds.skipped_lines;
  out["tokens"] = {{"total", total}, {"min", shortest}, {"mean", static_cast<double>(total) / rows}, {"max", longest}};
  out["trained_tokens"] = trained;
  if (seq_len > 0) out["seq_len"] = {{"value", seq_len}, {"rows_longer", longer}, {"tokens_cut", cut}};
  out["samples"] = nlohmann::ordered_json::array();
  MF_CHECK(show == 0 || text.tokenizer, model_dir, ": no tokenizer.json to render rows with (pass --tokenizer DIR, or --show 0)");
  for (int64_t i = 0; i < std::min(show, rows); ++i) {
    const auto& r = ds.rows[static_cast<size_t>(i)];
    nlohmann::ordered_json s;
    s["where"] = ds.where(r);
    s["tokens"] = r.input_ids.size();
    s["segments"] = segments_of(r, *text.tokenizer);
    out["samples"].push_back(std::move(s));
  }
  // What a recipe's eval_split holds out and its packing makes of the rest, as train computes them.
  std::vector<data::TokenRow> train_rows = std::move(ds.rows);
  if (eval_split > 0) {
    data::HeldOut split = data::hold_out(std::move(train_rows), eval_split, seed, recipe_path + ": key 'eval_split'");
    out["eval_split"] = {{"value", eval_split}, {"rows_held_out", split.eval.size()}, {"rows_trained", split.train.size()}};
    train_rows = std::move(split.train);
  }
  if (packing) {
    MF_CHECK(seq_len > 0, recipe_path, ": packing needs seq_len");
    const data::TokenBatches packed(std::move(train_rows), seq_len, seed, true);
    out["packing"] = {{"documents", packed.stats().documents - packed.stats().dropped},
                      {"rows", packed.stats().packed_rows},
                      {"fill", static_cast<double>(packed.stats().tokens) / static_cast<double>(packed.stats().packed_rows * seq_len)}};
  }
  if (json) {
    std::printf("%s\n", out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
    return 0;
  }
  std::printf("dataset: %lld rows from %zu file%s, %lld skipped\n", static_cast<long long>(rows), ds.files.size(),
              ds.files.size() == 1 ? "" : "s", static_cast<long long>(ds.skipped_lines));
  std::printf("tokens: %lld (per row: min %lld, mean %.1f, max %lld); trained: %lld (%.1f%%)\n",
              static_cast<long long>(total), static_cast<long long>(shortest), static_cast<double>(total) / rows,
              static_cast<long long>(longest), static_cast<long long>(trained), 100.0 * trained / std::max<int64_t>(total, 1));
  if (seq_len > 0)
    std::printf("seq_len %lld: %lld rows longer, %lld tokens cut\n", static_cast<long long>(seq_len),
                static_cast<long long>(longer), static_cast<long long>(cut));
  if (out.contains("eval_split"))
    std::printf("eval_split %g: %lld rows held out for validation, %lld trained on\n", eval_split,
                out["eval_split"]["rows_held_out"].get<long long>(), out["eval_split"]["rows_trained"].get<long long>());
  if (out.contains("packing"))
    std::printf("packing: %lld documents into %lld rows of %lld tokens (%.1f%% filled)\n",
                out["packing"]["documents"].get<long long>(), out["packing"]["rows"].get<long long>(),
                static_cast<long long>(seq_len), 100.0 * out["packing"]["fill"].get<double>());
  for (const auto& s : out["samples"]) {
    std::printf("\n--- %s, %lld tokens (trained tokens in [[ ]]):\n", s["where"].get<std::string>().c_str(),
                s["tokens"].get<long long>());
    std::string shown;
    for (const auto& seg : s["segments"])
      shown += seg["trained"].get<bool>() ? "[[" + seg["text"].get<std::string>() + "]]" : seg["text"].get<std::string>();
    std::printf("%s\n", shown.c_str());
  }
  return 0;
}

}  // namespace moeforge::cli
