// Tensor: a contiguous, row-major view into shared storage. Small on purpose (as in MLX): shape,
// dtype, device and a byte offset into a reference-counted Storage. Storage can own heap memory
// or keep a memory-mapped checkpoint file alive, so loading a checkpoint copies nothing.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace moeforge {

struct Device {
  enum class Kind : uint8_t { CPU, CUDA };
  Kind kind = Kind::CPU;
  int index = 0;
  static Device cpu() { return {}; }
  static Device cuda(int i) { return {Kind::CUDA, i}; }
  static Device parse(const std::string& s);  // "cpu", "cuda", "cuda:1"
  bool is_cpu() const { return kind == Kind::CPU; }
  std::string str() const;
  bool operator==(const Device& o) const { return kind == o.kind && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
};

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);
int64_t shape_numel(const Shape& s);

class Storage {
 public:
  // Heap memory, 64-byte aligned (for vector loads), zero-initialised.
  static std::shared_ptr<Storage> allocate(size_t nbytes, Device device = Device::cpu());
  // Borrowed memory whose lifetime `keep_alive` holds (e.g. an mmap of a safetensors file).
  static std::shared_ptr<Storage> wrap(void* data, size_t nbytes, std::shared_ptr<void> keep_alive,
                                       Device device = Device::cpu());
  void* data() const { return data_; }
  size_t nbytes() const { return nbytes_; }
  Device device() const { return device_; }

 private:
  void* data_ = nullptr;
  size_t nbytes_ = 0;
  Device device_;
  std::shared_ptr<void> owner_;
};

class Tensor {
 public:
  Tensor() = default;
  Tensor(std::shared_ptr<Storage> storage, size_t offset, Shape shape, DType dtype);

  static Tensor empty(Shape shape, DType dtype, Device device = Device::cpu());
  static Tensor zeros(Shape shape, DType dtype, Device device = Device::cpu());
  static Tensor from_vector(const std::vector<float>& v, Shape shape, DType dtype = DType::F32);
  static Tensor from_i64(const std::vector<int64_t>& v, Shape shape);

  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  int64_t dim() const { return static_cast<int64_t>(shape_.size()); }
  int64_t size(int64_t d) const;  // negative d counts from the end
  int64_t numel() const { return numel_; }
  size_t nbytes() const { return static_cast<size_t>(numel_) * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  Device device() const { return storage_ ? storage_->device() : Device::cpu(); }
  const std::shared_ptr<Storage>& storage() const { return storage_; }

  void* raw() const { return static_cast<char*>(storage_->data()) + offset_; }
  template <typename T>
  T* data() const { return static_cast<T*>(raw()); }
  // Typed access with a dtype check (throws naming the expected and actual dtype).
  float* f32() const;
  int64_t* i64() const;

  // Same storage, new shape with the same element count; one dimension may be -1.
  Tensor view(Shape shape) const;
  // Rows [start, start+len) along dimension 0, sharing storage.
  Tensor slice0(int64_t start, int64_t len) const;
  // A new tensor converted to `dtype` (always a copy, even when the dtype is the same).
  Tensor to(DType dtype) const;
  Tensor clone() const { return to(dtype_); }
  // Element i as float (any floating or integer dtype); slow, for tests and small tensors.
  float item_f32(int64_t i = 0) const;
  std::vector<float> to_f32_vector() const;

 private:
  std::shared_ptr<Storage> storage_;
  size_t offset_ = 0;
  Shape shape_;
  int64_t numel_ = 0;
  DType dtype_ = DType::F32;
};

// Element-wise conversion between any two dtypes through f32 (f64 and i64 keep full precision).
void convert_elements(const void* src, DType src_t, void* dst, DType dst_t, int64_t n);

}  // namespace moeforge
