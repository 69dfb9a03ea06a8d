#include "report/tensorboard.h"

#include <unistd.h>

#include <array>
#include <chrono>
#include <cstring>
#include <filesystem>

#include "core/error.h"

namespace moeforge::report {

namespace {

const std::array<uint32_t, 256>& crc_table() {
  static const std::array<uint32_t, 256> t = [] {
    std::array<uint32_t, 256> a{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = c & 1 ? 0x82F63B78u ^ (c >> 1) : c >> 1;  // reflected Castagnoli polynomial
      a[i] = c;
    }
    return a;
  }();
  return t;
}

// Protobuf wire format: varints, and fields by number and wire type.
void varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}
void key(std::string& out, int field, int wire) { varint(out, static_cast<uint64_t>(field) << 3 | wire); }
void bytes_field(std::string& out, int field, const std::string& b) {
  key(out, field, 2);
  varint(out, b.size());
  out += b;
}
template <typename T>
void fixed_field(std::string& out, int field, T v) {  // double (wire 1) or float (wire 5), little-endian
  key(out, field, sizeof(T) == 8 ? 1 : 5);
  char buf[sizeof(T)];
  std::memcpy(buf, &v, sizeof(T));
  out.append(buf, sizeof(T));
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// tensorflow.Event: wall_time = 1 (double), step = 2 (int64), file_version = 3 (string), summary = 5.
std::string event(double wall_time, int64_t step) {
  std::string e;
  fixed_field(e, 1, wall_time);
  key(e, 2, 0);
  varint(e, static_cast<uint64_t>(step));
  return e;
}

}  // namespace

uint32_t crc32c(const void* data, size_t n) {
  const auto& t = crc_table();
  uint32_t c = 0xFFFFFFFFu;
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < n; ++i) c = t[(c ^ p[i]) & 0xff] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

uint32_t masked_crc32c(const void* data, size_t n) {
  const uint32_t c = crc32c(data, n);
  return ((c >> 15) | (c << 17)) + 0xa282ead8u;
}

EventWriter::EventWriter(const std::string& dir) {
  std::filesystem::create_directories(dir);
  char host[256] = {0};
  ::gethostname(host, sizeof host - 1);
  path_ = (std::filesystem::path(dir) / ("events.out.tfevents." + std::to_string(static_cast<int64_t>(now_seconds())) +
                                         "." + host + "." + std::to_string(::getpid())))
              .string();
  f_ = std::fopen(path_.c_str(), "wb");
  MF_CHECK(f_, path_, ": cannot open for writing");
  std::string e = event(now_seconds(), 0);
  bytes_field(e, 3, "brain.Event:2");
  record(e);
  flush();
}

EventWriter::~EventWriter() {
  if (f_) std::fclose(f_);
}

void EventWriter::scalar(const std::string& tag, int64_t step, double value) {
  // Summary { repeated Value value = 1 }, Value { string tag = 1; float simple_value = 2 }.
  std::string v;
  bytes_field(v, 1, tag);
  fixed_field(v, 2, static_cast<float>(value));
  std::string summary;
  bytes_field(summary, 1, v);
  std::string e = event(now_seconds(), step);
  bytes_field(e, 5, summary);
  record(e);
}

void EventWriter::record(const std::string& data) {
  char header[12];
  const uint64_t len = data.size();
  std::memcpy(header, &len, 8);  // little-endian (x86-64, aarch64)
  const uint32_t len_crc = masked_crc32c(header, 8);
  std::memcpy(header + 8, &len_crc, 4);
  const uint32_t data_crc = masked_crc32c(data.data(), data.size());
  MF_CHECK(std::fwrite(header, 1, 12, f_) == 12 && std::fwrite(data.data(), 1, data.size(), f_) == data.size() &&
               std::fwrite(&data_crc, 1, 4, f_) == 4,
           path_, ": write failed");
}

void EventWriter::flush() { std::fflush(f_); }

}  // namespace moeforge::report
