#include "nn/generation_state.h"

#include "core/error.h"
#include "ops/ops.h"

namespace moeforge::nn {

void copy_rows(const Tensor& src, Tensor& dst, int64_t row0) {
  const int64_t rows = src.size(0), width = src.numel() / std::max<int64_t>(rows, 1);
  MF_CHECK(dst.numel() / dst.size(0) == width && row0 + rows <= dst.size(0), "internal: copy_rows of ",
           shape_str(src.shape()), " into ", shape_str(dst.shape()), " at row ", row0);
  if (rows == 0) return;
  Tensor part = dst.slice0(row0, rows).view({rows, width});
  ops::copy_columns(src.view({rows, width}), width, 0, 1, part, width, 0, width);
}

void KvCache::append(const Tensor& k_new, const Tensor& v_new, Tensor& k_all, Tensor& v_all) {
  const int64_t s = k_new.size(0), heads = k_new.size(1);
  MF_CHECK(length + s <= capacity, "generation: ", length + s, " positions exceed the ", capacity,
           " the key/value cache was made for");
  if (!k.defined()) {
    k = ops::empty({capacity, heads, k_new.size(2)}, k_new.dtype(), k_new.device(), "key cache");
    v = ops::empty({capacity, heads, v_new.size(2)}, v_new.dtype(), v_new.device(), "value cache");
  }
  copy_rows(k_new, k, length);
  copy_rows(v_new, v, length);
  length += s;
  k_all = k.slice0(0, length).view({1, length, heads, k.size(2)});
  v_all = v.slice0(0, length).view({1, length, heads, v.size(2)});
}

Tensor per_sequence(const std::vector<int64_t>& offsets, int64_t width, DType dtype, Device device,
                    const std::function<Tensor(size_t, int64_t, int64_t)>& fn) {
  MF_CHECK(offsets.size() >= 2 && offsets.front() == 0, "internal: a generation step needs at least one sequence");
  const int64_t t = offsets.back();
  if (offsets.size() == 2) return fn(0, 0, t).view({t, width});  // one sequence: no gather
  Tensor out = ops::empty({t, width}, dtype, device, "per-sequence outputs");
  for (size_t i = 0; i + 1 < offsets.size(); ++i) {
    const int64_t r0 = offsets[i], n = offsets[i + 1] - r0;
    MF_CHECK(n > 0, "internal: sequence ", i, " of a generation step has no tokens");
    copy_rows(fn(i, r0, n).view({n, width}), out, r0);
  }
  return out;
}

}  // namespace moeforge::nn
