// TensorBoard event files, written without TensorFlow: TFRecord framing (length, masked CRC-32C of
// the length, the record, masked CRC-32C of the record) around serialized tensorflow.Event
// protobufs -- first the file version, then one event per scalar (wall_time, step, a Summary with
// one {tag, simple_value}). `tensorboard --logdir` reads the folder.
#pragma once
#include <cstdint>
#include <cstdio>
#include <string>

namespace moeforge::report {

// CRC-32C (Castagnoli), as TFRecord checksums its records; and TFRecord's mask of it.
uint32_t crc32c(const void* data, size_t n);
uint32_t masked_crc32c(const void* data, size_t n);

class EventWriter {
 public:
  // Creates `dir` and a new events.out.tfevents.<time>.<host>.<pid> file in it.
  explicit EventWriter(const std::string& dir);
  ~EventWriter();
  EventWriter(const EventWriter&) = delete;
  EventWriter& operator=(const EventWriter&) = delete;
  void scalar(const std::string& tag, int64_t step, double value);
  void flush();
  const std::string& path() const { return path_; }

 private:
  void record(const std::string& event);
  std::string path_;
  FILE* f_ = nullptr;
};

}  // namespace moeforge::report
