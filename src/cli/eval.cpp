// moeforge eval: the loss of a model (optionally with a LoRA adapter) on a dataset in any training
// format -- text, prompt/completion, messages (loss on the assistant's tokens), input_ids -- row
// by row as Transformers computes it for one row (labels shifted; -100 ignored). Prints one JSON
// object: per-row loss and counted tokens, the mean of the row losses, the token-weighted loss and
// its perplexity.
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "cli/app.h"
#include "cli/commands.h"
#include "cli/inference_options.h"
#include "core/error.h"
#include "data/model_text.h"
#include "hf/safetensors.h"
#include "models/lora.h"
#include "models/pretrained.h"


namespace moeforge::cli {

int cmd_eval(const std::vector<std::string>& argv) {
  auto app = make_app("eval", "Loss and perplexity of a model on a dataset (any training format), row by row.",
                      "\nRows: {\"text\"}, {\"prompt\", \"completion\"} (loss on the completion), {\"messages\"} "
                      "(loss on the\nassistant's tokens, through the chat template) or {\"input_ids\", \"labels\"?}. "
                      "Text rows get the\nend-of-sequence token appended, as in training (--no-eos: not).\n"
                      "Example: moeforge eval --model out/final --data held_out.jsonl");
  std::string model_dir, data, adapter, tokenizer, chat_template, logits_out;
  bool no_eos = false, summary = false;
  app->add_option("--model", model_dir, "Hugging Face model folder")->required();
  auto* o_data = app->add_option("--data", data, "dataset: a .jsonl, .parquet or .arrow file, a folder of them (or one written by datasets' save_to_disk) or a glob");
  auto* o_tokens = app->add_option("--tokens", data, "the same as --data (its older name)");
  o_data->excludes(o_tokens);
  app->add_option("--adapter", adapter, "PEFT LoRA adapter folder, applied unmerged");
  app->add_option("--tokenizer", tokenizer, "folder with tokenizer.json (default: the model's)");
  app->add_option("--chat-template", chat_template, "a chat template file for messages rows (default: the tokenizer's)");
  app->add_flag("--no-eos", no_eos, "do not append the end-of-sequence token to text and completion rows");
  app->add_option("--logits-out", logits_out, "write each row's logits as logits.<row> [S, V] float32 (safetensors)");
  app->add_flag("--summary", summary, "print only the totals, not every row");
  InferenceOptions run;
  run.add_to(*app);
  if (auto code = parse(*app, argv)) return *code;
  MF_CHECK(*o_data || *o_tokens, "eval needs --data FILE (.jsonl, .parquet or .arrow)");
  run.apply_threads();
  const data::ModelText text = data::load_model_text(model_dir, tokenizer, chat_template, !no_eos, "eval");
  const data::Dataset ds = data::load_model_dataset(data, text, /*skip_bad_lines=*/false);
  auto loaded = models::from_pretrained(model_dir);
  // A PEFT LoRA adapter runs beside the base weights, unmerged.
  if (!adapter.empty()) models::apply_adapter_folder(*loaded.model, adapter);
  const auto& cfg = loaded.model->config();
  std::unique_ptr<nn::ParamAccess> on_device;
  nn::ParamAccess* ps = &run.params_for(*loaded.model, on_device);
  const bool tty = ::isatty(STDERR_FILENO);

  nlohmann::ordered_json out;
  out["model"] = model_dir;
  if (!adapter.empty()) out["adapter"] = adapter;
  out["data"] = data;
  std::vector<double> losses;
  std::vector<int64_t> counted;
  hf::NamedTensors logits_rows;
  double weighted = 0;
  int64_t total_tokens = 0;
  for (size_t i = 0; i < ds.rows.size(); ++i) {
    const auto& r = ds.rows[i];
    const std::string where = ds.where(r);
    const int64_t s = static_cast<int64_t>(r.input_ids.size());
    MF_CHECK(s <= cfg.max_position_embeddings, where, ": ", s, " tokens exceed max_position_embeddings (",
             cfg.max_position_embeddings, ") of ", cfg.source);
    for (auto id : r.input_ids)
      MF_CHECK(id >= 0 && id < cfg.vocab_size, where, ": token id ", id, " is outside the vocabulary (", cfg.vocab_size,
               " tokens)");
    const auto& lab = r.labels ? *r.labels : r.input_ids;
    Tensor ids = Tensor::from_i64(std::vector<int64_t>(r.input_ids.begin(), r.input_ids.end()), {1, s});
    Tensor labels = Tensor::from_i64(std::vector<int64_t>(lab.begin(), lab.end()), {1, s});
    models::ForwardInputs in{ids, &labels};
    in.logits = !logits_out.empty();  // without them: the fused LM head + loss, no [S, V] logits
    auto o = loaded.model->forward(*ps, in, loaded.model->parallel());
    // The cross-entropy alone (a load-balancing term is not part of a row's loss here).
    const double row_loss = o.loss_tokens ? o.ce_sum / o.loss_tokens : NAN;
    losses.push_back(row_loss);
    counted.push_back(o.loss_tokens);
    if (o.loss_tokens > 0) {
      weighted += o.ce_sum;
      total_tokens += o.loss_tokens;
    }
    if (!logits_out.empty()) logits_rows.emplace_back("logits." + std::to_string(i), o.logits.view({s, cfg.vocab_size}));
    if (tty) std::fprintf(stderr, "\reval %zu/%zu rows", i + 1, ds.rows.size());
  }
  if (tty) std::fprintf(stderr, "\n");
  auto json_num = [](double v) { return std::isfinite(v) ? nlohmann::ordered_json(v) : nlohmann::ordered_json(nullptr); };
  double mean = 0;
  int64_t n_mean = 0;
  nlohmann::ordered_json per = nlohmann::ordered_json::array();
  for (size_t i = 0; i < losses.size(); ++i) {
    if (!summary) per.push_back({{"line", ds.rows[i].line}, {"loss", json_num(losses[i])}, {"tokens", counted[i]}});
    if (!std::isnan(losses[i])) {
      mean += losses[i];
      ++n_mean;
    }
  }
  if (!summary) out["rows"] = per;
  out["row_count"] = ds.rows.size();
  out["mean_loss"] = json_num(n_mean ? mean / n_mean : NAN);
  const double token_loss = total_tokens ? weighted / total_tokens : NAN;
  out["token_weighted_loss"] = json_num(token_loss);
  out["perplexity"] = json_num(std::exp(token_loss));
  out["loss_tokens"] = total_tokens;
  if (!logits_out.empty()) {
    hf::save_safetensors(logits_out, logits_rows);
    out["logits_out"] = logits_out;
  }
  std::printf("%s\n", out.dump().c_str());
  // A loss that is not finite on counted tokens means broken weights: the numbers above are kept
  // for inspection, but the command fails.
  for (size_t i = 0; i < losses.size(); ++i)
    MF_CHECK(counted[i] == 0 || std::isfinite(losses[i]), "the loss of line ", ds.rows[i].line, " is ", losses[i],
             ": the model's weights hold NaN or Inf");
  return 0;
}

}  // namespace moeforge::cli
