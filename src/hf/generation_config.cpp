#include "hf/generation_config.h"

#include <filesystem>

#include "core/error.h"
#include "hf/fs_util.h"

namespace moeforge::hf {

namespace {

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;

// Token ids: an integer or a list of integers (null or absent: none).
std::vector<int64_t> token_ids(const Json& j, const char* field, const std::string& file) {
  if (!j.contains(field) || j[field].is_null()) return {};
  const Json& v = j[field];
  if (v.is_number_integer()) return {v.get<int64_t>()};
  std::vector<int64_t> out;
  MF_CHECK(v.is_array(), file, ": field '", field, "' must be a token id or a list of them, got ", v.dump());
  for (const Json& e : v) {
    MF_CHECK(e.is_number_integer(), file, ": field '", field, "' must be a token id or a list of them, got ", v.dump());
    out.push_back(e.get<int64_t>());
  }
  return out;
}

std::optional<int64_t> one_id(const Json& j, const char* field, const std::string& file) {
  const auto ids = token_ids(j, field, file);
  if (ids.empty()) return std::nullopt;
  return ids.front();
}

template <typename T>
std::optional<T> number(const Json& j, const char* field, const std::string& file) {
  if (!j.contains(field) || j[field].is_null()) return std::nullopt;
  const Json& v = j[field];
  if constexpr (std::is_integral_v<T>)
    MF_CHECK(v.is_number_integer(), file, ": field '", field, "' must be an integer, got ", v.dump());
  else
    MF_CHECK(v.is_number(), file, ": field '", field, "' must be a number, got ", v.dump());
  return v.get<T>();
}

}  // namespace

GenerationConfig load_generation_config(const std::string& model_dir) {
  GenerationConfig g;
  const fs::path gen = fs::path(model_dir) / "generation_config.json";
  if (fs::exists(gen)) {
    const std::string file = gen.string();
    const Json j = read_json_file(file);
    MF_CHECK(j.is_object(), file, ": expected a JSON object");
    g.source = file;
    g.eos_token_ids = token_ids(j, "eos_token_id", file);
    g.bos_token_id = one_id(j, "bos_token_id", file);
    g.pad_token_id = one_id(j, "pad_token_id", file);
    if (j.contains("do_sample") && !j["do_sample"].is_null()) {
      MF_CHECK(j["do_sample"].is_boolean(), file, ": field 'do_sample' must be true or false, got ", j["do_sample"].dump());
      g.do_sample = j["do_sample"].get<bool>();
    }
    g.temperature = number<double>(j, "temperature", file);
    g.top_p = number<double>(j, "top_p", file);
    g.repetition_penalty = number<double>(j, "repetition_penalty", file);
    g.top_k = number<int64_t>(j, "top_k", file);
    g.max_new_tokens = number<int64_t>(j, "max_new_tokens", file);
    g.max_length = number<int64_t>(j, "max_length", file);
  }
  // Transformers builds the generation config from config.json when the folder has none, and the
  // token ids it lacks come from there too.
  const fs::path cfg = fs::path(model_dir) / "config.json";
  if ((g.eos_token_ids.empty() || !g.bos_token_id) && fs::exists(cfg)) {
    const std::string file = cfg.string();
    const Json j = read_json_file(file);
    if (j.is_object()) {
      const Json& text = j.contains("text_config") && j["text_config"].is_object() ? j["text_config"] : j;
      if (g.eos_token_ids.empty()) g.eos_token_ids = token_ids(text, "eos_token_id", file);
      if (!g.bos_token_id) g.bos_token_id = one_id(text, "bos_token_id", file);
      if (!g.pad_token_id) g.pad_token_id = one_id(text, "pad_token_id", file);
      if (g.source.empty() && !g.eos_token_ids.empty()) g.source = file;
    }
  }
  return g;
}

}  // namespace moeforge::hf
