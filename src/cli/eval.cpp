// moeforge eval: per-line loss of pre-tokenized rows, as Transformers computes it for one row
// (labels default to input_ids; shifted; -100 ignored). Prints one JSON object on stdout.
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "cli/args.h"
#include "cli/commands.h"
#include "core/error.h"
#include "data/token_jsonl.h"
#include "hf/safetensors.h"
#include "models/lora.h"
#include "models/pretrained.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace moeforge::cli {

int cmd_eval(const std::vector<std::string>& argv) {
  Args args(argv, {"--model", "--tokens", "--logits-out", "--threads", "--adapter"}, {});
  MF_CHECK(args.positionals().empty(), "eval: unexpected argument '", args.positionals().front(), "'");
  const std::string model_dir = args.require("--model");
  const std::string tokens = args.require("--tokens");
#ifdef _OPENMP
  if (auto t = args.get("--threads")) omp_set_num_threads(std::stoi(*t));
#endif
  const auto rows = data::read_token_jsonl(tokens);
  auto loaded = models::from_pretrained(model_dir);
  // A PEFT LoRA adapter runs beside the base weights, unmerged.
  if (const auto adapter = args.get("--adapter")) models::apply_adapter_folder(*loaded.model, *adapter);
  const auto& cfg = loaded.model->config();
  const bool tty = ::isatty(STDERR_FILENO);

  nlohmann::ordered_json out;
  out["model"] = model_dir;
  out["tokens_file"] = tokens;
  std::vector<double> losses;
  std::vector<int64_t> counted;
  hf::NamedTensors logits_out;
  double weighted = 0;
  int64_t total_tokens = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    const auto& r = rows[i];
    const std::string where = tokens + ":" + std::to_string(r.line);
    const int64_t s = static_cast<int64_t>(r.input_ids.size());
    MF_CHECK(s <= cfg.max_position_embeddings, where, ": ", s, " tokens exceed max_position_embeddings (",
             cfg.max_position_embeddings, ") of ", cfg.source);
    for (auto id : r.input_ids)
      MF_CHECK(id >= 0 && id < cfg.vocab_size, where, ": token id ", id, " is outside the vocabulary (", cfg.vocab_size,
               " tokens)");
    Tensor ids = Tensor::from_i64(r.input_ids, {1, s});
    Tensor labels = Tensor::from_i64(r.labels.value_or(r.input_ids), {1, s});
    models::ForwardInputs in{ids, &labels};
    auto o = loaded.model->forward(in);
    losses.push_back(o.loss);
    counted.push_back(o.loss_tokens);
    if (o.loss_tokens > 0) {
      weighted += static_cast<double>(o.loss) * o.loss_tokens;
      total_tokens += o.loss_tokens;
    }
    if (args.get("--logits-out")) logits_out.emplace_back("logits." + std::to_string(i), o.logits.view({s, cfg.vocab_size}));
    if (tty) std::fprintf(stderr, "\reval %zu/%zu rows", i + 1, rows.size());
  }
  if (tty) std::fprintf(stderr, "\n");
  auto json_num = [](double v) { return std::isnan(v) ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(v); };
  nlohmann::ordered_json per = nlohmann::ordered_json::array();
  double mean = 0;
  int64_t n_mean = 0;
  for (size_t i = 0; i < losses.size(); ++i) {
    per.push_back({{"line", rows[i].line}, {"loss", json_num(losses[i])}, {"tokens", counted[i]}});
    if (!std::isnan(losses[i])) {
      mean += losses[i];
      ++n_mean;
    }
  }
  out["rows"] = per;
  out["mean_loss"] = json_num(n_mean ? mean / n_mean : NAN);
  out["token_weighted_loss"] = json_num(total_tokens ? weighted / total_tokens : NAN);
  out["loss_tokens"] = total_tokens;
  if (auto path = args.get("--logits-out")) {
    hf::save_safetensors(*path, logits_out);
    out["logits_out"] = *path;
  }
  std::printf("%s\n", out.dump().c_str());
  // A loss that is not finite on counted tokens means broken weights: the numbers above are kept
  // for inspection, but the command fails.
  for (size_t i = 0; i < losses.size(); ++i)
    MF_CHECK(counted[i] == 0 || std::isfinite(losses[i]), "the loss of line ", rows[i].line, " is ", losses[i],
             ": the model's weights hold NaN or Inf");
  return 0;
}

}  // namespace moeforge::cli
