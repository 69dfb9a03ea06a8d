#include "report/metrics.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "hf/fs_util.h"

namespace moeforge::report {

RunMetrics read_metrics(const std::string& path) {
  namespace fs = std::filesystem;
  const std::string file = fs::is_directory(path) ? (fs::path(path) / "metrics.jsonl").string() : path;
  std::ifstream in(file);
  MF_CHECK(in, file, ": cannot open (expected a run's output folder or its metrics.jsonl)");
  RunMetrics m;
  std::string line;
  for (int64_t n = 1; std::getline(in, line); ++n) {
    if (line.empty()) continue;
    const std::string where = file + ":" + std::to_string(n);
    hf::check_json_depth(line, where);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      MF_THROW(where, ": not JSON (", e.what(), ")");
    }
    MF_CHECK(j.is_object() && j.contains("step") && j["step"].is_number(), where, ": expected an object with 'step'");
    auto num = [&](const char* key) {
      MF_CHECK(j[key].is_number(), where, ": field '", key, "' must be a number");
      return j[key].get<double>();
    };
    const double step = num("step");
    if (j.contains("eval_loss")) {
      m.eval_step.push_back(step);
      m.eval_loss.push_back(num("eval_loss"));
    }
    if (j.contains("loss")) {
      m.step.push_back(step);
      m.loss.push_back(num("loss"));
      m.lr.push_back(j.contains("lr") ? num("lr") : NAN);
      m.grad_norm.push_back(j.contains("grad_norm") ? num("grad_norm") : NAN);
    }
  }
  MF_CHECK(!m.step.empty() || !m.eval_step.empty(), file, ": no training or validation records");
  return m;
}

}  // namespace moeforge::report
