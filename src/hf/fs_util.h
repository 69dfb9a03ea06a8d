// File helpers shared by the readers and writers: whole-file reads and atomic writes.
#pragma once
#include <cstddef>
#include <nlohmann/json.hpp>
#include <string>

namespace moeforge::hf {

std::string read_text_file(const std::string& path);
// Untrusted JSON is checked with this before it is parsed: nesting deeper than kMaxJsonDepth arrays
// and objects is one error naming `where` (the JSON library parses, copies and frees nested values
// recursively, so a hostile file of a few hundred kilobytes of brackets would overflow the stack).
constexpr int kMaxJsonDepth = 512;
void check_json_depth(const std::string& text, const std::string& where);
// A JSON file with its key order kept; malformed JSON is one error naming the file.
nlohmann::ordered_json read_json_file(const std::string& path);

// Writes to `path.tmp.<pid>`, fsyncs on commit() and renames over `path`; an uncommitted
// AtomicFile removes its temporary file, so `path` is either the old or the complete new file.
class AtomicFile {
 public:
  explicit AtomicFile(std::string path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  void write(const void* data, size_t n);
  void commit();

 private:
  std::string path_, tmp_;
  int fd_ = -1;
};

void write_text_file_atomic(const std::string& path, const std::string& text);
// fsync a directory so a rename inside it survives a crash.
void fsync_dir(const std::string& dir);

}  // namespace moeforge::hf
