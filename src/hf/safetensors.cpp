#include "hf/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "hf/fs_util.h"

namespace moeforge::hf {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr uint64_t kMaxHeaderBytes = 100ull << 20;  // the reference reader's limit

uint64_t read_u64_le(const unsigned char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

uint64_t checked_json_uint(const json& v, const std::string& where, const std::string& what) {
  MF_CHECK(v.is_number_unsigned(), where, ": ", what, " must be a non-negative integer, got ", v.dump());
  return v.get<uint64_t>();
}

}  // namespace

std::vector<TensorEntry> SafetensorsFile::parse_header(const std::string& text, uint64_t data_bytes,
                                                       const std::string& where,
                                                       std::map<std::string, std::string>* metadata) {
  json header;
  check_json_depth(text, where);
  try {
    header = json::parse(text);
  } catch (const json::exception& e) {
    MF_THROW(where, ": invalid JSON header (", e.what(), ")");
  }
  MF_CHECK(header.is_object(), where, ": header must be a JSON object");
  std::vector<TensorEntry> entries;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      MF_CHECK(v.is_object(), where, ": __metadata__ must be an object of strings");
      for (auto m = v.begin(); m != v.end(); ++m) {
        MF_CHECK(m.value().is_string(), where, ": __metadata__ field '", m.key(), "' must be a string");
        if (metadata) (*metadata)[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string tw = where + ": tensor '" + name + "'";
    MF_CHECK(v.is_object(), tw, ": entry must be an object");
    MF_CHECK(v.contains("dtype") && v["dtype"].is_string(), tw, ": missing string field 'dtype'");
    const std::string dname = v["dtype"].get<std::string>();
    auto dt = dtype_from_name(dname);
    MF_CHECK(dt.has_value(), tw, ": unknown dtype '", dname, "'");
    MF_CHECK(v.contains("shape") && v["shape"].is_array(), tw, ": missing array field 'shape'");
    TensorEntry e{name, *dt, {}, 0, 0};
    unsigned __int128 bytes = dtype_size(*dt);
    for (const auto& d : v["shape"]) {
      const uint64_t n = checked_json_uint(d, tw, "every shape dimension");
      e.shape.push_back(static_cast<int64_t>(n));
      bytes *= n;
      // Bound the product so it cannot overflow; the offsets check below compares it with the file.
      MF_CHECK(bytes <= (static_cast<unsigned __int128>(1) << 62) || n == 0, tw, ": shape ", shape_str(e.shape),
               "... is too large");
    }
    if (std::any_of(e.shape.begin(), e.shape.end(), [](int64_t d) { return d == 0; })) bytes = 0;
    MF_CHECK(v.contains("data_offsets") && v["data_offsets"].is_array() && v["data_offsets"].size() == 2, tw,
             ": 'data_offsets' must be an array of two integers");
    e.begin = checked_json_uint(v["data_offsets"][0], tw, "data_offsets[0]");
    e.end = checked_json_uint(v["data_offsets"][1], tw, "data_offsets[1]");
    MF_CHECK(e.begin <= e.end, tw, ": data_offsets [", e.begin, ", ", e.end, ") end before they begin");
    MF_CHECK(e.end <= data_bytes, tw, ": data_offsets [", e.begin, ", ", e.end, ") run past the end of the data area (",
             data_bytes, " bytes)");
    MF_CHECK(e.end - e.begin == static_cast<uint64_t>(bytes), tw, ": data_offsets span ", e.end - e.begin,
             " bytes but ", dname, " ", shape_str(e.shape), " needs ", static_cast<uint64_t>(bytes));
    entries.push_back(std::move(e));
  }
  // The tensors must tile the data area: sorted by offset, each starts where the previous ended.
  std::vector<const TensorEntry*> order;
  for (const auto& e : entries) order.push_back(&e);
  std::sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->begin != b->begin ? a->begin < b->begin : a->end < b->end; });
  uint64_t pos = 0;
  const TensorEntry* prev = nullptr;
  for (const auto* e : order) {
    if (e->begin < pos)
      MF_THROW(where, ": tensor '", e->name, "' bytes [", e->begin, ", ", e->end, ") overlap tensor '", prev->name,
               "' bytes [", prev->begin, ", ", prev->end, ")");
    MF_CHECK(e->begin == pos, where, ": gap of ", e->begin - pos, " bytes before tensor '", e->name, "' at offset ", pos);
    pos = e->end;
    prev = e;
  }
  MF_CHECK(pos == data_bytes, where, ": ", data_bytes - pos, " bytes after the last tensor are not described by the header");
  return entries;
}

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  SafetensorsFile f;
  f.path_ = path;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  MF_CHECK(fd >= 0, path, ": cannot open (", std::strerror(errno), ")");
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    MF_THROW(path, ": cannot stat (", std::strerror(errno), ")");
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    MF_THROW(path, ": truncated file (", size, " bytes; a safetensors file starts with an 8-byte header length)");
  }
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  MF_CHECK(map != MAP_FAILED, path, ": cannot map (", std::strerror(errno), ")");
  f.mapping_ = std::shared_ptr<void>(map, [size](void* p) { ::munmap(p, size); });
  const auto* bytes = static_cast<const unsigned char*>(map);
  const uint64_t n = read_u64_le(bytes);
  MF_CHECK(n <= size - 8, path, ": header length ", n, " runs past the end of the file (", size, " bytes)");
  MF_CHECK(n <= kMaxHeaderBytes, path, ": header length ", n, " exceeds the 100 MiB limit");
  const std::string text(reinterpret_cast<const char*>(bytes + 8), n);
  f.entries_ = parse_header(text, size - 8 - n, path, &f.metadata_);
  f.data_ = reinterpret_cast<const char*>(bytes + 8 + n);
  for (size_t i = 0; i < f.entries_.size(); ++i) f.index_[f.entries_[i].name] = i;
  return f;
}

const TensorEntry& SafetensorsFile::entry(const std::string& name) const {
  auto it = index_.find(name);
  MF_CHECK(it != index_.end(), path_, ": no tensor named '", name, "'");
  return entries_[it->second];
}

Tensor SafetensorsFile::get(const std::string& name) const {
  const TensorEntry& e = entry(name);
  const char* p = data_ + e.begin;
  if (reinterpret_cast<uintptr_t>(p) % dtype_size(e.dtype) != 0) {
    // Other writers may leave a tensor unaligned; typed access needs it aligned, so copy it.
    Tensor t = Tensor::empty(e.shape, e.dtype);
    std::memcpy(t.raw(), p, e.end - e.begin);
    return t;
  }
  auto storage = Storage::wrap(const_cast<char*>(p), e.end - e.begin, mapping_);
  return Tensor(storage, 0, e.shape, e.dtype);
}

SafetensorsCheckpoint SafetensorsCheckpoint::open(const std::string& dir) {
  SafetensorsCheckpoint c;
  c.dir_ = dir;
  MF_CHECK(fs::is_directory(dir), dir, ": not a directory");
  const fs::path index = fs::path(dir) / "model.safetensors.index.json";
  std::map<std::string, std::string> weight_map;
  std::vector<std::string> files;
  if (fs::exists(index)) {
    json j;
    const std::string text = read_text_file(index.string());
    check_json_depth(text, index.string());
    try {
      j = json::parse(text);
    } catch (const json::exception& e) {
      MF_THROW(index.string(), ": invalid JSON (", e.what(), ")");
    }
    MF_CHECK(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(), index.string(),
             ": missing object field 'weight_map'");
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      MF_CHECK(it.value().is_string(), index.string(), ": weight_map entry '", it.key(), "' must be a file name");
      const std::string file = it.value().get<std::string>();
      MF_CHECK(file.find('/') == std::string::npos && file != ".." , index.string(), ": weight_map entry '", it.key(),
               "' names a file outside the folder: '", file, "'");
      weight_map[it.key()] = file;
      if (std::find(files.begin(), files.end(), file) == files.end()) files.push_back(file);
    }
    std::sort(files.begin(), files.end());
  } else if (fs::exists(fs::path(dir) / "model.safetensors")) {
    files.push_back("model.safetensors");
  } else {
    for (const auto& de : fs::directory_iterator(dir))
      if (de.path().extension() == ".safetensors") files.push_back(de.path().filename().string());
    std::sort(files.begin(), files.end());
    MF_CHECK(!files.empty(), dir, ": no model.safetensors, model.safetensors.index.json or *.safetensors file");
  }
  for (const auto& name : files) {
    const std::string path = (fs::path(dir) / name).string();
    MF_CHECK(fs::exists(path), index.string(), ": lists shard '", name, "' which does not exist");
    c.files_.push_back(SafetensorsFile::open(path));
    for (const auto& e : c.files_.back().entries()) {
      auto [it, fresh] = c.where_.emplace(e.name, c.files_.size() - 1);
      MF_CHECK(fresh, path, ": tensor '", e.name, "' is also stored in ", c.files_[it->second].path());
    }
  }
  for (const auto& [tensor, file] : weight_map) {
    auto it = c.where_.find(tensor);
    MF_CHECK(it != c.where_.end(), index.string(), ": tensor '", tensor, "' is listed in '", file, "' but not stored there");
    MF_CHECK(fs::path(c.files_[it->second].path()).filename() == file, index.string(), ": tensor '", tensor,
             "' is listed in '", file, "' but stored in ", c.files_[it->second].path());
  }
  return c;
}

std::vector<std::string> SafetensorsCheckpoint::names() const {
  std::vector<std::string> v;
  for (const auto& [k, _] : where_) v.push_back(k);
  return v;
}

const TensorEntry& SafetensorsCheckpoint::entry(const std::string& name) const {
  auto it = where_.find(name);
  MF_CHECK(it != where_.end(), dir_, ": missing tensor '", name, "'");
  return files_[it->second].entry(name);
}

Tensor SafetensorsCheckpoint::get(const std::string& name) const {
  auto it = where_.find(name);
  MF_CHECK(it != where_.end(), dir_, ": missing tensor '", name, "'");
  return files_[it->second].get(name);
}

const std::string& SafetensorsCheckpoint::file_of(const std::string& name) const {
  auto it = where_.find(name);
  MF_CHECK(it != where_.end(), dir_, ": missing tensor '", name, "'");
  return files_[it->second].path();
}

void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  // Data goes in order of decreasing element size (as the reference writer does), so every tensor
  // starts aligned to its element size and readers can use it in place.
  std::vector<size_t> order(tensors.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return dtype_size(tensors[a].second.dtype()) > dtype_size(tensors[b].second.dtype());
  });
  uint64_t offset = 0;
  for (size_t i : order) {
    const auto& [name, t] = tensors[i];
    MF_CHECK(t.device().is_cpu(), path, ": tensor '", name, "' must be on the CPU to be saved");
    MF_CHECK(!header.contains(name), path, ": tensor '", name, "' given twice");
    header[name] = {{"dtype", std::string(dtype_name(t.dtype()))},
                    {"shape", t.shape()},
                    {"data_offsets", {offset, offset + t.nbytes()}}};
    offset += t.nbytes();
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // keep the data area 8-byte aligned
  AtomicFile out(path);
  unsigned char len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>((text.size() >> (8 * i)) & 0xff);
  out.write(len, 8);
  out.write(text.data(), text.size());
  for (size_t i : order) out.write(tensors[i].second.raw(), tensors[i].second.nbytes());
  out.commit();
}

std::vector<NamedTensors> split_into_shards(const NamedTensors& tensors, uint64_t max_shard_bytes) {
  std::vector<NamedTensors> shards;
  uint64_t in_shard = 0;
  for (const auto& nt : tensors) {
    const uint64_t b = nt.second.nbytes();
    if (shards.empty() || (!shards.back().empty() && in_shard + b > max_shard_bytes)) {
      shards.emplace_back();
      in_shard = 0;
    }
    shards.back().push_back(nt);
    in_shard += b;
  }
  return shards;
}

std::vector<std::string> save_sharded(const std::string& dir, const NamedTensors& tensors, uint64_t max_shard_bytes) {
  std::vector<NamedTensors> shards = split_into_shards(tensors, max_shard_bytes);
  if (shards.empty()) shards.emplace_back();
  uint64_t total = 0;
  for (const auto& nt : tensors) total += nt.second.nbytes();
  std::vector<std::string> written;
  if (shards.size() == 1) {
    save_safetensors((fs::path(dir) / "model.safetensors").string(), shards[0]);
    return {"model.safetensors"};
  }
  nlohmann::ordered_json index;
  index["metadata"] = {{"total_size", total}};
  std::map<std::string, std::string> weight_map;  // Hugging Face writes it sorted by tensor name
  char name[64];
  for (size_t i = 0; i < shards.size(); ++i) {
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", i + 1, shards.size());
    save_safetensors((fs::path(dir) / name).string(), shards[i]);
    for (const auto& nt : shards[i]) weight_map[nt.first] = name;
    written.push_back(name);
  }
  index["weight_map"] = weight_map;
  write_text_file_atomic((fs::path(dir) / "model.safetensors.index.json").string(), index.dump(2) + "\n");
  written.push_back("model.safetensors.index.json");
  return written;
}

uint64_t parse_size(const std::string& text) {
  size_t pos = 0;
  double v = 0;
  try {
    v = std::stod(text, &pos);
  } catch (const std::exception&) {
    MF_THROW("invalid size '", text, "' (expected e.g. 5GB, 500MB or a byte count)");
  }
  std::string unit = text.substr(pos);
  for (auto& ch : unit) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  static const std::pair<const char*, double> units[] = {
      {"", 1}, {"B", 1}, {"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12},
      {"KIB", 1024.0}, {"MIB", 1048576.0}, {"GIB", 1073741824.0}, {"TIB", 1099511627776.0}};
  for (const auto& [u, m] : units)
    if (unit == u) {
      MF_CHECK(v > 0, "invalid size '", text, "': must be positive");
      return static_cast<uint64_t>(v * m);
    }
  MF_THROW("invalid size '", text, "': unknown unit '", unit, "'");
}

}  // namespace moeforge::hf
