#include "data/token_cache.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <sstream>

#include "core/error.h"
#include "core/fnv.h"
#include "core/logging.h"
#include "hf/fs_util.h"

namespace moeforge::data {

namespace fs = std::filesystem;

namespace {

constexpr char kMagic[8] = {'M', 'F', 'T', 'O', 'K', 'C', '0', '2'};
constexpr char kEnd[8] = {'M', 'F', 'T', 'O', 'K', 'E', 'N', 'D'};

std::string fixed(double v, int digits) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
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
  void flush() {
    if (!buf_.empty()) f_.write(buf_.data(), buf_.size());
    buf_.clear();
  }

 private:
  static constexpr size_t kSize = 8u << 20;
  hf::AtomicFile& f_;
  std::string buf_;
};

// A read-only mapping of a whole file, unmapped when the last store over it goes.
struct Mapping {
  const uint8_t* data = nullptr;
  size_t size = 0;
  Mapping(const Mapping&) = delete;
  Mapping() = default;
  ~Mapping() {
    if (data) ::munmap(const_cast<uint8_t*>(data), size);
  }
};

std::shared_ptr<const Mapping> map_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  MF_CHECK(fd >= 0, path, ": cannot open (", std::strerror(errno), ")");
  struct stat st {};
  const bool sized = ::fstat(fd, &st) == 0;
  auto m = std::make_shared<Mapping>();
  m->size = sized ? static_cast<size_t>(st.st_size) : 0;
  void* p = m->size ? ::mmap(nullptr, m->size, PROT_READ, MAP_SHARED, fd, 0) : MAP_FAILED;
  const int err = errno;
  ::close(fd);
  MF_CHECK(m->size > 0, path, ": damaged tokenized-data cache (an empty file)");
  MF_CHECK(p != MAP_FAILED, path, ": cannot map (", std::strerror(err), ")");
  m->data = static_cast<const uint8_t*>(p);
  return m;
}

// Reads a mapped file front to back, every length checked against what is left.
class Cursor {
 public:
  Cursor(const std::string& path, const Mapping& m) : path_(path), m_(m) {}
  const uint8_t* take(uint64_t n, const char* what) {
    MF_CHECK(n <= m_.size - at_, path_, ": damaged tokenized-data cache (", what, " runs past the end of the file)");
    const uint8_t* p = m_.data + at_;
    at_ += n;
    return p;
  }
  template <typename T>
  T value(const char* what) {
    T v;
    std::memcpy(&v, take(sizeof v, what), sizeof v);
    return v;
  }
  std::string text(const char* what) {
    const auto n = value<uint64_t>(what);
    const uint8_t* p = take(n, what);
    return std::string(reinterpret_cast<const char*>(p), n);
  }
  // A count of items of at least `item_bytes` each, checked before anything of that size is made.
  uint64_t count(uint64_t item_bytes, const char* what) {
    const auto n = value<uint64_t>(what);
    MF_CHECK(n <= left() / item_bytes, path_, ": damaged tokenized-data cache (", n, " ", what, " do not fit the file)");
    return n;
  }
  void align(size_t a) { take((a - at_ % a) % a, "padding"); }
  uint64_t left() const { return m_.size - at_; }

 private:
  std::string path_;
  const Mapping& m_;
  uint64_t at_ = 0;
};

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
  k << "moeforge tokenized dataset v2\n";
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

void write_token_cache(const std::string& path, const std::string& key, const TokenStore& store) {
  hf::AtomicFile file(path);
  BufferedWriter w(file);
  uint64_t at = 0;
  auto put = [&](const void* p, size_t n) {
    w.put(p, n);
    at += n;
  };
  auto text = [&](const std::string& t) {
    const uint64_t n = t.size();
    put(&n, sizeof n);
    put(t.data(), t.size());
  };
  auto align = [&](size_t a) {
    static const char zeros[8] = {};
    put(zeros, (a - at % a) % a);
  };
  put(kMagic, sizeof kMagic);
  text(key);
  const uint64_t files = store.files().size(), rows = store.size(), tokens = store.tokens().size();
  const int64_t skipped = store.skipped_lines();
  put(&files, sizeof files);
  for (const std::string& f : store.files()) text(f);
  put(&skipped, sizeof skipped);
  put(&rows, sizeof rows);
  put(&tokens, sizeof tokens);
  align(8);
  put(store.rows().data(), store.rows().size_bytes());
  put(store.tokens().data(), store.tokens().size_bytes());
  align(8);
  put(kEnd, sizeof kEnd);
  w.flush();
  file.commit();
}

namespace {

// A cache file's header, read from its mapping: everything before the row table.
struct Header {
  std::string key;
  std::vector<std::string> files;
  int64_t skipped = 0;
  uint64_t rows = 0, tokens = 0;
};

// The file's lock, beside it: `<key hash>.lock` for `<key hash>.mftok`.
std::string lock_path_of(const std::string& cache_file) {
  return cache_file.substr(0, cache_file.size() - fs::path(cache_file).extension().string().size()) + ".lock";
}

// The row table that follows a header, checked to fit the file.
std::span<const TokenStore::Row> read_row_table(Cursor& in, const Header& h, const std::string& path) {
  MF_CHECK(h.rows <= in.left() / sizeof(TokenStore::Row), path, ": damaged tokenized-data cache (", h.rows,
           " rows do not fit the file)");
  return {reinterpret_cast<const TokenStore::Row*>(in.take(h.rows * sizeof(TokenStore::Row), "the row table")), h.rows};
}

Header read_header(Cursor& in, const std::string& path) {
  MF_CHECK(std::memcmp(in.take(sizeof kMagic, "the header"), kMagic, sizeof kMagic) == 0, path,
           ": not a moeforge tokenized-data cache (magic)");
  Header h;
  h.key = in.text("the key");
  h.files.resize(in.count(8, "file names"));
  for (std::string& f : h.files) f = in.text("a file name");
  h.skipped = in.value<int64_t>("the skipped count");
  h.rows = in.value<uint64_t>("the row count");
  h.tokens = in.value<uint64_t>("the token count");
  in.align(8);
  return h;
}

}  // namespace

std::shared_ptr<const TokenStore> map_token_cache(const std::string& path, const std::string& key) {
  if (!fs::exists(path)) return nullptr;
  const std::shared_ptr<const Mapping> m = map_file(path);
  Cursor in(path, *m);
  Header h = read_header(in, path);
  if (h.key != key) return nullptr;
  const uint64_t rows = h.rows, tokens = h.tokens;
  const TokenStore::Row* row = read_row_table(in, h, path).data();
  MF_CHECK(tokens <= in.left() / sizeof(TokenId), path, ": damaged tokenized-data cache (", tokens,
           " tokens do not fit the file)");
  const auto* token = reinterpret_cast<const TokenId*>(in.take(tokens * sizeof(TokenId), "the tokens"));
  in.align(8);
  MF_CHECK(std::memcmp(in.take(sizeof kEnd, "the end marker"), kEnd, sizeof kEnd) == 0 && in.left() == 0, path,
           ": damaged tokenized-data cache (no end marker where the tokens end)");
  // Every row inside the tokens (a row read later must never reach past the mapping).
  for (uint64_t i = 0; i < rows; ++i) {
    const TokenStore::Row& r = row[i];
    const uint64_t span = r.has_labels ? 2 : 1;
    MF_CHECK(r.file >= 0 && static_cast<uint64_t>(r.file) < h.files.size() && r.has_labels <= 1 &&
                 r.length <= tokens / span && r.offset <= tokens - r.length * span,
             path, ": damaged tokenized-data cache (row ", i, "'s record)");
  }
  // A hit marks the file used now (moeforge cache --older-than removes what no run has used).
  ::utimensat(AT_FDCWD, path.c_str(), nullptr, 0);
  return TokenStore::over(m, {row, rows}, {token, tokens}, std::move(h.files), h.skipped);
}

std::vector<TokenCacheEntry> list_token_caches(const std::string& dir) {
  std::vector<TokenCacheEntry> out;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return out;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    if (e.path().extension() != ".mftok") continue;
    TokenCacheEntry t;
    t.path = e.path().string();
    struct stat st {};
    if (::stat(t.path.c_str(), &st) == 0) {
      t.bytes = static_cast<uint64_t>(st.st_size);
      t.last_used = st.st_mtim.tv_sec;
    }
    try {
      const std::shared_ptr<const Mapping> m = map_file(t.path);
      Cursor in(t.path, *m);
      const Header h = read_header(in, t.path);
      t.key = h.key;
      t.rows = h.rows;
      // Input tokens: the rows' lengths (the token array holds labels of their own too).
      for (const TokenStore::Row& r : read_row_table(in, h, t.path)) t.tokens += r.length;
    } catch (const std::exception& x) {
      t.error = x.what();
    }
    out.push_back(std::move(t));
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.last_used > b.last_used; });
  return out;
}

bool remove_token_cache(const std::string& path) {
  const std::string lock_path = lock_path_of(path);
  const int fd = ::open(lock_path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd >= 0) {
    const bool free = ::flock(fd, LOCK_EX | LOCK_NB) == 0;
    if (!free) {
      ::close(fd);
      return false;
    }
    // Removed while held, so no process can take this lock and then find the file half gone.
    std::error_code ec;
    fs::remove(path, ec);
    fs::remove(lock_path, ec);
    ::close(fd);
    return true;
  }
  std::error_code ec;
  fs::remove(path, ec);
  return !ec;
}

std::shared_ptr<const TokenStore> load_model_tokens(const std::string& path, const ModelText& text, bool skip_bad_lines,
                                                    bool report_progress, int workers, const std::string& cache_dir) {
  auto tokenize = [&](bool report) {
    Dataset d = load_model_dataset(path, text, skip_bad_lines, report, workers);
    return TokenStore::from_rows(std::move(d.rows), std::move(d.files), d.skipped_lines);
  };
  if (cache_dir.empty()) return tokenize(report_progress);
  const std::vector<std::string> files = dataset_files(path);
  const std::string key = token_cache_key(files, text, skip_bad_lines);
  const std::string file = token_cache_path(cache_dir, key);
  std::error_code ec;
  fs::create_directories(cache_dir, ec);
  // Every rank of a node loads the same data at once: the first to take the lock tokenizes and
  // writes, the others wait, then map what it wrote.
  std::optional<FileLock> lock = FileLock::take(
      lock_path_of(file),
      report_progress ? "data: another process is tokenizing " + path + " into " + file + "; waiting to read it" : "");
  // A file system without locks (some parallel ones) only costs the turns: a file is complete
  // whenever it is there (written aside and renamed), so every process still maps or writes one.
  if (!lock && report_progress)
    log::warn("data: cannot lock the tokenized-data cache in ", cache_dir, " (", std::strerror(errno),
              "); every rank that finds no file there tokenizes");
  try {
    if (auto hit = map_token_cache(file, key)) {
      if (report_progress)
        log::info("data: ", hit->size(), " tokenized rows of ", path, " mapped from the cache ", file);
      return hit;
    }
  } catch (const std::exception& e) {
    log::warn("data: ", e.what(), "; tokenizing again");
  }
  // The process holding the lock tokenizes for every rank waiting on it: it reports its progress,
  // whichever rank it is.
  const bool report = report_progress || lock.has_value();
  std::shared_ptr<const TokenStore> store = tokenize(report);
  try {
    write_token_cache(file, key, *store);
    if (report)
      log::info("data: tokenized rows cached in ", file, " (",
                fixed(static_cast<double>(fs::file_size(file)) / (1 << 20), 1), " MiB)");
    // Mapped from the file it was just written to: its pages are shared with the ranks that map
    // it next, and this process's copy is freed.
    if (auto mapped = map_token_cache(file, key)) return mapped;
  } catch (const std::exception& e) {
    if (report) log::warn("data: the tokenized-data cache was not written: ", e.what());
  }
  return store;
}

}  // namespace moeforge::data
