#include "data/token_cache.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <sstream>

#include "core/error.h"
#include "core/logging.h"
#include "hf/fs_util.h"

namespace moeforge::data {

namespace fs = std::filesystem;

namespace {

constexpr char kMagic[8] = {'M', 'F', 'T', 'O', 'K', 'C', '0', '1'};
constexpr char kEnd[8] = {'M', 'F', 'T', 'O', 'K', 'E', 'N', 'D'};

uint64_t fnv1a(const void* data, size_t n, uint64_t h = 1469598103934665603ull) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

std::string fixed(double v, int digits) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}

std::string hex16(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

// A file's size and modification time in nanoseconds (what changes when a data file is rewritten,
// without reading gigabytes to find out).
std::string size_and_mtime(const std::string& path) {
  struct stat st {};
  MF_CHECK(::stat(path.c_str(), &st) == 0, path, ": cannot stat (", std::strerror(errno), ")");
  return std::to_string(st.st_size) + " " + std::to_string(st.st_mtim.tv_sec) + "." +
         std::to_string(st.st_mtim.tv_nsec);
}

// The file holding this code (the moeforge executable, or the Python extension), by size and
// modification time: a rebuilt moeforge may tokenize differently, so its caches are not reused.
std::string this_build() {
  Dl_info info{};
  std::string self = "/proc/self/exe";
  if (::dladdr(reinterpret_cast<void*>(&default_token_cache_dir), &info) != 0 && info.dli_fname &&
      fs::exists(info.dli_fname))
    self = info.dli_fname;
  std::error_code ec;
  const std::string resolved = fs::canonical(self, ec).string();
  return (ec ? self : resolved) + " " + size_and_mtime(ec ? self : resolved);
}

// Bytes written through a buffer (AtomicFile writes straight to the file).
class BufferedWriter {
 public:
  explicit BufferedWriter(hf::AtomicFile& f) : f_(f) { buf_.reserve(kSize); }
  void put(const void* p, size_t n) {
    if (buf_.size() + n > kSize) flush();
    if (n >= kSize) return f_.write(p, n);
    buf_.append(static_cast<const char*>(p), n);
  }
  template <typename T>
  void value(T v) { put(&v, sizeof v); }
  void text(const std::string& s) {
    value<uint64_t>(s.size());
    put(s.data(), s.size());
  }
  void flush() {
    if (!buf_.empty()) f_.write(buf_.data(), buf_.size());
    buf_.clear();
  }

 private:
  static constexpr size_t kSize = 8u << 20;
  hf::AtomicFile& f_;
  std::string buf_;
};

// Reads with every length checked against what the file has left.
class Reader {
 public:
  explicit Reader(const std::string& path) : path_(path), f_(std::fopen(path.c_str(), "rb"), &std::fclose) {
    MF_CHECK(f_ != nullptr, path, ": cannot open (", std::strerror(errno), ")");
    left_ = static_cast<uint64_t>(fs::file_size(path));
  }
  void get(void* p, uint64_t n, const char* what) {
    MF_CHECK(n <= left_ && std::fread(p, 1, n, f_.get()) == n, path_, ": damaged tokenized-data cache (",
             what, " runs past the end of the file)");
    left_ -= n;
  }
  template <typename T>
  T value(const char* what) {
    T v;
    get(&v, sizeof v, what);
    return v;
  }
  std::string text(const char* what) {
    const auto n = value<uint64_t>(what);
    MF_CHECK(n <= left_, path_, ": damaged tokenized-data cache (", what, " of ", n, " bytes runs past the end)");
    std::string s(n, '\0');
    get(s.data(), n, what);
    return s;
  }
  // A count of items of `item_bytes` each, checked before anything of that size is allocated.
  uint64_t count(uint64_t item_bytes, const char* what) {
    const auto n = value<uint64_t>(what);
    MF_CHECK(n <= left_ / item_bytes, path_, ": damaged tokenized-data cache (", n, " ", what,
             " do not fit the file)");
    return n;
  }
  uint64_t left() const { return left_; }

 private:
  std::string path_;
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> f_;
  uint64_t left_ = 0;
};

// One row's place in the file: where it came from, and its token counts.
struct RowRecord {
  int64_t line;
  int32_t file;
  uint32_t has_labels;
  uint64_t ids;
};
static_assert(sizeof(RowRecord) == 24);

// An exclusive advisory lock on a file, held until destruction (and dropped by the kernel if the
// process dies, so a crashed tokenizer never blocks the next run).
class FileLock {
 public:
  static std::optional<FileLock> take(const std::string& path, const std::string& waiting_line) {
    const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return std::nullopt;
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
      if (errno != EWOULDBLOCK) {
        ::close(fd);
        return std::nullopt;
      }
      if (!waiting_line.empty()) log::info(waiting_line);
      int rc;
      while ((rc = ::flock(fd, LOCK_EX)) != 0 && errno == EINTR) {
      }
      if (rc != 0) {
        ::close(fd);
        return std::nullopt;
      }
    }
    return FileLock(fd);
  }
  FileLock(FileLock&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
  FileLock(const FileLock&) = delete;
  ~FileLock() {
    if (fd_ >= 0) ::close(fd_);  // closing the last descriptor releases the lock
  }

 private:
  explicit FileLock(int fd) : fd_(fd) {}
  int fd_;
};

}  // namespace

std::string default_token_cache_dir() {
  if (const char* d = std::getenv("MOEFORGE_CACHE_DIR"); d && *d) return (fs::path(d) / "datasets").string();
  if (const char* d = std::getenv("XDG_CACHE_HOME"); d && *d) return (fs::path(d) / "moeforge" / "datasets").string();
  if (const char* d = std::getenv("HOME"); d && *d) return (fs::path(d) / ".cache" / "moeforge" / "datasets").string();
  return "";
}

std::string token_cache_key(const std::vector<std::string>& files, const ModelText& text, bool skip_bad_lines) {
  std::ostringstream k;
  k << "moeforge tokenized dataset v1\n";
  k << "build " << this_build() << "\n";
  k << "skip_bad_lines " << (skip_bad_lines ? 1 : 0) << "\n";
  k << "eos " << (text.eos_id ? std::to_string(*text.eos_id) : "none") << "\n";
  k << "tokenizer " << (text.tokenizer ? text.tokenizer_dir : "none") << "\n";
  k << "chat_template " << (text.chat ? text.chat->origin() : "none") << "\n";
  // The files the tokenizer, template and eos id were read from, by content (a tokenizer.json is
  // rewritten in place with the same size more often than a data file is).
  for (const std::string& s : text.sources) {
    const std::string bytes = hf::read_text_file(s);
    k << "source " << fs::absolute(s).lexically_normal().string() << " " << hex16(fnv1a(bytes.data(), bytes.size()))
      << "\n";
  }
  for (const std::string& f : files)
    k << "data " << fs::absolute(f).lexically_normal().string() << " " << size_and_mtime(f) << "\n";
  return k.str();
}

std::string token_cache_path(const std::string& dir, const std::string& key) {
  return (fs::path(dir) / (hex16(fnv1a(key.data(), key.size())) + ".mftok")).string();
}

void write_token_cache(const std::string& path, const std::string& key, const Dataset& d) {
  hf::AtomicFile file(path);
  BufferedWriter w(file);
  w.put(kMagic, sizeof kMagic);
  w.text(key);
  w.value<uint64_t>(d.files.size());
  for (const std::string& f : d.files) w.text(f);
  w.value<int64_t>(d.skipped_lines);
  w.value<uint64_t>(d.rows.size());
  for (const TokenRow& r : d.rows) {
    MF_CHECK(!r.labels || r.labels->size() == r.input_ids.size(), "internal: ", d.where(r),
             " has labels of another length than its input_ids");
    w.value(RowRecord{r.line, r.file, r.labels ? 1u : 0u, r.input_ids.size()});
  }
  for (const TokenRow& r : d.rows) {
    w.put(r.input_ids.data(), r.input_ids.size() * sizeof(TokenId));
    if (r.labels) w.put(r.labels->data(), r.labels->size() * sizeof(TokenId));
  }
  w.put(kEnd, sizeof kEnd);
  w.flush();
  file.commit();
}

std::optional<Dataset> read_token_cache(const std::string& path, const std::string& key) {
  if (!fs::exists(path)) return std::nullopt;
  Reader in(path);
  char magic[8];
  in.get(magic, sizeof magic, "the header");
  MF_CHECK(std::memcmp(magic, kMagic, sizeof magic) == 0, path, ": not a moeforge tokenized-data cache (magic)");
  if (in.text("the key") != key) return std::nullopt;
  Dataset d;
  d.files.resize(in.count(8, "file names"));
  for (std::string& f : d.files) f = in.text("a file name");
  d.skipped_lines = in.value<int64_t>("the skipped count");
  std::vector<RowRecord> records(in.count(sizeof(RowRecord), "rows"));
  in.get(records.data(), records.size() * sizeof(RowRecord), "the row table");
  d.rows.resize(records.size());
  for (size_t i = 0; i < records.size(); ++i) {
    const RowRecord& rec = records[i];
    TokenRow& r = d.rows[i];
    MF_CHECK(rec.file >= 0 && static_cast<size_t>(rec.file) < d.files.size() && rec.has_labels <= 1 &&
                 rec.ids <= in.left() / sizeof(TokenId) / (rec.has_labels ? 2 : 1),
             path, ": damaged tokenized-data cache (row ", i, "'s record)");
    r.line = rec.line;
    r.file = rec.file;
    r.input_ids.resize(rec.ids);
    in.get(r.input_ids.data(), rec.ids * sizeof(TokenId), "a row's tokens");
    if (rec.has_labels) {
      r.labels.emplace(rec.ids);
      in.get(r.labels->data(), rec.ids * sizeof(TokenId), "a row's labels");
    }
  }
  char end[8];
  in.get(end, sizeof end, "the end marker");
  MF_CHECK(std::memcmp(end, kEnd, sizeof end) == 0 && in.left() == 0, path,
           ": damaged tokenized-data cache (no end marker where the rows end)");
  return d;
}

Dataset load_model_dataset_cached(const std::string& path, const ModelText& text, bool skip_bad_lines,
                                  bool report_progress, int workers, const std::string& cache_dir) {
  const std::vector<std::string> files = dataset_files(path);
  const std::string key = token_cache_key(files, text, skip_bad_lines);
  const std::string file = token_cache_path(cache_dir, key);
  std::error_code ec;
  fs::create_directories(cache_dir, ec);
  // Every rank of a node loads the same data at once: the first to take the lock tokenizes and
  // writes, the others wait, then read.
  std::optional<FileLock> lock = FileLock::take(
      file.substr(0, file.size() - 6) + ".lock",
      report_progress ? "data: another process is tokenizing " + path + " into " + file + "; waiting to read it" : "");
  if (!lock)
    log::warn("data: cannot lock the tokenized-data cache in ", cache_dir, " (", std::strerror(errno),
              "); tokenizing without it");
  if (lock) {
    try {
      const auto t0 = std::chrono::steady_clock::now();
      if (std::optional<Dataset> hit = read_token_cache(file, key)) {
        if (report_progress)
          log::info("data: ", hit->rows.size(), " tokenized rows of ", path, " read from the cache ", file, " in ",
                    fixed(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 2), " s");
        return std::move(*hit);
      }
    } catch (const std::exception& e) {
      log::warn("data: ", e.what(), "; tokenizing again");
    }
  }
  // The process holding the lock tokenizes for every rank waiting on it: it reports its progress,
  // whichever rank it is.
  const bool tokenizes_for_all = report_progress || lock.has_value();
  Dataset d = load_model_dataset(path, text, skip_bad_lines, tokenizes_for_all, workers);
  if (lock) {
    try {
      write_token_cache(file, key, d);
      if (tokenizes_for_all)
        log::info("data: tokenized rows cached in ", file, " (", fixed(static_cast<double>(fs::file_size(file)) / (1 << 20), 1), " MiB)");
    } catch (const std::exception& e) {
      log::warn("data: the tokenized-data cache was not written: ", e.what());
    }
  }
  return d;
}

}  // namespace moeforge::data
