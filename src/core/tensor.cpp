#include "core/tensor.h"

#include <cstdlib>
#include <cstring>
#include <sstream>

#include "core/error.h"

namespace moeforge {

Device Device::parse(const std::string& s) {
  if (s == "cpu") return cpu();
  if (s == "cuda") return cuda(0);
  if (s.rfind("cuda:", 0) == 0) {
    try {
      return cuda(std::stoi(s.substr(5)));
    } catch (const std::exception&) {
    }
  }
  MF_THROW("unknown device '", s, "' (expected cpu, cuda or cuda:N)");
}

std::string Device::str() const { return is_cpu() ? "cpu" : "cuda:" + std::to_string(index); }

std::string shape_str(const Shape& s) {
  std::ostringstream os;
  os << '[';
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << ']';
  return os.str();
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (auto d : s) n *= d;
  return n;
}

std::shared_ptr<Storage> Storage::allocate(size_t nbytes, Device device) {
  MF_CHECK(device.is_cpu(), "cannot allocate on ", device.str(), ": this build has no CUDA backend");
  auto s = std::make_shared<Storage>();
  const size_t rounded = (nbytes + 63) / 64 * 64;
  void* p = rounded ? std::aligned_alloc(64, rounded) : nullptr;
  MF_CHECK(p || rounded == 0, "out of host memory allocating ", nbytes, " bytes");
  if (p) std::memset(p, 0, rounded);
  s->data_ = p;
  s->nbytes_ = nbytes;
  s->device_ = device;
  s->owner_ = std::shared_ptr<void>(p, [](void* q) { std::free(q); });
  return s;
}

std::shared_ptr<Storage> Storage::wrap(void* data, size_t nbytes, std::shared_ptr<void> keep_alive,
                                       Device device) {
  auto s = std::make_shared<Storage>();
  s->data_ = data;
  s->nbytes_ = nbytes;
  s->device_ = device;
  s->owner_ = std::move(keep_alive);
  return s;
}

Tensor::Tensor(std::shared_ptr<Storage> storage, size_t offset, Shape shape, DType dtype)
    : storage_(std::move(storage)), offset_(offset), shape_(std::move(shape)), dtype_(dtype) {
  for (auto d : shape_) MF_CHECK(d >= 0, "negative dimension in shape ", shape_str(shape_));
  numel_ = shape_numel(shape_);
  MF_CHECK(offset_ + nbytes() <= storage_->nbytes(), "tensor of shape ", shape_str(shape_),
           " does not fit its storage");
}

Tensor Tensor::empty(Shape shape, DType dtype, Device device) {
  const size_t n = static_cast<size_t>(shape_numel(shape)) * dtype_size(dtype);
  return Tensor(Storage::allocate(n, device), 0, std::move(shape), dtype);
}

Tensor Tensor::zeros(Shape shape, DType dtype, Device device) { return empty(std::move(shape), dtype, device); }

Tensor Tensor::from_vector(const std::vector<float>& v, Shape shape, DType dtype) {
  MF_CHECK(shape_numel(shape) == static_cast<int64_t>(v.size()), "from_vector: ", v.size(),
           " values for shape ", shape_str(shape));
  Tensor t = empty(std::move(shape), dtype);
  convert_elements(v.data(), DType::F32, t.raw(), dtype, t.numel());
  return t;
}

Tensor Tensor::from_i64(const std::vector<int64_t>& v, Shape shape) {
  MF_CHECK(shape_numel(shape) == static_cast<int64_t>(v.size()), "from_i64: ", v.size(),
           " values for shape ", shape_str(shape));
  Tensor t = empty(std::move(shape), DType::I64);
  std::memcpy(t.raw(), v.data(), v.size() * 8);
  return t;
}

int64_t Tensor::size(int64_t d) const {
  if (d < 0) d += dim();
  MF_CHECK(d >= 0 && d < dim(), "dimension ", d, " out of range for shape ", shape_str(shape_));
  return shape_[d];
}

float* Tensor::f32() const {
  MF_CHECK(dtype_ == DType::F32, "expected an F32 tensor, got ", dtype_name(dtype_));
  return data<float>();
}

int64_t* Tensor::i64() const {
  MF_CHECK(dtype_ == DType::I64, "expected an I64 tensor, got ", dtype_name(dtype_));
  return data<int64_t>();
}

Tensor Tensor::view(Shape shape) const {
  int64_t known = 1, infer = -1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == -1) {
      MF_CHECK(infer < 0, "view: more than one -1 in ", shape_str(shape));
      infer = static_cast<int64_t>(i);
    } else {
      known *= shape[i];
    }
  }
  if (infer >= 0) {
    MF_CHECK(known > 0 && numel_ % known == 0, "view: cannot view ", shape_str(shape_), " as ", shape_str(shape));
    shape[infer] = numel_ / known;
  }
  MF_CHECK(shape_numel(shape) == numel_, "view: cannot view ", shape_str(shape_), " as ", shape_str(shape));
  return Tensor(storage_, offset_, std::move(shape), dtype_);
}

Tensor Tensor::slice0(int64_t start, int64_t len) const {
  MF_CHECK(dim() >= 1 && start >= 0 && len >= 0 && start + len <= shape_[0], "slice0: rows [", start, ", ",
           start + len, ") out of range for shape ", shape_str(shape_));
  Shape s = shape_;
  s[0] = len;
  const size_t row = static_cast<size_t>(shape_numel(shape_) / std::max<int64_t>(shape_[0], 1));
  return Tensor(storage_, offset_ + static_cast<size_t>(start) * row * dtype_size(dtype_), std::move(s), dtype_);
}

Tensor Tensor::to(DType dtype) const {
  MF_CHECK(device().is_cpu(), "Tensor::to: only CPU tensors can be converted here");
  Tensor out = empty(shape_, dtype);
  convert_elements(raw(), dtype_, out.raw(), dtype, numel_);
  return out;
}

float Tensor::item_f32(int64_t i) const {
  MF_CHECK(i >= 0 && i < numel_, "item_f32: index ", i, " out of range for ", numel_, " elements");
  float v;
  convert_elements(static_cast<const char*>(raw()) + static_cast<size_t>(i) * dtype_size(dtype_), dtype_, &v,
                   DType::F32, 1);
  return v;
}

std::vector<float> Tensor::to_f32_vector() const {
  std::vector<float> v(static_cast<size_t>(numel_));
  convert_elements(raw(), dtype_, v.data(), DType::F32, numel_);
  return v;
}

namespace {

double load_as_double(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::F64: return static_cast<const double*>(p)[i];
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::I64: return static_cast<double>(static_cast<const int64_t*>(p)[i]);
    case DType::I32: return static_cast<const int32_t*>(p)[i];
    case DType::I16: return static_cast<const int16_t*>(p)[i];
    case DType::I8: return static_cast<const int8_t*>(p)[i];
    case DType::U8: return static_cast<const uint8_t*>(p)[i];
    case DType::Bool: return static_cast<const uint8_t*>(p)[i] ? 1.0 : 0.0;
    default: MF_THROW("no element conversion from ", dtype_name(t), " (dequantise it first)");
  }
}

void store_double(void* p, DType t, int64_t i, double v) {
  switch (t) {
    case DType::F64: static_cast<double*>(p)[i] = v; break;
    case DType::F32: static_cast<float*>(p)[i] = static_cast<float>(v); break;
    case DType::F16: static_cast<uint16_t*>(p)[i] = f32_to_f16(static_cast<float>(v)); break;
    case DType::BF16: static_cast<uint16_t*>(p)[i] = f32_to_bf16(static_cast<float>(v)); break;
    case DType::I64: static_cast<int64_t*>(p)[i] = static_cast<int64_t>(v); break;
    case DType::I32: static_cast<int32_t*>(p)[i] = static_cast<int32_t>(v); break;
    case DType::I16: static_cast<int16_t*>(p)[i] = static_cast<int16_t>(v); break;
    case DType::I8: static_cast<int8_t*>(p)[i] = static_cast<int8_t>(v); break;
    case DType::U8: static_cast<uint8_t*>(p)[i] = static_cast<uint8_t>(v); break;
    case DType::Bool: static_cast<uint8_t*>(p)[i] = v != 0.0; break;
    default: MF_THROW("no element conversion to ", dtype_name(t));
  }
}

}  // namespace

void convert_elements(const void* src, DType src_t, void* dst, DType dst_t, int64_t n) {
  if (src_t == dst_t) {
    std::memcpy(dst, src, static_cast<size_t>(n) * dtype_size(src_t));
    return;
  }
  // Fast paths for the conversions on the hot loading path.
  if (src_t == DType::BF16 && dst_t == DType::F32) {
    auto s = static_cast<const uint16_t*>(src);
    auto d = static_cast<float*>(dst);
#pragma omp parallel for if (n > (1 << 16))
    for (int64_t i = 0; i < n; ++i) d[i] = bf16_to_f32(s[i]);
    return;
  }
  if (src_t == DType::F32 && dst_t == DType::BF16) {
    auto s = static_cast<const float*>(src);
    auto d = static_cast<uint16_t*>(dst);
#pragma omp parallel for if (n > (1 << 16))
    for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(s[i]);
    return;
  }
  for (int64_t i = 0; i < n; ++i) store_double(dst, dst_t, i, load_as_double(src, src_t, i));
}

}  // namespace moeforge
