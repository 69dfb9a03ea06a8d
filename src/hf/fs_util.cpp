#include "hf/fs_util.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "core/fault_injection.h"

namespace moeforge::hf {

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  MF_CHECK(in.good(), path, ": cannot open (", std::strerror(errno), ")");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

AtomicFile::AtomicFile(std::string path) : path_(std::move(path)) {
  tmp_ = path_ + ".tmp." + std::to_string(::getpid());
  core::fault_point("create a temporary file");
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  MF_CHECK(fd_ >= 0, tmp_, ": cannot create (", std::strerror(errno), ")");
}

AtomicFile::~AtomicFile() {
  if (fd_ >= 0) {
    ::close(fd_);
    ::unlink(tmp_.c_str());
  }
}

void AtomicFile::write(const void* data, size_t n) {
  // Test hook: MOEFORGE_TEST_SLOW_WRITE_MS slows every write so a test can kill a save midway.
  static const int slow_ms = [] {
    const char* e = std::getenv("MOEFORGE_TEST_SLOW_WRITE_MS");
    return e ? std::atoi(e) : 0;
  }();
  if (slow_ms > 0) ::usleep(static_cast<useconds_t>(slow_ms) * 1000);
  core::fault_point("write a file");
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd_, p, n);
    if (w < 0 && errno == EINTR) continue;
    MF_CHECK(w > 0, tmp_, ": write failed (", std::strerror(errno), ")");
    p += w;
    n -= static_cast<size_t>(w);
  }
}

void AtomicFile::commit() {
  core::fault_point("fsync a file");
  MF_CHECK(::fsync(fd_) == 0, tmp_, ": fsync failed (", std::strerror(errno), ")");
  ::close(fd_);
  fd_ = -1;
  core::fault_point("rename a file into place");
  if (::rename(tmp_.c_str(), path_.c_str()) != 0) {
    const int e = errno;
    ::unlink(tmp_.c_str());
    MF_THROW(path_, ": cannot rename into place (", std::strerror(e), ")");
  }
  core::fault_point("after renaming a file into place");
}

void write_text_file_atomic(const std::string& path, const std::string& text) {
  AtomicFile f(path);
  f.write(text.data(), text.size());
  f.commit();
}

void fsync_dir(const std::string& dir) {
  core::fault_point("fsync a folder");
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

void check_json_depth(const std::string& text, const std::string& where) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') ++i;  // the escaped character cannot end the string
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      MF_CHECK(++depth <= kMaxJsonDepth, where, ": JSON nested deeper than ", kMaxJsonDepth,
               " levels (at byte ", i, "); refusing to parse it");
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
}

nlohmann::ordered_json read_json_file(const std::string& path) {
  const std::string text = read_text_file(path);
  check_json_depth(text, path);
  try {
    return nlohmann::ordered_json::parse(text);
  } catch (const nlohmann::ordered_json::exception& e) {
    MF_THROW(path, ": invalid JSON (", e.what(), ")");
  }
}

}  // namespace moeforge::hf
