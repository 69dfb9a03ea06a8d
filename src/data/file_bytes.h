// The bytes of a columnar dataset file (Parquet, Arrow IPC), read where they are asked for: from
// the file on disk (a dataset of gigabytes is never read whole), or from memory (tests and the
// fuzzers). Every read is checked against the file's size first; errors name the file.
#pragma once
#include <bit>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace moeforge::data {

class FileBytes {
 public:
  static FileBytes open(const std::string& path);
  // `name` stands for the file in errors.
  static FileBytes from_bytes(std::string bytes, const std::string& name);

  const std::string& name() const { return name_; }
  int64_t size() const { return size_; }
  // Bytes [offset, offset + size); `what` names them in the error when they lie outside the file.
  std::vector<uint8_t> read_at(int64_t offset, int64_t size, const std::string& what) const;

 private:
  std::string name_;
  std::string bytes_;  // the whole file, when read from memory
  std::shared_ptr<std::FILE> file_;
  int64_t size_ = 0;
};

// A little-endian value of T at p (any alignment). The file formats are little-endian; so must the
// host be.
static_assert(std::endian::native == std::endian::little, "moeforge reads little-endian files on little-endian hosts");
template <typename T>
T read_le(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

}  // namespace moeforge::data
