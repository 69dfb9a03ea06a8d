#include "train/trainer.h"

#include <cmath>
#include <filesystem>
#include <functional>
#include <limits>
#include <optional>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "core/cpus.h"
#include "core/error.h"
#include "core/fnv.h"
#include "ops/ops.h"
#include "core/logging.h"
#include "data/dataset.h"
#include "data/model_text.h"
#include "data/token_cache.h"
#include "data/token_batches.h"
#include "hf/chat/chat_template.h"
#include "hf/tokenizer/tokenizer.h"
#include "hf/fs_util.h"
#include "gpu/fast_paths.h"
#include "hf/safetensors.h"
#include "models/lora.h"
#include "models/pretrained.h"
#include "models/save_across_ranks.h"
#include "parallel/env.h"
#include "ops/cuda/runtime.h"
#include "train/backend.h"
#include "train/checkpoint.h"
#include "train/progress.h"
#include "train/ranks.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace moeforge::train {

namespace fs = std::filesystem;

namespace {

std::string hash_text(const std::string& s) { return hex16(fnv1a(s)); }

// A seed from a run's seed, its step and a micro-batch index (splitmix64 steps).
uint64_t hash_seed(uint64_t seed, uint64_t step, uint64_t micro) {
  uint64_t x = seed;
  for (uint64_t v : {step, micro}) {
    x ^= v + 0x9E3779B97F4A7C15ull + (x << 6) + (x >> 2);
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    x ^= x >> 31;
  }
  return x;
}

// Decides where the run starts: a fresh output folder, or a checkpoint to resume from.
std::string prepare_output(const Recipe& r) {
  const fs::path out(r.output_dir);
  std::string resume_from;
  if (!r.resume.empty()) {
    // What a killed save left: a checkpoint moved aside goes back before the newest is picked.
    if (fs::is_directory(out)) remove_partial_checkpoints(r.output_dir);
    if (r.resume == "true") {
      auto cks = list_checkpoints(r.output_dir);
      MF_CHECK(!cks.empty(), r.source, ": resume=true but ", r.output_dir, " holds no complete checkpoint-* folder");
      resume_from = cks.back();
    } else {
      MF_CHECK(fs::is_directory(r.resume), r.source, ": key 'resume' names ", r.resume, ", which is not a folder");
      resume_from = r.resume;
    }
    fs::create_directories(out);
    return resume_from;
  }
  if (fs::exists(out) && !(fs::is_directory(out) && fs::is_empty(out))) {
    MF_CHECK(r.overwrite, r.source, ": output_dir ", r.output_dir,
             " already exists (set overwrite=true to replace it, or resume=true to continue)");
    // Only replace what looks like a moeforge output, never an arbitrary folder.
    MF_CHECK(fs::exists(out / "recipe.yaml"), r.source, ": output_dir ", r.output_dir,
             " exists and is not a moeforge output folder (no recipe.yaml); refusing to delete it");
    fs::remove_all(out);
  }
  fs::create_directories(out);
  return "";
}

// Every token id trained on is one the model has; an error names the row's file and line.
void check_vocabulary(const data::TokenBatches& rows, const hf::ModelConfig& cfg) {
  for (int64_t d = 0; d < rows.documents(); ++d)
    for (int64_t id : rows.document_ids(d))
      MF_CHECK(id >= 0 && id < cfg.vocab_size, rows.store().where(static_cast<size_t>(rows.document_row(d))),
               ": token id ", id, " is outside the model's vocabulary (", cfg.vocab_size, " tokens)");
}

// The whole model's parameter count from a model that may hold a slice of the experts.
int64_t whole_model_parameters(const models::CausalLM& m) {
  int64_t n = 0;
  for (const auto& p : m.params().all()) {
    const hf::ExpertGroup* g = m.adapter().group_of(p.name);
    const int64_t numel = shape_numel(p.shape);
    n += g ? numel / p.shape[0] * g->experts : numel;
  }
  return n;
}

// This rank's rows of a micro-batch (ranks take equal consecutive slices).
data::TokenBatches::MicroBatch rows_for_rank(const data::TokenBatches::MicroBatch& mb, int rank, int world) {
  const int64_t n = mb.input_ids.size(0) / world, first = rank * n;
  const auto part = [&](const Tensor& t) { return t.defined() ? t.slice0(first, n).clone() : Tensor(); };
  data::TokenBatches::MicroBatch out;
  out.input_ids = part(mb.input_ids);
  out.labels = part(mb.labels);
  out.position_ids = part(mb.position_ids);
  out.doc_ids = part(mb.doc_ids);
  return out;
}

}  // namespace

TrainResult run_training(const Recipe& recipe, const TrainCallbacks& callbacks) {
  Recipe r = recipe;  // seq_len 0 is resolved below, from the model's config
  // Several ranks (launched by moeforge launch, torchrun or srun) split every micro-batch's rows
  // and share out the experts (ep_size), on the CPU (gloo) or one GPU each (NCCL).
  const parallel::DistEnv denv = parallel::dist_env();
  const bool multi = denv.world_size > 1;
  // CPU threads: the recipe's, else this rank's share of the CPUs that are idle now (not the
  // recipe's value: ranks may see different loads, and their recipes must hash the same).
  int64_t threads = r.threads;
  if (threads > 0) {
    const unsigned hw = std::thread::hardware_concurrency();
    MF_CHECK(hw == 0 || threads <= 16 * static_cast<int64_t>(hw), r.source, ": key 'threads': ", threads,
             " is far more than this machine's ", hw, " hardware threads");
  } else {
    threads = std::max<int64_t>(1, core::idle_cpus() / std::max(1, denv.local_world_size));
  }
#ifdef _OPENMP
  omp_set_num_threads(static_cast<int>(threads));
#endif
  if (multi) {
    if (r.device == Device::Kind::CUDA) {
      use_local_gpu(denv, r.source + ": key 'device'");
    }
    MF_CHECK(r.micro_batch % denv.world_size == 0, r.source, ": key 'micro_batch': ", r.micro_batch,
             " rows cannot be split evenly over ", denv.world_size, " ranks");
  } else {
    MF_CHECK(r.ep_size == 1, r.source, ": key 'ep_size': ", r.ep_size, " needs as many ranks (this is one process; "
             "start it with moeforge launch --nproc-per-node N)");
  }
  MF_CHECK(r.zero_stage == 1 || r.device == Device::Kind::CUDA, r.source, ": key 'zero_stage': ", r.zero_stage,
           " shards parameters over GPUs (device: cuda); the CPU ranks keep whole copies");
  MF_CHECK(!r.optimizer_in_backward || r.max_grad_norm <= 0, r.source,
           ": key 'optimizer_in_backward': true applies each layer's update before the whole gradient's norm "
           "exists, so it cannot clip: set max_grad_norm: 0 (it is ", r.max_grad_norm, ")");
  MF_CHECK(!r.optimizer_in_backward || r.global_batch == r.micro_batch, r.source,
           ": key 'optimizer_in_backward': true updates during each backward, so a step cannot accumulate "
           "micro-batches: set global_batch equal to micro_batch (", r.global_batch, " and ", r.micro_batch, ")");
  MF_CHECK(fs::is_directory(r.model), r.source, ": key 'model': folder ", r.model, " does not exist");
  MF_CHECK(r.device != Device::Kind::CUDA || cuda::available(), r.source,
           ": key 'device': cuda, but no CUDA device answers here (or this moeforge was built without the CUDA backend)");
  MF_CHECK(fs::exists(r.data) || r.data.find_first_of("*?[") != std::string::npos, r.source, ": key 'data': ",
           r.data, " does not exist");
  const uint64_t shard_bytes = hf::parse_size(r.max_shard_size);

  // The config first: the sequence length is checked against it before any output is touched (the
  // weights are read once the ranks have joined, each rank only its shard of the experts).
  const hf::ModelConfig cfg = hf::load_config(r.model);
  if (r.seq_len == 0) r.seq_len = std::min<int64_t>(2048, cfg.max_position_embeddings);
  MF_CHECK(r.seq_len <= cfg.max_position_embeddings, r.source, ": seq_len ", r.seq_len,
           " is longer than the model allows (max_position_embeddings ", cfg.max_position_embeddings, " in ",
           cfg.source, ")");
  // The tokenizer when there is one (text rows need it; pre-tokenized rows do not), the chat template
  // for messages rows, the eos id for text rows.
  const data::ModelText text = data::load_model_text(r.model, r.tokenizer, r.chat_template, r.add_eos, r.source);
  // Every rank of a node tokenizes at once: each with its share of the CPUs, as its compute threads.
  const int load_workers = static_cast<int>(std::min<int64_t>(threads, 16));
  // Through the tokenized-data cache unless the recipe turns it off: the first rank of a node to
  // get there tokenizes, with the CPUs the others leave idle while they wait for its file (unless
  // the recipe sets threads), and they (and the next run) read its tokens.
  const std::string cache_dir = r.data_cache == "none" ? "" : r.data_cache.empty() ? data::default_token_cache_dir() : r.data_cache;
  auto load = [&](const std::string& path) {
    return data::load_model_tokens(path, text, r.skip_bad_lines, denv.rank == 0,
                                   cache_dir.empty() || r.threads > 0 ? load_workers : 0, cache_dir);
  };
  const std::shared_ptr<const data::TokenStore> tokens = load(r.data);
  std::vector<int64_t> train_rows = tokens->every_row();
  // Validation rows, batched as the training rows are.
  std::optional<data::TokenBatches> eval_data;
  std::ostringstream eval_source;  // for the start-up lines
  if (r.eval_split > 0) {
    data::HeldOutRows split = data::hold_out_rows(static_cast<int64_t>(tokens->size()), r.eval_split, r.seed,
                                                  r.source + ": key 'eval_split'");
    train_rows = std::move(split.train);
    eval_source << split.eval.size() << " rows held out of " << r.data << " (eval_split " << r.eval_split << ")";
    eval_data.emplace(tokens, std::move(split.eval), r.seq_len, r.seed, r.packing);
    MF_CHECK(eval_data->rows() > 0, r.source, ": key 'eval_split': the held-out rows have no row of 2 or more tokens");
    check_vocabulary(*eval_data, cfg);
  } else if (!r.eval_data.empty()) {
    MF_CHECK(fs::exists(r.eval_data) || r.eval_data.find_first_of("*?[") != std::string::npos, r.source,
             ": key 'eval_data': ", r.eval_data, " does not exist");
    const std::shared_ptr<const data::TokenStore> eval_tokens = load(r.eval_data);
    eval_data.emplace(eval_tokens, eval_tokens->every_row(), r.seq_len, r.seed, r.packing);
    MF_CHECK(eval_data->rows() > 0, r.source, ": key 'eval_data': ", r.eval_data, " has no rows of 2 or more tokens");
    check_vocabulary(*eval_data, cfg);
    eval_source << eval_data->rows() << " rows of " << r.eval_data;
  }
  data::TokenBatches data(tokens, std::move(train_rows), r.seq_len, r.seed, r.packing);
  // A step larger than the dataset would repeat rows inside it (and an absurd value would allocate or
  // loop for ever before the first line of output).
  MF_CHECK(r.global_batch <= data.rows(), r.source, ": key 'global_batch': ", r.global_batch,
           " rows per step, but the dataset has ", data.rows(), r.packing ? " packed" : "",
           " rows; lower global_batch (and micro_batch) to at most that");
  check_vocabulary(data, cfg);

  const std::string recipe_text = r.to_yaml();
  const std::string recipe_hash = hash_text(recipe_text);
  // Every rank joins (with the same recipe) before rank 0 touches the output folder.
  std::unique_ptr<RankGroups> groups;
  if (multi) groups = join_ranks(denv, r.ep_size, cfg.num_experts, recipe_hash, r.source, r.device == Device::Kind::CUDA);
  const bool main_rank = !groups || groups->is_main();
  // The weights, before the output folder is touched: under several ranks each reads (and later
  // holds, updates and writes) only its shard of the experts.
  const models::Parallel par = multi ? groups->parallel() : models::Parallel{};
  auto loaded = models::from_pretrained(r.model, {}, par);
  models::CausalLM& model = *loaded.model;
  const int64_t mtp_depths = r.mtp_loss_scale > 0 ? model.mtp_depths() : 0;
  MF_CHECK(r.mtp_loss_scale <= 0 || mtp_depths > 0, r.source, ": key 'mtp_loss_scale': ", r.mtp_loss_scale,
           ", but ", r.model, " holds no multi-token prediction layers (config.json num_nextn_predict_layers ",
           cfg.num_nextn_predict_layers, ", none of them in the weights)");
  model.set_mtp_trainable(mtp_depths > 0);
  // LoRA: adapters on the targeted projections, everything else frozen (before the optimizer and the
  // device copy are made, so neither holds state for the frozen weights).
  std::optional<models::LoraState> lora;
  if (r.peft_method == "lora") lora = models::apply_lora(model, r.lora, r.seed, r.source);
  std::string resume_from;
  if (main_rank) {
    resume_from = prepare_output(r);
    // A resumed run continues the same training: what would change it is an error unless asked for.
    const fs::path saved_recipe = fs::path(r.output_dir) / "recipe.yaml";
    if (!resume_from.empty() && !r.resume_allow_changes && fs::exists(saved_recipe)) {
      const auto changed = changed_training_keys(hf::read_text_file(saved_recipe.string()), recipe_text);
      std::string list;
      for (const auto& c : changed) list += (list.empty() ? "" : "; ") + c;
      MF_CHECK(changed.empty(), r.source, ": resuming with a recipe that changes the training (", list,
               "); set resume_allow_changes: true to continue anyway");
    }
    hf::write_text_file_atomic(saved_recipe.string(), recipe_text);
  }
  if (multi) resume_from = groups->rendezvous->broadcast("resume_from", resume_from);

  const int64_t accumulation = r.global_batch / r.micro_batch;
  const int64_t total_steps =
      r.steps > 0 ? r.steps : static_cast<int64_t>(std::ceil(r.epochs * data.rows() / r.global_batch));
  TrainerState st;
  st.seed = r.seed;
  st.total_steps = total_steps;
  st.recipe_hash = recipe_hash;
  // A checkpoint from any world size is resharded on load.
  // On a GPU the moments live on the device: host ones exist only to resume from and to write.
  AdamW opt(model.params(), r.optimizer, /*allocate_state=*/r.device != Device::Kind::CUDA);
  if (!resume_from.empty()) {
    const TrainerState saved = load_checkpoint(resume_from, model, opt);
    if (saved.seed != r.seed) log::warn("resuming with seed ", r.seed, " but the checkpoint used ", saved.seed);
    st.step = saved.step;
    st.cursor = saved.cursor;
  }
  if (multi) {
    groups->expert_sharded = models::expert_sharded_params(model, par);
    groups->zero_stage = r.zero_stage;
  }
  // After a resume has loaded the host state, so a GPU backend uploads what was restored.
  std::unique_ptr<StepBackend> backend = r.device == Device::Kind::CUDA
                                             ? make_gpu_backend(model, opt, r.precision, groups.get())
                                             : make_cpu_backend(model, opt, groups.get());

  const auto& ds = data.stats();
  std::ostringstream intro;
  intro << "data: " << ds.documents << " documents, " << ds.tokens << " tokens, " << ds.truncated
        << " truncated to seq_len " << r.seq_len << ", " << ds.dropped << " dropped (under 2 tokens)";
  if (tokens->skipped_lines()) intro << ", " << tokens->skipped_lines() << " malformed lines skipped";
  if (r.packing) intro << ", packed into " << ds.packed_rows << " rows";
  intro << "\n"
        << "model: " << cfg.model_type << ", " << whole_model_parameters(model) << " parameters; " << total_steps
        << " steps of " << r.global_batch << " rows (" << accumulation << " micro-batches of " << r.micro_batch << ")"
        << " on " << backend->describe();
  if (r.device == Device::Kind::CPU) intro << ", " << threads << (threads == 1 ? " thread" : " threads");
  if (r.device == Device::Kind::CUDA)
    for (const std::string& n : gpu::fast_path_notes(cfg, r.precision != "fp32", r.packing)) intro << "\nnote: " << n;
  if (eval_data)
    intro << "\nvalidation: " << eval_source.str() << ", every "
          << (r.eval_every > 0 ? std::to_string(r.eval_every) + " steps and " : std::string()) << "at the end"
          << (r.save_best ? "; the best kept in " + (fs::path(r.output_dir) / "best").string() : std::string());
  if (lora) {
    int64_t trainable = 0;
    for (const auto& p : model.params().all())
      if (p.lora) trainable += shape_numel(p.shape);
    intro << "\nLoRA: rank " << r.lora.rank << ", alpha " << r.lora.alpha << " on " << lora->modules.size()
          << " projections (" << trainable << " trainable parameters; the base is frozen)";
  }
  if (!resume_from.empty()) intro << "\nresuming from " << resume_from << " at step " << st.step;

  if (multi) intro << "\nranks: " << denv.world_size << " (" << denv.source << "), ep_size " << r.ep_size << ": "
                     << cfg.num_experts / r.ep_size << " experts and " << r.micro_batch / denv.world_size
                     << " rows of each micro-batch per rank"
                     << (r.device == Device::Kind::CUDA ? (r.zero_stage == 3 ? "; ZeRO-3: dense weights, gradients and AdamW moments split"
                                                                  : "; ZeRO-1: dense AdamW moments split")
                                            : "");
  // metrics.jsonl keeps only the steps before the resume point.
  const std::string metrics_path = (fs::path(r.output_dir) / "metrics.jsonl").string();
  if (main_rank && !resume_from.empty() && fs::exists(metrics_path)) {
    std::istringstream in(hf::read_text_file(metrics_path));
    std::string line, kept;
    while (std::getline(in, line)) {
      try {
        if (nlohmann::json::parse(line).value("step", int64_t{0}) <= st.step) kept += line + "\n";
      } catch (const nlohmann::json::exception&) {
      }
    }
    hf::write_text_file_atomic(metrics_path, kept);
  }
  // Rank 0 prints and writes metrics; the others compute the same numbers silently.
  std::optional<Progress> progress;
  if (main_rank) {
    progress.emplace(metrics_path, st.step, !resume_from.empty());
    if (r.report_to == "tensorboard") progress->report_to_tensorboard((fs::path(r.output_dir) / "tensorboard").string());
    progress->message(intro.str());
  }

  // Writes checkpoint-<step> and removes the oldest beyond save_total_limit; returns its folder.
  // Under several ranks every rank writes its part.
  // Nothing non-finite is ever saved: the weights (each rank its part, the verdict agreed over the
  // world) are checked before a checkpoint or the final folder is written from them.
  auto check_finite_weights = [&] {
    std::vector<Tensor> values;
    for (const auto& p : model.params().all())
      if (p.value.defined()) values.push_back(p.value);
    double bad = std::isfinite(ops::global_grad_norm(values)) ? 0.0 : 1.0;
    if (multi) bad = sum_over_world(*groups, bad);
    MF_CHECK(bad == 0, "training diverged: the weights hold NaN or Inf after step ", st.step,
             "; nothing was saved from them (the last checkpoint is intact; lower optimizer.lr or set max_grad_norm)");
  };
  auto save_and_prune = [&](bool keep_host_copies) {
    backend->sync_to_host();
    check_finite_weights();
    const std::string dir = (fs::path(r.output_dir) / ("checkpoint-" + std::to_string(st.step))).string();
    save_checkpoint(dir, model, r.model, opt, st, shard_bytes, multi ? &par : nullptr, lora ? &*lora : nullptr);
    if (main_rank) {
      auto cks = list_checkpoints(r.output_dir);
      for (size_t i = 0; i + static_cast<size_t>(r.save_total_limit) < cks.size(); ++i) prune_checkpoint(cks[i]);
    }
    if (multi) groups->world_group->barrier();  // pruned before any rank goes on
    if (!keep_host_copies) backend->release_host_copies();
    return dir;
  };
  // The model as a folder: a Hugging Face folder, or the PEFT adapter under LoRA (from the host
  // copies the backend last synchronised).
  models::SaveOptions so;
  so.max_shard_bytes = shard_bytes;
  so.overwrite = true;
  auto save_model_folder = [&](const std::string& dir) {
    if (lora) {
      if (multi) models::save_adapter_across(model, *lora, par, r.model, dir);  // ends with a barrier
      else models::save_adapter(model, *lora, r.model, dir, /*overwrite=*/true);
    } else if (multi) {
      models::save_pretrained_across(model, par, r.model, dir, so);  // ends with a barrier
    } else {
      models::save_pretrained(model, r.model, dir, so);
    }
  };
  // Validation: the token-weighted cross-entropy over eval_data (at most eval_max_batches
  // micro-batches), every rank taking its slice of each micro-batch as in training.
  double best_eval = std::numeric_limits<double>::infinity();
  auto validate = [&] {
    const int64_t rows = eval_data->rows();
    int64_t batches = (rows + r.micro_batch - 1) / r.micro_batch;
    if (r.eval_max_batches > 0) batches = std::min(batches, r.eval_max_batches);
    double ce = 0;
    int64_t tokens = 0;
    for (int64_t b = 0; b < batches; ++b) {
      // The last micro-batch takes the rows left (rounded up to a multiple of the ranks, the extra
      // ones from the start of the data).
      int64_t n = std::min(r.micro_batch, rows - b * r.micro_batch);
      if (multi) n = std::min(r.micro_batch, (n + denv.world_size - 1) / denv.world_size * denv.world_size);
      auto mb = eval_data->micro_batch(b * r.micro_batch, n);
      if (multi) mb = rows_for_rank(mb, denv.rank, denv.world_size);
      models::ForwardInputs in{mb.input_ids, &mb.labels};
      in.logits = false;
      if (eval_data->packing()) {
        in.position_ids = &mb.position_ids;
        in.doc_ids = &mb.doc_ids;
      }
      const auto o = backend->evaluate(in);
      ce += o.ce_sum;
      tokens += o.loss_tokens;
    }
    if (multi) {
      ce = sum_over_world(*groups, ce);
      tokens = static_cast<int64_t>(sum_over_world(*groups, static_cast<double>(tokens)));
    }
    const double loss = tokens ? ce / static_cast<double>(tokens) : NAN;
    MF_CHECK(std::isfinite(loss), "validation loss is ", loss, " at step ", st.step, " (", tokens,
             " counted tokens in eval_data)");
    if (progress) progress->eval(st.step, loss, tokens);
    if (main_rank && callbacks.on_eval) callbacks.on_eval(st.step, loss);
    if (r.save_best && loss < best_eval) {
      best_eval = loss;
      backend->sync_to_host();
      check_finite_weights();
      const std::string best = (fs::path(r.output_dir) / "best").string();
      save_model_folder(best);
      if (main_rank)
        hf::write_text_file_atomic((fs::path(best) / "best.json").string(),
                                   nlohmann::ordered_json{{"step", st.step}, {"eval_loss", loss}}.dump() + "\n");
      backend->release_host_copies();
      if (progress) progress->message("saved " + best + " (the lowest validation loss so far)");
    }
  };
  TrainResult result;
  const bool aux = cfg.output_router_logits;
  for (; st.step < total_steps;) {
    backend->zero_grad();
    std::vector<data::TokenBatches::MicroBatch> micro;
    int64_t tokens = 0;
    std::vector<int64_t> mtp_tokens(static_cast<size_t>(mtp_depths), 0);
    for (int64_t a = 0; a < accumulation; ++a) {
      micro.push_back(data.micro_batch(st.cursor + a * r.micro_batch, r.micro_batch));
      tokens += micro.back().loss_tokens;  // of the whole micro-batch: the loss is its mean
      for (int64_t k = 0; k < mtp_depths; ++k)
        mtp_tokens[k] += models::counted_targets(
            models::mtp_targets(micro.back().labels, data.packing() ? &micro.back().doc_ids : nullptr, k + 1));
      if (multi) micro.back() = rows_for_rank(micro.back(), denv.rank, denv.world_size);
    }
    models::TrainStepOptions o;
    o.ce_scale = tokens > 0 ? 1.f / static_cast<float>(tokens) : 0.f;
    for (int64_t k = 0; k < mtp_depths; ++k)
      o.mtp_scales.push_back(mtp_tokens[k] > 0 ? static_cast<float>(r.mtp_loss_scale / mtp_depths / mtp_tokens[k]) : 0.f);
    o.aux_scale = aux ? static_cast<float>(cfg.router_aux_loss_coef / accumulation) : 0.f;
    o.activation_checkpointing = r.activation_checkpointing;
    const double lr = r.optimizer.lr * lr_multiplier(r.schedule, st.step, total_steps);
    if (r.optimizer_in_backward) o.on_grads_ready = backend->begin_step_in_backward(lr);
    double ce = 0, aux_sum = 0;
    std::vector<double> mtp_ce(static_cast<size_t>(mtp_depths), 0.0);
    for (size_t k = 0; k < micro.size(); ++k) {
      auto& mb = micro[k];
      // LoRA dropout: a fresh mask per micro-step, the same on every rank of it (from the step and index).
      if (lora && r.lora.dropout > 0)
        o.lora_dropout_seed = hash_seed(r.seed, static_cast<uint64_t>(st.step), static_cast<uint64_t>(k));
      models::ForwardInputs in{mb.input_ids, &mb.labels};
      if (data.packing()) {
        in.position_ids = &mb.position_ids;
        in.doc_ids = &mb.doc_ids;
      }
      auto res = backend->forward_backward(in, o);
      ce += res.ce_sum;
      if (aux) aux_sum += res.aux_loss;
      for (size_t k = 0; k < res.mtp_ce_sums.size(); ++k) mtp_ce[k] += res.mtp_ce_sums[k];
    }
    st.cursor += r.global_batch;
    if (multi) {
      ce = sum_over_world(*groups, ce);
      for (double& v : mtp_ce) v = sum_over_world(*groups, v);
    }
    double grad_norm;
    if (r.optimizer_in_backward) {
      grad_norm = backend->end_step_in_backward();
    } else {
      grad_norm = backend->finish_gradients(r.max_grad_norm);
      // A non-finite gradient would make every weight NaN: stop before applying it.
      MF_CHECK(std::isfinite(grad_norm), "training diverged: the gradient norm is ", grad_norm, " at step ",
               st.step + 1, "; the update was not applied and nothing was saved from it (lower optimizer.lr or set "
               "max_grad_norm)");
      backend->step(lr);
    }
    ++st.step;
    StepMetrics m;
    m.step = st.step;
    m.total = total_steps;
    m.loss = (tokens ? ce / tokens : 0.0) + (aux ? cfg.router_aux_loss_coef * aux_sum / accumulation : 0.0);
    if (aux) m.aux_loss = aux_sum / accumulation;
    if (mtp_depths > 0) {
      m.mtp_loss = 0;
      for (int64_t k = 0; k < mtp_depths; ++k) m.mtp_loss += (mtp_tokens[k] ? mtp_ce[k] / mtp_tokens[k] : 0.0) / mtp_depths;
    }
    m.lr = lr;
    m.grad_norm = grad_norm;
    m.tokens = tokens;
    MF_CHECK(std::isfinite(m.loss), "training diverged: loss is ", m.loss, " at step ", st.step,
             " (lower optimizer.lr or set max_grad_norm)");
    result.losses.push_back(m.loss);
    if (progress) progress->step(m, st.step % r.log_every == 0 || st.step == total_steps);
    if (main_rank && callbacks.on_step) callbacks.on_step(m);
    if (eval_data && r.eval_every > 0 && st.step % r.eval_every == 0) validate();
    if (r.save_every > 0 && st.step % r.save_every == 0 && st.step < total_steps) save_and_prune(false);
  }
  if (eval_data && !(r.eval_every > 0 && st.step % r.eval_every == 0)) validate();  // once at the end
  result.final_dir = (fs::path(r.output_dir) / "final").string();
  result.steps_done = static_cast<int64_t>(result.losses.size());
  if (progress) progress->finish();
  const std::string last = save_and_prune(/*keep_host_copies=*/true);  // the final folder is written from them
  save_model_folder(result.final_dir);
  if (main_rank)
    progress->message("saved " + result.final_dir + (lora ? " (PEFT LoRA adapter) and " : " (Hugging Face folder) and ") +
                      last);
  return result;
}

}  // namespace moeforge::train
