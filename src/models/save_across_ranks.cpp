#include "models/save_across_ranks.h"

#include <cstdio>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "parallel/communicator.h"
#include "hf/fs_util.h"
#include "hf/safetensors.h"
#include "models/registry.h"

namespace moeforge::models {

namespace fs = std::filesystem;

std::vector<bool> expert_sharded_params(const CausalLM& model, const Parallel& par) {
  const int ep = par.ep ? par.ep->size() : 1;
  std::vector<bool> out;
  for (const auto& p : model.params().all()) {
    const hf::ExpertGroup* g = model.adapter().group_of(p.name);
    out.push_back(ep > 1 && g && p.shape[0] < g->experts);
  }
  return out;
}

namespace {

// The fused-layout fallback: the experts gathered into a whole-model copy that rank 0 writes.
void gather_and_write_on_rank0(const CausalLM& part, const Parallel& par, const std::string& source_dir,
                               const std::string& dir, const SaveOptions& opts) {
  auto whole = build_model(part.config());
  whole->adapter().adopt_layout(part.adapter());
  const std::vector<bool> sharded = expert_sharded_params(part, par);
  const auto& src = part.params().all();
  auto& dst = whole->params().all();
  for (size_t i = 0; i < src.size(); ++i) {
    MF_CHECK(dst[i].name == src[i].name, "internal: parameter order differs (", dst[i].name, ", ", src[i].name, ")");
    if (sharded[i]) {
      dst[i].value = Tensor::empty(dst[i].shape, src[i].value.dtype());
      par.ep->all_gather(src[i].value, dst[i].value);  // shards in rank order = expert order
    } else {
      dst[i].value = src[i].value;
    }
  }
  if (par.world->rank() == 0) write_pretrained_files(*whole, source_dir, dir, opts);
}

}  // namespace

void write_pretrained_files_across(const CausalLM& part, const Parallel& par, const std::string& source_dir,
                                   const std::string& dir, const SaveOptions& opts) {
  MF_CHECK(par.world, "internal: write_pretrained_files_across without a world group");
  parallel::Communicator& world = *par.world;
  const int ep = par.ep ? par.ep->size() : 1, rank = world.rank();
  if (ep > 1 && part.adapter().any_fused()) {
    gather_and_write_on_rank0(part, par, source_dir, dir, opts);
    world.barrier();
    return;
  }
  // The first expert-parallel group holds every expert once: its ranks write their experts, rank
  // 0 the dense tensors as well.
  hf::NamedTensors mine;
  if (rank < ep)
    for (auto& nt : part.adapter().export_tensors(part.params(), part.config().dtype))
      if (rank == 0 || part.adapter().in_expert_group(nt.first)) mine.push_back(std::move(nt));
  const std::vector<hf::NamedTensors> shards = hf::split_into_shards(mine, opts.max_shard_bytes);
  // Shard numbers across the writers: mine start after the lower ranks'.
  Tensor count = Tensor::from_i64({static_cast<int64_t>(shards.size())}, {1});
  Tensor counts = Tensor::zeros({world.size()}, DType::I64);
  world.all_gather(count, counts);
  int64_t first = 0, total = 0;
  for (int r = 0; r < world.size(); ++r) {
    if (r < rank) first += counts.i64()[r];
    total += counts.i64()[r];
  }
  nlohmann::ordered_json part_map = nlohmann::ordered_json::object();
  uint64_t bytes = 0;
  char name[64];
  for (size_t k = 0; k < shards.size(); ++k) {
    std::snprintf(name, sizeof name, "model-%05lld-of-%05lld.safetensors", static_cast<long long>(first + k + 1),
                  static_cast<long long>(total));
    hf::save_safetensors((fs::path(dir) / name).string(), shards[k]);
    for (const auto& nt : shards[k]) {
      part_map[nt.first] = name;
      bytes += nt.second.nbytes();
    }
  }
  const fs::path part_file = fs::path(dir) / (".index-part-" + std::to_string(rank) + ".json");
  if (rank < ep) hf::write_text_file_atomic(part_file.string(), nlohmann::json{{"bytes", bytes}, {"weight_map", part_map}}.dump());
  world.barrier();  // every writer's files and index part exist
  if (rank == 0) {
    std::map<std::string, std::string> weight_map;  // sorted by tensor name, as Hugging Face writes it
    uint64_t total_bytes = 0;
    for (int r = 0; r < ep; ++r) {
      const fs::path f = fs::path(dir) / (".index-part-" + std::to_string(r) + ".json");
      const auto j = nlohmann::json::parse(hf::read_text_file(f.string()));
      total_bytes += j.at("bytes").get<uint64_t>();
      for (const auto& [k, v] : j.at("weight_map").items()) weight_map[k] = v.get<std::string>();
      fs::remove(f);
    }
    nlohmann::ordered_json index;
    index["metadata"] = {{"total_size", total_bytes}};
    index["weight_map"] = weight_map;
    hf::write_text_file_atomic((fs::path(dir) / "model.safetensors.index.json").string(), index.dump(2) + "\n");
    write_config_and_companions(part, source_dir, dir);
    hf::fsync_dir(dir);
  }
  world.barrier();
}

void save_pretrained_across(const CausalLM& part, const Parallel& par, const std::string& source_dir,
                            const std::string& out_dir, const SaveOptions& opts) {
  parallel::Communicator& world = *par.world;
  // One temporary folder for all ranks (a shared file system), prepared by rank 0.
  const std::string tmp = temp_folder_of(out_dir, "ranks");
  if (world.rank() == 0) begin_folder(out_dir, opts.overwrite, "ranks");
  world.barrier();
  write_pretrained_files_across(part, par, source_dir, tmp, opts);
  if (world.rank() == 0) finish_folder(tmp, out_dir);
  world.barrier();
}

}  // namespace moeforge::models
