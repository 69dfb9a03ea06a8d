#include "train/checkpoint.h"

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "hf/fs_util.h"
#include "hf/safetensors.h"
#include "models/pretrained.h"

namespace moeforge::train {

namespace fs = std::filesystem;

void save_checkpoint(const std::string& dir, const models::CausalLM& model, const std::string& source_dir,
                     const AdamW& opt, const TrainerState& st, uint64_t max_shard_bytes) {
  const fs::path out(dir);
  const fs::path tmp = out.parent_path() / (out.filename().string() + ".tmp." + std::to_string(::getpid()));
  fs::remove_all(tmp);
  fs::create_directories(tmp / "training_state");
  try {
    models::SaveOptions so;
    so.max_shard_bytes = max_shard_bytes;
    models::write_pretrained_files(model, source_dir, tmp.string(), so);
    hf::NamedTensors params;
    for (const auto& p : model.params().all()) params.emplace_back(p.name, p.value);
    hf::save_safetensors((tmp / "training_state/params.safetensors").string(), params);
    hf::save_safetensors((tmp / "training_state/optimizer.safetensors").string(), opt.state());
    nlohmann::ordered_json j = {{"format", 1},           {"step", st.step},
                                {"cursor", st.cursor},    {"seed", st.seed},
                                {"total_steps", st.total_steps}, {"recipe_hash", st.recipe_hash},
                                {"optimizer_steps", opt.steps()}};
    hf::write_text_file_atomic((tmp / "training_state/trainer_state.json").string(), j.dump(2) + "\n");
    hf::fsync_dir((tmp / "training_state").string());
    hf::fsync_dir(tmp.string());
  } catch (...) {
    fs::remove_all(tmp);
    throw;
  }
  fs::remove_all(out);
  fs::rename(tmp, out);
  hf::fsync_dir(out.parent_path().string());
}

TrainerState load_checkpoint(const std::string& dir, models::CausalLM& model, AdamW& opt) {
  const fs::path state_dir = fs::path(dir) / "training_state";
  const std::string state_file = (state_dir / "trainer_state.json").string();
  MF_CHECK(fs::exists(state_file), dir, ": not a moeforge training checkpoint (no training_state/trainer_state.json)");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(hf::read_text_file(state_file));
  } catch (const nlohmann::json::exception& e) {
    MF_THROW(state_file, ": invalid JSON (", e.what(), ")");
  }
  TrainerState st;
  try {
    st.step = j.at("step").get<int64_t>();
    st.cursor = j.at("cursor").get<int64_t>();
    st.seed = j.at("seed").get<uint64_t>();
    st.total_steps = j.at("total_steps").get<int64_t>();
    st.recipe_hash = j.at("recipe_hash").get<std::string>();
  } catch (const nlohmann::json::exception& e) {
    MF_THROW(state_file, ": ", e.what());
  }
  auto params = hf::SafetensorsFile::open((state_dir / "params.safetensors").string());
  for (auto& p : model.params().all()) {
    MF_CHECK(params.contains(p.name), params.path(), ": missing parameter '", p.name, "'");
    Tensor t = params.get(p.name);
    MF_CHECK(t.shape() == p.shape && t.dtype() == p.value.dtype(), params.path(), ": parameter '", p.name, "' is ",
             dtype_name(t.dtype()), " ", shape_str(t.shape()), ", the model needs ", dtype_name(p.value.dtype()), " ",
             shape_str(p.shape));
    std::memcpy(p.value.raw(), t.raw(), t.nbytes());
  }
  auto optim = hf::SafetensorsFile::open((state_dir / "optimizer.safetensors").string());
  opt.load_state(optim, j.value("optimizer_steps", st.step));
  return st;
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
      if (pos == name.size() - 11) found.emplace_back(step, de.path().string());
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
  for (const auto& de : fs::directory_iterator(output_dir)) {
    const std::string name = de.path().filename().string();
    if (name.find(".tmp.") != std::string::npos) fs::remove_all(de.path());
  }
}

}  // namespace moeforge::train
