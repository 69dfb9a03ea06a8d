#include "hf/state_dict.h"

#include <cstring>

#include "core/error.h"
#include "core/logging.h"
#include "hf/dequantize.h"

namespace moeforge::hf {

namespace {

// Copies `src` (any float dtype) into rows [row0, row0 + src rows) of expert e of `dst` [E, R, C].
void copy_into_expert(Tensor& dst, int64_t e, int64_t row0, const Tensor& src) {
  const int64_t rows = dst.size(1), cols = dst.size(2);
  char* base = static_cast<char*>(dst.raw()) +
               static_cast<size_t>((e * rows + row0) * cols) * dtype_size(dst.dtype());
  convert_elements(src.raw(), src.dtype(), base, dst.dtype(), src.numel());
}

// [E, R, C] F32 -> [E, C, R].
Tensor transpose_last_two(const Tensor& x) {
  const int64_t e = x.size(0), r = x.size(1), c = x.size(2);
  Tensor out = Tensor::empty({e, c, r}, DType::F32);
  const float* in = x.f32();
  float* o = out.f32();
  for (int64_t i = 0; i < e; ++i)
    for (int64_t a = 0; a < r; ++a)
      for (int64_t b = 0; b < c; ++b) o[(i * c + b) * r + a] = in[(i * r + a) * c + b];
  return out;
}

Tensor expert_rows(const Tensor& fused, int64_t e, int64_t row0, int64_t nrows, DType dtype) {
  const int64_t rows = fused.size(1), cols = fused.size(2);
  Tensor out = Tensor::empty({nrows, cols}, dtype);
  const char* base = static_cast<const char*>(fused.raw()) +
                     static_cast<size_t>((e * rows + row0) * cols) * dtype_size(fused.dtype());
  convert_elements(base, fused.dtype(), out.raw(), dtype, out.numel());
  return out;
}

void check_shape(const SafetensorsCheckpoint& ckpt, const std::string& name, const Shape& want, bool fp8_ok = false) {
  const auto& e = ckpt.entry(name);
  MF_CHECK(e.shape == want, ckpt.file_of(name), ": tensor '", name, "' has shape ", shape_str(e.shape),
           " but the config implies ", shape_str(want));
  MF_CHECK(is_floating(e.dtype) && (fp8_ok || (e.dtype != DType::F8_E4M3 && e.dtype != DType::F8_E5M2)), ckpt.file_of(name),
           ": tensor '", name, "' has dtype ", dtype_name(e.dtype),
           " where a floating-point weight is expected (an FP8 checkpoint needs quantization_config and "
           "'<name>_scale_inv' tensors)");
}

}  // namespace

void StateDictAdapter::add_expert_group(ExpertGroup g) {
  group_index_[g.gate_up] = groups_.size();
  group_index_[g.down] = groups_.size();
  for (const auto& n : g.fused_extra) group_index_[n] = groups_.size();
  groups_.push_back(std::move(g));
}

bool StateDictAdapter::in_expert_group(const std::string& name) const {
  for (const auto& g : groups_)
    if (name.compare(0, g.prefix.size(), g.prefix) == 0) return true;
  return false;
}

const ExpertGroup* StateDictAdapter::group_of(const std::string& internal) const {
  auto it = group_index_.find(internal);
  if (it == group_index_.end()) {
    // The experts' LoRA adapters (nn::ExpertLora: "<fused>.lora_A.weight") are sharded with them.
    for (const char* tail : {".lora_A.weight", ".lora_B.weight"}) {
      const std::string t = tail;
      if (internal.size() > t.size() && internal.compare(internal.size() - t.size(), t.size(), t) == 0)
        it = group_index_.find(internal.substr(0, internal.size() - t.size()));
      if (it != group_index_.end()) break;
    }
  }
  return it == group_index_.end() ? nullptr : &groups_[it->second];
}

LoadReport StateDictAdapter::load(const SafetensorsCheckpoint& ckpt, nn::ParamStore& params, DType compute) {
  LoadReport report;
  bool sliced = false;  // this model holds only some of the experts
  std::set<std::string> used;
  auto need = [&](const std::string& name) {
    MF_CHECK(ckpt.contains(name), ckpt.dir(), ": missing tensor '", name, "'");
    used.insert(name);
    source_dtype_[name] = ckpt.entry(name).dtype;
    ++report.tensors_found;
  };
  for (auto& p : params.all()) {
    if (p.lora) continue;  // LoRA adapters are not base weights (models/lora.h saves them apart)
    const ExpertGroup* g = group_of(p.name);
    if (!g) {
      ++report.tensors_expected;
      std::string name = checkpoint_name(p.name);
      if (name != p.name && !ckpt.contains(name) && ckpt.contains(p.name)) name = p.name;  // in-memory spelling
      need(name);
      p.value = read_weight(ckpt, name, p.shape, used).to(compute);
      loaded_as_[p.name] = name;
      continue;
    }
    const bool is_gate_up = p.name == g->gate_up;
    const int64_t here = p.shape[0];  // experts this model holds: [g->first, g->first + here)
    sliced = sliced || here < g->experts;
    MF_CHECK(g->first >= 0 && g->first + here <= g->experts, "internal: expert slice [", g->first, ", ",
             g->first + here, ") of ", g->experts);
    p.value = Tensor::empty(p.shape, compute);
    if (ckpt.contains(p.name)) {  // fused layout, stored as Transformers 5 holds it
      ++report.tensors_expected;
      need(p.name);
      Shape whole = p.shape;
      whole[0] = g->experts;
      check_shape(ckpt, p.name, whole);
      const Tensor all = ckpt.get(p.name);
      p.value = (here == g->experts ? all : all.slice0(g->first, here)).to(compute);
      fused_loaded_.insert(g->prefix);
      continue;
    }
    if (!g->per_expert) {  // fused only: the tensor, or its MXFP4 blocks and scales
      const std::string blocks = p.name + "_blocks", scales = p.name + "_scales";
      MF_CHECK(ckpt.contains(blocks) && ckpt.contains(scales), ckpt.dir(), ": missing tensor '", p.name,
               "' (nor its MXFP4 '", blocks, "' and '", scales, "')");
      ++report.tensors_expected;
      need(blocks);
      need(scales);
      // [E, R, G*32] as the blocks hold the rows, then Transformers' transpose(1, 2) to [E, C, R].
      const Tensor rows = dequantize_mxfp4(ckpt.get(blocks), ckpt.get(scales), DType::F32, ckpt.file_of(blocks));
      MF_CHECK(rows.dim() == 3 && rows.size(0) == g->experts && rows.size(2) == p.shape[1] && rows.size(1) == p.shape[2],
               ckpt.file_of(blocks), ": tensor '", blocks, "' dequantises to ", shape_str(rows.shape()),
               " but the config implies ", shape_str({g->experts, p.shape[2], p.shape[1]}), " (before the transpose)");
      Tensor whole = transpose_last_two(rows);
      p.value = (here == g->experts ? whole : whole.slice0(g->first, here)).to(compute);
      fused_loaded_.insert(g->prefix);
      dequantized_.insert(p.name);
      continue;
    }
    MF_CHECK(!fused_loaded_.count(g->prefix), ckpt.dir(), ": expert group '", g->prefix,
             "' mixes the fused and the per-expert layout");
    const int64_t rows = p.shape[1], cols = p.shape[2];
    for (int64_t local = 0; local < here; ++local) {
      const int64_t e = g->first + local;
      const std::string pre = g->prefix + std::to_string(e) + ".";
      if (is_gate_up) {
        const std::vector<std::string> parts = g->gate_up_parts();
        const int64_t inter = rows / static_cast<int64_t>(parts.size());
        for (size_t part = 0; part < parts.size(); ++part) {
          const std::string n = pre + parts[part];
          ++report.tensors_expected;
          need(n);
          copy_into_expert(p.value, local, static_cast<int64_t>(part) * inter, read_weight(ckpt, n, {inter, cols}, used));
        }
      } else {
        const std::string n = pre + g->down_suffix;
        ++report.tensors_expected;
        need(n);
        copy_into_expert(p.value, local, 0, read_weight(ckpt, n, {rows, cols}, used));
      }
    }
  }
  std::vector<int64_t> ignored_by_prefix(ignored_prefixes_.size(), 0);
  for (const auto& n : ckpt.names()) {
    if (used.count(n)) continue;
    if (sliced && in_expert_group(n)) continue;  // experts another rank holds
    if (sliced && n.size() > 10 && n.compare(n.size() - 10, 10, "_scale_inv") == 0 &&
        in_expert_group(n.substr(0, n.size() - 10)))
      continue;  // the FP8 scales of experts another rank holds
    bool by_prefix = false;
    for (size_t i = 0; i < ignored_prefixes_.size() && !by_prefix; ++i)
      if (n.rfind(ignored_prefixes_[i].first, 0) == 0) {
        ++ignored_by_prefix[i];
        by_prefix = true;
      }
    if (by_prefix) continue;
    if (ignored_.count(n)) {
      source_dtype_[n] = ckpt.entry(n).dtype;
      continue;
    }
    if (copies_.count(n)) {
      source_dtype_[n] = ckpt.entry(n).dtype;
      copies_found_.insert(n);
      continue;
    }
    report.unexpected.push_back(n);
  }
  for (size_t i = 0; i < ignored_prefixes_.size(); ++i)
    if (ignored_by_prefix[i])
      log::info(ckpt.dir(), ": ", ignored_by_prefix[i], " tensor(s) under '", ignored_prefixes_[i].first, "' are not used (",
                ignored_prefixes_[i].second, ")");
  if (!report.unexpected.empty())
    log::warn(ckpt.dir(), ": ", report.unexpected.size(), " tensor(s) in the checkpoint are not used by the model, e.g. '",
              report.unexpected.front(), "'");
  return report;
}

Tensor StateDictAdapter::read_weight(const SafetensorsCheckpoint& ckpt, const std::string& name, const Shape& want,
                                     std::set<std::string>& used) {
  const std::string scales = name + "_scale_inv";
  const bool fp8 = fp8_rows_ > 0 && ckpt.entry(name).dtype == DType::F8_E4M3 && ckpt.contains(scales);
  check_shape(ckpt, name, want, fp8);
  if (!fp8) return ckpt.get(name);
  used.insert(scales);
  dequantized_.insert(name);
  source_dtype_.erase(name);  // saved in the model's dtype, not as FP8
  return dequantize_fp8_blocks(ckpt.get(name), ckpt.get(scales), fp8_rows_, fp8_cols_, DType::F32, ckpt.file_of(name) + ": " + name);
}

std::string StateDictAdapter::checkpoint_name(const std::string& internal) const {
  if (auto it = loaded_as_.find(internal); it != loaded_as_.end()) return it->second;
  if (auto it = renames_.find(internal); it != renames_.end()) return it->second;
  return internal;
}

NamedTensors StateDictAdapter::export_tensors(const nn::ParamStore& params, std::optional<DType> default_dtype) const {
  NamedTensors out;
  auto dtype_for = [&](const std::string& name, const Tensor& t) {
    auto it = source_dtype_.find(name);
    if (it != source_dtype_.end()) return it->second;
    return default_dtype.value_or(t.dtype());
  };
  for (const auto& p : params.all()) {
    if (p.lora) continue;
    MF_CHECK(p.value.defined(), "parameter '", p.name, "' has no value to save");
    const ExpertGroup* g = group_of(p.name);
    if (!g || !g->per_expert || fused_loaded_.count(g->prefix)) {
      MF_CHECK(!g || p.shape[0] == g->experts, "internal: exporting ", p.shape[0], " of ", g ? g->experts : 0,
               " experts of '", p.name, "' in the fused layout (one tensor cannot be split over files)");
      const std::string name = g ? p.name : checkpoint_name(p.name);
      out.emplace_back(name, p.value.to(dtype_for(name, p.value)));
      continue;
    }
    const int64_t rows = p.shape[1];
    for (int64_t local = 0; local < p.shape[0]; ++local) {
      const std::string pre = g->prefix + std::to_string(g->first + local) + ".";
      if (p.name == g->gate_up) {
        const std::vector<std::string> parts = g->gate_up_parts();
        const int64_t part_rows = rows / static_cast<int64_t>(parts.size());
        for (size_t part = 0; part < parts.size(); ++part) {
          const std::string n = pre + parts[part];
          out.emplace_back(n, expert_rows(p.value, local, static_cast<int64_t>(part) * part_rows, part_rows,
                                          dtype_for(n, p.value)));
        }
      } else {
        const std::string dn = pre + g->down_suffix;
        out.emplace_back(dn, expert_rows(p.value, local, 0, rows, dtype_for(dn, p.value)));
      }
    }
  }
  for (const auto& name : copies_found_) {
    const nn::Param* p = params.find(copies_.at(name));
    MF_CHECK(p, "internal: '", name, "' copies '", copies_.at(name), "', which is not a parameter");
    out.emplace_back(name, p->value.to(dtype_for(name, p->value)));
  }
  return out;
}

std::vector<std::pair<std::string, Shape>> StateDictAdapter::expected_hub_tensors(const nn::ParamStore& params) const {
  std::vector<std::pair<std::string, Shape>> out;
  for (const auto& p : params.all()) {
    if (p.lora) continue;
    const ExpertGroup* g = group_of(p.name);
    if (!g) {
      out.emplace_back(checkpoint_name(p.name), p.shape);
      continue;
    }
    if (!g->per_expert) {
      Shape whole = p.shape;
      whole[0] = g->experts;
      out.emplace_back(p.name, whole);
      continue;
    }
    for (int64_t e = 0; e < g->experts; ++e) {
      const std::string pre = g->prefix + std::to_string(e) + ".";
      if (p.name == g->gate_up) {
        const std::vector<std::string> parts = g->gate_up_parts();
        for (const std::string& part : parts)
          out.emplace_back(pre + part, Shape{p.shape[1] / static_cast<int64_t>(parts.size()), p.shape[2]});
      } else {
        out.emplace_back(pre + g->down_suffix, Shape{p.shape[1], p.shape[2]});
      }
    }
  }
  return out;
}

}  // namespace moeforge::hf
