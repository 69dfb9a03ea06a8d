#include "data/file_bytes.h"

#include <cerrno>

#include "core/error.h"

namespace moeforge::data {

FileBytes FileBytes::open(const std::string& path) {
  FileBytes f;
  f.name_ = path;
  std::FILE* fp = std::fopen(path.c_str(), "rb");
  MF_CHECK(fp, path, ": cannot open (", std::strerror(errno), ")");
  f.file_.reset(fp, [](std::FILE* p) { std::fclose(p); });
  MF_CHECK(std::fseek(fp, 0, SEEK_END) == 0, path, ": cannot seek (", std::strerror(errno), ")");
  f.size_ = std::ftell(fp);
  return f;
}

FileBytes FileBytes::from_bytes(std::string bytes, const std::string& name) {
  FileBytes f;
  f.name_ = name;
  f.bytes_ = std::move(bytes);
  f.size_ = static_cast<int64_t>(f.bytes_.size());
  return f;
}

std::vector<uint8_t> FileBytes::read_at(int64_t offset, int64_t size, const std::string& what) const {
  MF_CHECK(offset >= 0 && size >= 0 && offset <= size_ && size <= size_ - offset, name_, ": ", what, " (bytes ", offset,
           " to ", offset + size, ") lies outside the file's ", size_, " bytes");
  std::vector<uint8_t> out(static_cast<size_t>(size));
  if (out.empty()) return out;
  if (!file_) {
    std::memcpy(out.data(), bytes_.data() + offset, out.size());
    return out;
  }
  MF_CHECK(std::fseek(file_.get(), offset, SEEK_SET) == 0 && std::fread(out.data(), 1, out.size(), file_.get()) == out.size(),
           name_, ": cannot read ", what, " (", std::strerror(errno), ")");
  return out;
}

}  // namespace moeforge::data
