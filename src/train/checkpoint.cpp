#include "train/checkpoint.h"

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fault_injection.h"
#include "hf/fs_util.h"
#include "hf/safetensors.h"
#include "parallel/expert_exchange.h"
#include "models/pretrained.h"
#include "models/save_across_ranks.h"

namespace moeforge::train {

namespace fs = std::filesystem;

namespace {

// The experts a model holds, as one range over the model's E (the same for every expert group;
// count = E and first = 0 without expert parallelism).
struct ExpertRange {
  int64_t first = 0, count = 0, experts = 0;
};

ExpertRange expert_range(const models::CausalLM& model) {
  ExpertRange r;
  for (const auto& p : model.params().all())
    if (const hf::ExpertGroup* g = model.adapter().group_of(p.name)) return {g->first, p.shape[0], g->experts};
  return r;
}

// This rank's tensors for its part: its experts' slices, and (part 0) the dense parameters.
hf::NamedTensors part_tensors(const models::CausalLM& model, const AdamW& opt, bool with_dense) {
  hf::NamedTensors out;
  const auto& all = model.params().all();
  for (size_t i = 0; i < all.size(); ++i) {
    if (!with_dense && !model.adapter().group_of(all[i].name)) continue;
    if (all[i].frozen) continue;  // LoRA's frozen base: it comes from the recipe's model on resume
    out.emplace_back("param." + all[i].name, all[i].value);
    out.emplace_back("exp_avg." + all[i].name, opt.exp_avg(i));
    out.emplace_back("exp_avg_sq." + all[i].name, opt.exp_avg_sq(i));
  }
  return out;
}

std::string part_name(int index, int parts) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "part-%05d-of-%05d.safetensors", index, parts);
  return buf;
}

}  // namespace

void save_checkpoint(const std::string& dir, const models::CausalLM& model, const std::string& source_dir,
                     const AdamW& opt, const TrainerState& st, uint64_t max_shard_bytes, const models::Parallel* par,
                     const models::LoraState* lora) {
  const bool multi = par && par->world && par->world->size() > 1;
  const int rank = multi ? par->world->rank() : 0;
  const int parts = multi && par->ep ? par->ep->size() : 1;  // the first expert-parallel group writes
  const fs::path out(dir);
  // One temporary folder for every rank (a shared file system), prepared by rank 0.
  const fs::path tmp = models::temp_folder_of(dir, multi ? std::string("ranks") : std::to_string(::getpid()));
  const auto barrier = [&] {
    if (multi) par->world->barrier();
  };
  if (rank == 0) {
    core::fault_point("remove a stale temporary checkpoint");
    fs::remove_all(tmp);
    core::fault_point("create the temporary checkpoint");
    fs::create_directories(tmp / "training_state");
  }
  barrier();
  try {
    models::SaveOptions so;
    so.max_shard_bytes = max_shard_bytes;
    if (lora) {
      // A LoRA run's checkpoint holds its adapter (experts gathered over the expert-parallel group),
      // not the frozen base.
      if (multi) models::write_adapter_files_across(model, *lora, *par, source_dir, tmp.string());
      else models::write_adapter_files(model, *lora, source_dir, tmp.string());
    } else if (multi) {
      models::write_pretrained_files_across(model, *par, source_dir, tmp.string(), so);
    } else {
      models::write_pretrained_files(model, source_dir, tmp.string(), so);
    }
    if (rank < parts)
      hf::save_safetensors((tmp / "training_state" / part_name(rank, parts)).string(), part_tensors(model, opt, rank == 0));
    barrier();  // every part exists
    if (rank == 0) {
      const ExpertRange mine = expert_range(model);
      nlohmann::ordered_json list = nlohmann::ordered_json::array();
      for (int p = 0; p < parts; ++p) {  // part p holds the experts of rank p of the expert-parallel group
        const parallel::ExpertShard shard = parallel::ExpertShard::of(mine.experts, p, parts);
        list.push_back({{"file", part_name(p, parts)}, {"expert_first", shard.first}, {"expert_count", shard.count}});
      }
      nlohmann::ordered_json j = {{"format", 2},           {"step", st.step},
                                  {"cursor", st.cursor},    {"seed", st.seed},
                                  {"total_steps", st.total_steps}, {"recipe_hash", st.recipe_hash},
                                  {"optimizer_steps", opt.steps()}, {"experts", mine.experts},
                                  {"parts", list}};
      hf::write_text_file_atomic((tmp / "training_state/trainer_state.json").string(), j.dump(2) + "\n");
      hf::fsync_dir((tmp / "training_state").string());
      hf::fsync_dir(tmp.string());
    }
  } catch (...) {
    if (rank == 0) fs::remove_all(tmp);
    throw;
  }
  if (rank == 0) {
    // Swapped into place: a checkpoint being re-saved (resume after a kill) is moved aside, not
    // deleted, until the new copy has its name; at every point one complete copy exists under
    // checkpoint-N or checkpoint-N.old.* (which resume puts back: remove_partial_checkpoints).
    const fs::path old = out.parent_path() / (out.filename().string() + ".old." + std::to_string(::getpid()));
    const bool had = fs::exists(out);
    if (had) {
      core::fault_point("move the old checkpoint aside");
      fs::rename(out, old);
    }
    core::fault_point("rename the checkpoint into place");
    fs::rename(tmp, out);
    hf::fsync_dir(out.parent_path().string());
    if (had) {
      core::fault_point("remove the old checkpoint");
      fs::remove_all(old);
    }
  }
  barrier();  // the checkpoint exists before any rank goes on
}

namespace {

// One part of a checkpoint's training state: its files, the prefix of parameter names in them,
// and the experts its expert tensors hold ([first, first + count) of the model's).
struct StatePart {
  std::vector<hf::SafetensorsFile> files;
  std::string param_prefix;
  int64_t first = 0, count = -1;  // count -1: every expert

  bool contains(const std::string& name) const {
    for (const auto& f : files)
      if (f.contains(name)) return true;
    return false;
  }
  std::pair<Tensor, std::string> get(const std::string& name) const {
    for (const auto& f : files)
      if (f.contains(name)) return {f.get(name), f.path()};
    return {Tensor(), ""};
  }
};

// Fills `dst` (this model's tensor for `name`: whole, or rows [range.first, + rows) of the experts)
// from the parts that hold it.
void fill_from_parts(const std::vector<StatePart>& parts, const std::string& name, bool expert, const ExpertRange& range,
                     Tensor& dst, const std::string& dir) {
  if (!expert) {
    for (const auto& part : parts) {
      auto [t, file] = part.get(name);
      if (!t.defined()) continue;
      MF_CHECK(t.shape() == dst.shape() && t.dtype() == DType::F32, file, ": '", name, "' is ", dtype_name(t.dtype()), " ",
               shape_str(t.shape()), ", the model needs F32 ", shape_str(dst.shape()));
      std::memcpy(dst.raw(), t.raw(), t.nbytes());
      return;
    }
    MF_THROW(dir, "/training_state: missing '", name, "'");
  }
  const int64_t row_bytes = static_cast<int64_t>(dst.nbytes()) / std::max<int64_t>(dst.size(0), 1);
  int64_t covered = 0;
  for (const auto& part : parts) {
    const int64_t pf = part.first, pc = part.count < 0 ? range.experts : part.count;
    const int64_t lo = std::max(pf, range.first), hi = std::min(pf + pc, range.first + range.count);
    if (lo >= hi) continue;
    auto [t, file] = part.get(name);
    MF_CHECK(t.defined(), dir, "/training_state: missing '", name, "' for experts [", pf, ", ", pf + pc, ")");
    Shape want = dst.shape();
    want[0] = pc;
    MF_CHECK(t.shape() == want && t.dtype() == DType::F32, file, ": '", name, "' is ", dtype_name(t.dtype()), " ",
             shape_str(t.shape()), ", expected F32 ", shape_str(want));
    std::memcpy(static_cast<char*>(dst.raw()) + (lo - range.first) * row_bytes,
                static_cast<const char*>(t.raw()) + (lo - pf) * row_bytes, static_cast<size_t>((hi - lo) * row_bytes));
    covered += hi - lo;
  }
  MF_CHECK(covered == range.count, dir, "/training_state: the parts hold ", covered, " of the ", range.count,
           " experts [", range.first, ", ", range.first + range.count, ") of '", name, "'");
}

}  // namespace

TrainerState load_checkpoint(const std::string& dir, models::CausalLM& model, AdamW& opt) {
  const fs::path state_dir = fs::path(dir) / "training_state";
  const std::string state_file = (state_dir / "trainer_state.json").string();
  MF_CHECK(fs::exists(state_file), dir, ": not a moeforge training checkpoint (no training_state/trainer_state.json)");
  const nlohmann::ordered_json j = hf::read_json_file(state_file);  // depth-checked, one error naming the file
  TrainerState st;
  std::vector<StatePart> parts;
  const ExpertRange mine = expert_range(model);
  try {
    st.step = j.at("step").get<int64_t>();
    st.cursor = j.at("cursor").get<int64_t>();
    st.seed = j.at("seed").get<uint64_t>();
    st.total_steps = j.at("total_steps").get<int64_t>();
    st.recipe_hash = j.at("recipe_hash").get<std::string>();
    const int format = j.value("format", 1);
    if (format == 1) {
      StatePart p;
      p.files.push_back(hf::SafetensorsFile::open((state_dir / "params.safetensors").string()));
      p.files.push_back(hf::SafetensorsFile::open((state_dir / "optimizer.safetensors").string()));
      parts.push_back(std::move(p));
    } else {
      MF_CHECK(format == 2, state_file, ": field 'format': ", format, " is not a checkpoint format this moeforge reads (1, 2)");
      const int64_t experts = j.at("experts").get<int64_t>();
      MF_CHECK(experts == mine.experts, state_file, ": field 'experts': ", experts, ", but the model has ", mine.experts);
      for (const auto& e : j.at("parts")) {
        StatePart p;
        p.files.push_back(hf::SafetensorsFile::open((state_dir / e.at("file").get<std::string>()).string()));
        p.param_prefix = "param.";
        p.first = e.at("expert_first").get<int64_t>();
        p.count = e.at("expert_count").get<int64_t>();
        parts.push_back(std::move(p));
      }
      MF_CHECK(!parts.empty(), state_file, ": field 'parts' is empty");
    }
  } catch (const nlohmann::json::exception& e) {
    MF_THROW(state_file, ": ", e.what());
  }
  auto& all = model.params().all();
  opt.ensure_state();
  for (size_t i = 0; i < all.size(); ++i) {
    if (all[i].frozen) continue;
    const bool expert = model.adapter().group_of(all[i].name) != nullptr;
    fill_from_parts(parts, parts[0].param_prefix + all[i].name, expert, mine, all[i].value, dir);
    fill_from_parts(parts, "exp_avg." + all[i].name, expert, mine, opt.exp_avg(i), dir);
    fill_from_parts(parts, "exp_avg_sq." + all[i].name, expert, mine, opt.exp_avg_sq(i), dir);
  }
  opt.set_steps(j.value("optimizer_steps", st.step));
  return st;
}

namespace {
// Complete: its trainer_state.json parses and every part file it lists is there (a checkpoint
// folder can only be incomplete if something other than moeforge touched it: saves are renamed
// into place whole).
bool complete_checkpoint(const fs::path& dir) {
  const fs::path state = dir / "training_state" / "trainer_state.json";
  if (!fs::exists(state)) return false;
  try {
    const auto j = nlohmann::json::parse(hf::read_text_file(state.string()));
    if (!j.contains("parts"))  // format 1
      return fs::exists(dir / "training_state" / "params.safetensors") &&
             fs::exists(dir / "training_state" / "optimizer.safetensors");
    for (const auto& p : j["parts"])
      if (!fs::exists(dir / "training_state" / p.at("file").get<std::string>())) return false;
    return true;
  } catch (const std::exception&) {
    return false;
  }
}
void fsync_dir_of(const std::string& dir) { hf::fsync_dir(dir); }
}  // namespace

void prune_checkpoint(const std::string& dir) {
  // Renamed first (atomic), so a kill while the files go leaves no half-deleted checkpoint-N.
  const std::string doomed = dir + ".pruned";
  core::fault_point("move a pruned checkpoint aside");
  fs::rename(dir, doomed);
  core::fault_point("remove a pruned checkpoint");
  fs::remove_all(doomed);
}

std::vector<std::string> list_checkpoints(const std::string& output_dir) {
  std::vector<std::pair<int64_t, std::string>> found;
  if (!fs::is_directory(output_dir)) return {};
  for (const auto& de : fs::directory_iterator(output_dir)) {
    const std::string name = de.path().filename().string();
    if (!de.is_directory() || name.rfind("checkpoint-", 0) != 0 || name.find(".tmp.") != std::string::npos) continue;
    try {
      size_t pos = 0;
      const int64_t step = std::stoll(name.substr(11), &pos);
      if (pos == name.size() - 11 && complete_checkpoint(de.path())) found.emplace_back(step, de.path().string());
    } catch (const std::exception&) {
    }
  }
  std::sort(found.begin(), found.end());
  std::vector<std::string> out;
  for (auto& [_, p] : found) out.push_back(p);
  return out;
}

void remove_partial_checkpoints(const std::string& output_dir) {
  if (!fs::is_directory(output_dir)) return;
  // A folder moved aside by a save that was killed before its replacement got the name goes back
  // first (it is complete: it was only ever renamed); then every temporary and old copy goes.
  std::vector<fs::path> entries;
  for (const auto& de : fs::directory_iterator(output_dir)) entries.push_back(de.path());
  for (const fs::path& p : entries) {
    const std::string name = p.filename().string();
    const auto at = name.find(".old.");
    if (at == std::string::npos) continue;
    const fs::path original = p.parent_path() / name.substr(0, at);
    const bool checkpoint = name.rfind("checkpoint-", 0) == 0;
    if (!fs::exists(original) && (!checkpoint || complete_checkpoint(p))) fs::rename(p, original);
  }
  for (const auto& de : fs::directory_iterator(output_dir)) {
    const std::string name = de.path().filename().string();
    if (name.find(".tmp.") != std::string::npos || name.find(".old.") != std::string::npos ||
        name.find(".pruned") != std::string::npos)
      fs::remove_all(de.path());
  }
  fsync_dir_of(output_dir);
}

}  // namespace moeforge::train
