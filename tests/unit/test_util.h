// Helpers shared by the tests: temporary folders, the fixtures' paths, and the parity comparisons.
#pragma once
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <filesystem>
#include <functional>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/tensor.h"
#include "hf/safetensors.h"
#include "models/causal_lm.h"
#include "nn/params.h"

namespace moeforge::test {

// A columnar file's rows (data::parquet::ParquetFile, data::arrow::ArrowFile) in order, each row's
// number checked to count from 0.
template <typename File>
std::vector<nlohmann::ordered_json> table_rows(const File& f, const std::vector<std::string>& fields) {
  std::vector<nlohmann::ordered_json> rows;
  int64_t expected_index = 0;
  f.for_each_row(fields, [&](int64_t i, nlohmann::ordered_json&& row) {
    EXPECT_EQ(i, expected_index++);
    rows.push_back(std::move(row));
  });
  return rows;
}

// The objects of a JSON-lines file (a fixture's NAME.expected.jsonl).
inline std::vector<nlohmann::ordered_json> jsonl_objects(const std::string& path) {
  std::ifstream in(path);
  std::vector<nlohmann::ordered_json> rows;
  for (std::string line; std::getline(in, line);) rows.push_back(nlohmann::ordered_json::parse(line));
  return rows;
}

// Token ids of another width (a dataset's 32-bit rows) as the 64-bit ids tokenizers and tensors take.
template <typename T>
std::vector<int64_t> ids64(const std::vector<T>& v) {
  return std::vector<int64_t>(v.begin(), v.end());
}

// MOEFORGE_FIXTURES_DIR overrides the compiled-in path (test binaries run from another checkout, as
// on the GPU machine).
inline std::string fixture(const std::string& name) {
  const char* dir = std::getenv("MOEFORGE_FIXTURES_DIR");
  return std::string(dir ? dir : MOEFORGE_FIXTURES) + "/" + name;
}

// A fresh folder under the system temp dir, removed when the object goes away.
struct TempDir {
  std::filesystem::path path;
  TempDir() {
    static int counter = 0;
    path = std::filesystem::temp_directory_path() /
           ("moeforge-test-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~TempDir() { std::filesystem::remove_all(path); }
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

inline std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

inline void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

inline Tensor random_tensor(Shape shape, uint32_t seed, float scale = 1.f, DType dtype = DType::F32) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> d(0.f, scale);
  std::vector<float> v(static_cast<size_t>(shape_numel(shape)));
  for (auto& x : v) x = d(gen);
  return Tensor::from_vector(v, std::move(shape), dtype);
}

inline float max_abs_diff(const Tensor& a, const Tensor& b) {
  auto x = a.to_f32_vector(), y = b.to_f32_vector();
  float m = 0;
  for (size_t i = 0; i < x.size(); ++i) m = std::max(m, std::abs(x[i] - y[i]));
  return m;
}

// The message of the moeforge::Error that f throws ("" when it throws none).
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// max |a - b| / max |b| over a tensor (the tensor-relative error the parity tests bound).
inline double tensor_rel_diff(const Tensor& a, const Tensor& b) {
  auto x = a.to_f32_vector(), y = b.to_f32_vector();
  double d = 0, m = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    d = std::max(d, std::abs(static_cast<double>(x[i]) - y[i]));
    m = std::max(m, std::abs(static_cast<double>(y[i])));
  }
  return m > 0 ? d / m : d;
}

// Tokens the shifted causal-LM loss counts in [B,S] labels (-100 ignored, first column never a target).
inline int64_t counted_tokens(const Tensor& labels) {
  int64_t n = 0;
  for (int64_t i = 0; i < labels.numel(); ++i) n += (i % labels.size(1)) != 0 && labels.i64()[i] != -100;
  return n;
}

// A fixture that trains DeepSeek-V3's multi-token prediction records its loss weight
// (reference.safetensors `mtp_loss_scale`); 0 for every other fixture.
inline double mtp_loss_scale(const hf::SafetensorsFile& ref) {
  return ref.contains("mtp_loss_scale") ? ref.get("mtp_loss_scale").item_f32() : 0.0;
}

// Makes the model's MTP layers trainable when `scale` > 0 (call before a GPU upload) and returns
// each depth's gradient scale for a batch of these labels: scale / depths / its counted targets.
inline std::vector<float> mtp_scales(models::CausalLM& m, const Tensor& labels, double scale) {
  m.set_mtp_trainable(scale > 0);
  std::vector<float> out;
  const int64_t depths = scale > 0 ? m.mtp_depths() : 0;
  for (int64_t k = 1; k <= depths; ++k)
    out.push_back(static_cast<float>(scale / depths / models::counted_targets(models::mtp_targets(labels, nullptr, k))));
  return out;
}

// The options of one training step on a fixture as the parity tests run it: the mean token
// cross-entropy, the config's load-balancing coefficient, and the MTP depths' scales.
inline models::TrainStepOptions step_options(models::CausalLM& m, const Tensor& labels, bool ckpt,
                                             double mtp_scale = 0) {
  models::TrainStepOptions o;
  o.ce_scale = 1.f / static_cast<float>(counted_tokens(labels));
  o.aux_scale = m.config().output_router_logits ? static_cast<float>(m.config().router_aux_loss_coef) : 0.f;
  o.activation_checkpointing = ckpt;
  o.mtp_scales = mtp_scales(m, labels, mtp_scale);
  return o;
}

// The loss a fixture's reference reports for a step's result (CPU or GPU): cross-entropy, + the
// load-balancing loss when the config has it, + scale / depths x each MTP depth's mean.
template <typename StepResult>
double reference_loss(const models::CausalLM& m, const StepResult& r, double mtp_scale) {
  double loss = r.ce_sum / static_cast<double>(r.tokens);
  if (m.config().output_router_logits) loss += m.config().router_aux_loss_coef * r.aux_loss;
  for (size_t k = 0; k < r.mtp_ce_sums.size(); ++k)
    loss += mtp_scale / static_cast<double>(r.mtp_ce_sums.size()) * r.mtp_ce_sums[k] / static_cast<double>(r.mtp_tokens[k]);
  return loss;
}

// The AdamW parity rule of test_train_parity.cpp: an element whose gradient is nonzero but below
// 1e-5 of its tensor's largest in any step is set by fp32 rounding, and Adam's g / sqrt(v) turns
// that into a full +-lr step. note_noise marks such elements of one tensor from one step's
// gradient; weights_match then holds marked elements to `adam_bound` and all others to 1e-5 of
// the tensor's largest weight, reports the first failure per tensor, and returns
// {marked elements, all elements}.
inline void note_noise(std::vector<bool>& noisy, const std::vector<float>& grad) {
  float gmax = 0;
  for (float x : grad) gmax = std::max(gmax, std::abs(x));
  for (size_t j = 0; j < grad.size(); ++j)
    if (grad[j] != 0.f && std::abs(grad[j]) < 1e-5f * gmax) noisy[j] = true;
}

// The same rule where a reference gradient of the step is known: an element whose gradient differs
// from the reference's by more than `rel` of its own size is fixed by neither program's fp32
// arithmetic (a cancellation-dominated sum: llama_b's layer-2 key-bias element 6 has a first-step
// gradient of 4.9e-7, 2e-5 of its tensor's largest; a GPU build whose norm and RoPE kernels sum in
// another order put it 4.7% from Transformers', and Adam, whose eps is 2% of that gradient, moved
// the weight by 9e-6 more). Adam divides each element by its own gradient's size, so its weight is
// held to the noise bound as well.
inline void note_inexact(std::vector<bool>& noisy, const std::vector<float>& grad, const std::vector<float>& ref, double rel) {
  for (size_t j = 0; j < grad.size() && j < ref.size(); ++j)
    if (std::abs(static_cast<double>(grad[j]) - ref[j]) > rel * std::abs(static_cast<double>(ref[j]))) noisy[j] = true;
}

inline std::pair<int64_t, int64_t> weights_match(const std::vector<nn::Param>& got, const std::vector<nn::Param>& want,
                                                 const std::vector<std::vector<bool>>& noisy, double adam_bound) {
  int64_t noisy_total = 0, total = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const auto g = got[i].value.to_f32_vector(), w = want[i].value.to_f32_vector();
    double wmax = 0;
    for (float x : w) wmax = std::max(wmax, std::abs(static_cast<double>(x)));
    for (size_t j = 0; j < g.size(); ++j) {
      const double d = std::abs(static_cast<double>(g[j]) - w[j]);
      const bool noise = noisy[i][j];
      noisy_total += noise;
      if (noise ? d > adam_bound : d > 1e-5 * wmax) {
        ADD_FAILURE() << got[i].name << "[" << j << "]: " << g[j] << " vs " << w[j] << (noise ? " (noise level)" : "");
        break;
      }
    }
    total += static_cast<int64_t>(g.size());
  }
  return {noisy_total, total};
}

// The "loss" of every line of a run's metrics.jsonl, in order.
// Two adapter files, tensor by tensor, as the LoRA parity tests hold them: within 1e-5 of each
// tensor's largest, or (at most 1% of the elements: fp32-noise gradients that Adam turns into full
// steps) within the Adam step bound `adam_bound`.
inline void expect_adapters_match(const std::string& got_file, const std::string& want_file, double adam_bound) {
  auto got = hf::SafetensorsFile::open(got_file);
  auto want = hf::SafetensorsFile::open(want_file);
  ASSERT_EQ(got.entries().size(), want.entries().size());
  int64_t off = 0, total = 0;
  for (const auto& e : want.entries()) {
    ASSERT_TRUE(got.contains(e.name)) << e.name;
    const auto g = got.get(e.name).to_f32_vector(), w = want.get(e.name).to_f32_vector();
    ASSERT_EQ(g.size(), w.size()) << e.name;
    float wmax = 0;
    for (float v : w) wmax = std::max(wmax, std::abs(v));
    for (size_t i = 0; i < g.size(); ++i) {
      const float d = std::abs(g[i] - w[i]);
      if (d > 1e-5f * wmax) {
        ++off;
        EXPECT_LT(d, adam_bound) << e.name << "[" << i << "]";
      }
    }
    total += static_cast<int64_t>(g.size());
  }
  EXPECT_LT(off, total / 100 + 1);
}

// Two adapter files (a multi-rank run's against one rank's): the same tensors, each within `rel` of
// the other relative to its largest entry (the ranks sum in another order).
inline void expect_same_adapter_files(const std::string& got_file, const std::string& want_file, double rel) {
  auto got = hf::SafetensorsFile::open(got_file);
  auto want = hf::SafetensorsFile::open(want_file);
  ASSERT_EQ(got.entries().size(), want.entries().size());
  for (const auto& e : want.entries()) {
    ASSERT_TRUE(got.contains(e.name)) << e.name;
    EXPECT_LT(tensor_rel_diff(got.get(e.name), want.get(e.name)), rel) << e.name;
  }
}

inline std::vector<double> losses_of(const std::string& metrics) {
  std::ifstream in(metrics);
  std::vector<double> v;
  std::string line;
  while (std::getline(in, line)) {
    const auto j = nlohmann::json::parse(line);
    if (j.contains("loss")) v.push_back(j["loss"].get<double>());  // (validation records hold eval_loss)
  }
  return v;
}

// A TCP port that was free a moment ago on the loopback interface (for stores and launches). Taken
// below the kernel's ephemeral range: a port the kernel hands out for port 0 (gloo's pair
// listeners, other tests' connections) could be taken between this call and the launched process's
// bind -- two multi-rank tests running side by side under ctest -j collided that way.
inline int free_port() {
  int ephemeral_low = 32768;
  if (std::ifstream range("/proc/sys/net/ipv4/ip_local_port_range"); range) range >> ephemeral_low;
  const int low = 10000, high = std::max(low + 1000, ephemeral_low);  // [low, high)
  static std::mt19937 gen(static_cast<uint32_t>(::getpid()) * 2654435761u ^
                          static_cast<uint32_t>(std::chrono::steady_clock::now().time_since_epoch().count()));
  for (int attempt = 0; attempt < 200; ++attempt) {
    const int port = low + static_cast<int>(gen() % static_cast<uint32_t>(high - low));
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(static_cast<uint16_t>(port));
    const bool free = ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
    ::close(fd);
    if (free) return port;
  }
  ADD_FAILURE() << "no free TCP port below " << high << " on the loopback interface";
  return 0;
}

}  // namespace moeforge::test
