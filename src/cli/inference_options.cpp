#include "cli/inference_options.h"

#include <cstdio>

#include "cli/app.h"
#include "gpu/fast_paths.h"
#include "gpu/inference.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace moeforge::cli {

void InferenceOptions::add_to(CLI::App& app) {
  app.add_option("--device", device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--precision", precision, "weights on the GPU: bf16 or fp32")->check(CLI::IsMember({"bf16", "fp32"}));
  app.add_option("--threads", threads, "CPU threads (0: OpenMP's default)")->check(at_least(0));
}

void InferenceOptions::apply_threads() const {
#ifdef _OPENMP
  if (threads > 0) omp_set_num_threads(static_cast<int>(threads));
#endif
}

nn::ParamAccess& InferenceOptions::params_for(models::CausalLM& model, std::unique_ptr<nn::ParamAccess>& holder) const {
  if (device != "cuda") return model.params();
  holder = gpu::upload_for_inference(model.params(), precision, "--precision");
  for (const std::string& n : gpu::fast_path_notes(model.config(), precision == "bf16", false))
    std::fprintf(stderr, "note: %s\n", n.c_str());
  return *holder;
}

}  // namespace moeforge::cli
