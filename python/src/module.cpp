// moeforge's Python extension (_moeforge): the model, generation, training and tokenizer behind the
// Transformers-shaped API of python/moeforge/__init__.py. Logits cross without a copy: NumPy arrays
// on the CPU, DLPack arrays on the GPU (the array owns the tensor's memory); moeforge errors become moeforge.Error with
// the same one-line message; long calls release the GIL.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/function.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "gpu/inference.h"
#include "hf/chat/chat_template.h"
#include "hf/fs_util.h"
#include "hf/generation_config.h"
#include "hf/safetensors.h"
#include "hf/tokenizer/tokenizer.h"
#include "models/generate.h"
#include "models/lora.h"
#include "models/pretrained.h"
#include "models/save_across_ranks.h"
#include "parallel/env.h"
#include "hf/config.h"
#include "train/ranks.h"
#include "ops/cuda/runtime.h"
#include "train/trainer.h"

namespace nb = nanobind;
using namespace moeforge;

namespace {

using IdArray = nb::ndarray<const int64_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using F32Array = nb::ndarray<nb::numpy, float>;

Tensor ids_tensor(const IdArray& a) {
  std::vector<int64_t> v(a.data(), a.data() + a.size());
  return Tensor::from_i64(v, {static_cast<int64_t>(a.shape(0)), static_cast<int64_t>(a.shape(1))});
}

// An F32 tensor as an array that keeps the tensor's storage alive (no copy): a NumPy array on the
// host; on the GPU a framework-neutral DLPack array (torch.from_dlpack / cupy.from_dlpack take it
// as a device tensor; NumPy cannot hold device memory).
nb::object to_array(const Tensor& t) {
  MF_CHECK(t.dtype() == DType::F32, "internal: only F32 tensors become arrays");
  auto* keep = new Tensor(t);
  nb::capsule owner(keep, [](void* p) noexcept { delete static_cast<Tensor*>(p); });
  std::vector<size_t> shape(t.shape().begin(), t.shape().end());
  if (t.device().is_cpu()) return nb::cast(F32Array(keep->f32(), shape.size(), shape.data(), owner));
  return nb::cast(nb::ndarray<float>(keep->data<float>(), shape.size(), shape.data(), owner, nullptr,
                                     nb::dtype<float>(), nb::device::cuda::value, t.device().index));
}

// A loaded model, on the CPU (its own parameters) or uploaded to the GPU for inference; with
// ep_size > 1, this rank's share of the experts, its layers exchanging tokens with the other ranks.
struct Model {
  std::unique_ptr<train::RankGroups> groups;  // first: the model's layers point into its groups
  models::LoadedModel loaded;
  std::unique_ptr<nn::ParamAccess> device;
  std::string device_name = "cpu";
  nn::ParamAccess& params() { return device ? *device : loaded.model->params(); }
  models::Parallel parallel() const {
    if (!groups) return {};
    return device ? groups->device_parallel() : groups->parallel();
  }
};

// ep_size > 1: every rank of the launcher's world (torchrun / srun / moeforge launch variables)
// joins as the trainer's ranks do, and loads only its experts.
std::unique_ptr<train::RankGroups> join_for_experts(const std::string& path, const std::string& device,
                                                    const std::string& dtype, int64_t ep_size) {
  const parallel::DistEnv env = parallel::dist_env();
  MF_CHECK(env.world_size > 1, "from_pretrained: ep_size ", ep_size, " splits the experts over ", ep_size,
           " ranks, but this process runs alone: start one per rank (torchrun, srun or moeforge launch)");
  if (device == "cuda") train::use_local_gpu(env, "from_pretrained: device='cuda'");
  const hf::ModelConfig cfg = hf::load_config(path);
  return train::join_ranks(env, ep_size, cfg.num_experts,
                           "from_pretrained " + path + " " + device + " " + dtype + " ep " + std::to_string(ep_size),
                           "from_pretrained(" + path + ")", device == "cuda");
}

std::unique_ptr<Model> from_pretrained(const std::string& path, const std::string& device, const std::string& dtype,
                                       const std::string& adapter, int64_t ep_size) {
  MF_CHECK(device == "cpu" || device == "cuda", "from_pretrained: device must be 'cpu' or 'cuda', got '", device, "'");
  MF_CHECK(dtype == "float32" || dtype == "bfloat16", "from_pretrained: dtype must be 'float32' or 'bfloat16', got '",
           dtype, "'");
  MF_CHECK(device == "cuda" || dtype == "float32", "from_pretrained: the CPU computes in float32 (dtype='bfloat16' needs device='cuda')");
  MF_CHECK(ep_size >= 1, "from_pretrained: ep_size must be 1 or more, got ", ep_size);
  MF_CHECK(adapter.empty() || ep_size == 1, "from_pretrained: an adapter with ep_size > 1 is not supported; load it "
           "with ep_size=1, or merge it into the model first (moeforge merge)");
  auto m = std::make_unique<Model>();
  if (ep_size > 1) m->groups = join_for_experts(path, device, dtype, ep_size);
  m->loaded = models::from_pretrained(path, {}, m->groups ? m->groups->parallel() : models::Parallel{});
  if (!adapter.empty()) models::apply_adapter_folder(*m->loaded.model, adapter);
  if (device == "cuda") {
    m->device = gpu::upload_for_inference(m->loaded.model->params(), dtype == "bfloat16" ? "bf16" : "fp32", "dtype");
    m->device_name = "cuda";
  }
  return m;
}

// generate's keyword arguments as a request: the call's values over the folder's
// generation_config.json, as Transformers' generate.
models::GenerationRequest request_of(std::optional<int64_t> max_new_tokens, int64_t min_new_tokens,
                                     std::optional<std::vector<int64_t>> eos, std::optional<bool> sample,
                                     std::optional<double> temperature, std::optional<int64_t> top_k,
                                     std::optional<double> top_p, std::optional<double> repetition_penalty,
                                     uint64_t seed) {
  models::GenerationRequest asked;
  asked.max_new_tokens = max_new_tokens;
  asked.min_new_tokens = min_new_tokens;
  asked.eos_token_ids = std::move(eos);
  asked.do_sample = sample;
  asked.temperature = temperature;
  asked.top_k = top_k;
  asked.top_p = top_p;
  asked.repetition_penalty = repetition_penalty;
  asked.seed = seed;
  return asked;
}

}  // namespace

NB_MODULE(_moeforge, mod) {
  nb::exception<Error>(mod, "Error", PyExc_RuntimeError);

  nb::class_<Model>(mod, "Model")
      .def_static("from_pretrained", &from_pretrained, nb::arg("path"), nb::arg("device") = "cpu",
                  nb::arg("dtype") = "float32", nb::arg("adapter") = "", nb::arg("ep_size") = 1,
                  nb::call_guard<nb::gil_scoped_release>())
      .def(
          "forward",
          [](Model& m, const IdArray& ids, std::optional<IdArray> labels, bool want_logits) {
            Tensor in_ids = ids_tensor(ids), in_labels;
            models::ForwardInputs in{in_ids};
            if (labels) {
              in_labels = ids_tensor(*labels);
              MF_CHECK(in_labels.shape() == in_ids.shape(), "labels ", shape_str(in_labels.shape()),
                       " must have input_ids' shape ", shape_str(in_ids.shape()));
              in.labels = &in_labels;
            }
            in.logits = want_logits || !labels;
            in.logits_on_device = true;  // a model on the GPU hands its logits over there
            models::ForwardOutputs out;
            {
              nb::gil_scoped_release release;
              out = m.loaded.model->forward(m.params(), in, m.parallel());
            }
            nb::object logits = out.logits.defined() ? to_array(out.logits) : nb::none();
            nb::object loss = labels ? nb::cast(static_cast<double>(out.loss)) : nb::none();
            nb::object aux = std::isnan(out.aux_loss) ? nb::none() : nb::cast(static_cast<double>(out.aux_loss));
            return nb::make_tuple(loss, logits, aux, out.loss_tokens);
          },
          nb::arg("input_ids"), nb::arg("labels") = nb::none(), nb::arg("logits") = true)
      .def(
          "generate",
          [](Model& m, const std::vector<int64_t>& prompt, std::optional<int64_t> max_new_tokens, int64_t min_new_tokens,
             std::optional<std::vector<int64_t>> eos, std::optional<bool> sample, std::optional<double> temperature,
             std::optional<int64_t> top_k, std::optional<double> top_p, std::optional<double> repetition_penalty,
             uint64_t seed, std::optional<nb::callable> streamer) {
            const models::GenerateOptions o = models::resolve_generation(
                request_of(max_new_tokens, min_new_tokens, eos, sample, temperature, top_k, top_p, repetition_penalty, seed),
                hf::load_generation_config(m.loaded.source_dir));
            nb::gil_scoped_release release;
            std::function<bool(int64_t)> on_token;
            if (streamer)
              on_token = [&](int64_t id) {
                nb::gil_scoped_acquire acquire;
                nb::object r = (*streamer)(id);
                return r.is_none() || nb::cast<bool>(r);
              };
            // With ep_size > 1 every rank generates (its own prompt) and the ranks step together.
            const auto res = models::generate(*m.loaded.model, m.params(), prompt, o, on_token, m.parallel());
            return std::make_pair(res.ids, res.stop_reason);
          },
          nb::arg("prompt"), nb::arg("max_new_tokens").none(), nb::arg("min_new_tokens"), nb::arg("eos_token_ids").none(),
          nb::arg("sample").none(), nb::arg("temperature").none(), nb::arg("top_k").none(), nb::arg("top_p").none(),
          nb::arg("repetition_penalty").none(), nb::arg("seed"), nb::arg("streamer") = nb::none())
      .def(
          "generate_many",
          [](Model& m, const std::vector<std::vector<int64_t>>& prompts, std::optional<int64_t> max_new_tokens,
             int64_t min_new_tokens, std::optional<std::vector<int64_t>> eos, std::optional<bool> sample,
             std::optional<double> temperature, std::optional<int64_t> top_k, std::optional<double> top_p,
             std::optional<double> repetition_penalty, uint64_t seed, int64_t max_batch) {
            // A batch of prompts, several sequences per model step (models::generate_many); each
            // row as generate() on it alone. Also returns the pad id Transformers fills finished
            // rows with: generation_config.json's pad_token_id, config.json's, else the first eos id.
            const hf::GenerationConfig gc = hf::load_generation_config(m.loaded.source_dir);
            const models::GenerateOptions o = models::resolve_generation(
                request_of(max_new_tokens, min_new_tokens, eos, sample, temperature, top_k, top_p, repetition_penalty, seed),
                gc);
            std::optional<int64_t> pad = gc.pad_token_id ? gc.pad_token_id : m.loaded.model->config().pad_token_id;
            if (!pad && !o.eos_token_ids.empty()) pad = o.eos_token_ids.front();
            std::vector<std::vector<int64_t>> out(prompts.size());
            {
              nb::gil_scoped_release release;
              models::generate_many(*m.loaded.model, m.params(), prompts,
                                    std::vector<models::GenerateOptions>(prompts.size(), o), max_batch, {},
                                    [&](size_t i, models::GenerateResult r) { out[i] = std::move(r.ids); });
            }
            return std::make_pair(out, pad);
          },
          nb::arg("prompts"), nb::arg("max_new_tokens").none(), nb::arg("min_new_tokens"), nb::arg("eos_token_ids").none(),
          nb::arg("sample").none(), nb::arg("temperature").none(), nb::arg("top_k").none(), nb::arg("top_p").none(),
          nb::arg("repetition_penalty").none(), nb::arg("seed"), nb::arg("max_batch"))
      .def(
          "save_pretrained",
          [](Model& m, const std::string& dir, const std::string& max_shard_size, bool overwrite) {
            MF_CHECK(!m.device, "save_pretrained: the model was loaded for inference on the GPU (its weights there "
                     "are a bf16/fp32 copy); load it on the CPU to save");
            models::SaveOptions o;
            o.max_shard_bytes = hf::parse_size(max_shard_size);
            o.overwrite = overwrite;
            if (m.groups)  // every rank calls it: each writes its experts into the one folder
              models::save_pretrained_across(*m.loaded.model, m.groups->parallel(), m.loaded.source_dir, dir, o);
            else
              models::save_pretrained(*m.loaded.model, m.loaded.source_dir, dir, o);
          },
          nb::arg("save_directory"), nb::arg("max_shard_size") = "5GB", nb::arg("overwrite") = true,
          nb::call_guard<nb::gil_scoped_release>())
      .def("config_json", [](const Model& m) { return m.loaded.model->config().raw.dump(); })
      .def("model_type", [](const Model& m) { return m.loaded.model->config().model_type; })
      .def("vocab_size", [](const Model& m) { return m.loaded.model->config().vocab_size; })
      .def("num_parameters",
           [](const Model& m) {  // the whole model's, also where this rank holds a share of the experts
             if (!m.groups) return m.loaded.model->params().numel();
             const auto sharded = models::expert_sharded_params(*m.loaded.model, m.groups->parallel());
             const auto& all = m.loaded.model->params().all();
             int64_t n = 0;
             for (size_t i = 0; i < all.size(); ++i) n += shape_numel(all[i].shape) * (sharded[i] ? m.groups->ep_size : 1);
             return n;
           })
      .def("active_parameters", [](const Model& m) { return m.loaded.model->active_parameters(); })
      .def_prop_ro("device", [](const Model& m) { return m.device_name; })
      .def_prop_ro("rank", [](const Model& m) { return m.groups ? m.groups->rank : 0; })
      .def_prop_ro("world_size", [](const Model& m) { return m.groups ? m.groups->world : 1; })
      .def_prop_ro("source_dir", [](const Model& m) { return m.loaded.source_dir; });

  mod.def(
      "train",
      [](const std::string& yaml, const std::string& origin, const std::string& base_dir,
         const std::vector<std::string>& overrides, std::optional<nb::callable> on_step,
         std::optional<nb::callable> on_eval) {
        const train::Recipe r = train::load_recipe_text(yaml, origin, base_dir, overrides);
        train::TrainCallbacks cb;
        if (on_step)
          cb.on_step = [&](const train::StepMetrics& m) {
            nb::gil_scoped_acquire acquire;
            nb::dict d;
            d["step"] = m.step;
            d["total_steps"] = m.total;
            d["loss"] = m.loss;
            d["lr"] = m.lr;
            d["grad_norm"] = m.grad_norm;
            d["tokens"] = m.tokens;
            if (m.aux_loss >= 0) d["aux_loss"] = m.aux_loss;
            if (m.mtp_loss >= 0) d["mtp_loss"] = m.mtp_loss;
            (*on_step)(d);
          };
        if (on_eval)
          cb.on_eval = [&](int64_t step, double loss) {
            nb::gil_scoped_acquire acquire;
            nb::dict d;
            d["step"] = step;
            d["eval_loss"] = loss;
            (*on_eval)(d);
          };
        train::TrainResult res;
        {
          nb::gil_scoped_release release;
          res = train::run_training(r, cb);
        }
        nb::dict out;
        out["steps_done"] = res.steps_done;
        out["losses"] = res.losses;
        out["final_dir"] = res.final_dir;
        out["output_dir"] = r.output_dir;
        return out;
      },
      nb::arg("yaml"), nb::arg("origin"), nb::arg("base_dir"), nb::arg("overrides"), nb::arg("on_step") = nb::none(),
      nb::arg("on_eval") = nb::none());

  mod.def("cuda_device_count", &cuda::device_count,
          "GPUs this process can use (0 without a GPU or without the CUDA backend in this build)");

  nb::class_<hf::Tokenizer>(mod, "Tokenizer")
      .def_static("load", &hf::Tokenizer::load, nb::arg("path"))
      .def("encode", [](const hf::Tokenizer& t, const std::string& s, bool special) { return t.encode(s, special); },
           nb::arg("text"), nb::arg("add_special_tokens") = true)
      .def("decode", &hf::Tokenizer::decode, nb::arg("ids"), nb::arg("skip_special_tokens") = false)
      .def("token_to_id", &hf::Tokenizer::token_to_id, nb::arg("token"))
      .def("id_to_token", &hf::Tokenizer::id_to_token, nb::arg("id"))
      .def("vocab_size", &hf::Tokenizer::vocab_size);

  // apply_chat_template: the rendered text, its ids and the assistant-token mask.
  mod.def(
      "apply_chat_template",
      [](const hf::Tokenizer& tok, const std::string& dir, const std::string& messages_json, bool add_generation_prompt,
         const std::string& template_file) {
        auto chat = template_file.empty() ? hf::ChatTemplate::load(dir)
                                          : std::optional<hf::ChatTemplate>(hf::ChatTemplate::from_source(
                                                hf::read_text_file(template_file), template_file, dir));
        MF_CHECK(chat, dir, ": no chat template (tokenizer_config.json 'chat_template' or chat_template.jinja)");
        hf::ChatOptions o;
        o.add_generation_prompt = add_generation_prompt;
        const auto enc = chat->encode(tok, nlohmann::ordered_json::parse(messages_json), o, !add_generation_prompt);
        return nb::make_tuple(enc.text, enc.ids, std::vector<int>(enc.assistant_mask.begin(), enc.assistant_mask.end()));
      },
      nb::arg("tokenizer"), nb::arg("dir"), nb::arg("messages_json"), nb::arg("add_generation_prompt"),
      nb::arg("template_file") = "");
}
