#include "data/table_files.h"

#include <filesystem>

#include "data/arrow_ipc.h"
#include "data/parquet_reader.h"

namespace moeforge::data {

namespace {
bool is_arrow(const std::string& path) {
  const auto ext = std::filesystem::path(path).extension();
  return ext == ".arrow" || ext == ".feather";
}
}  // namespace

bool is_table_file(const std::string& path) {
  return std::filesystem::path(path).extension() == ".parquet" || is_arrow(path);
}

std::string where_in_file(const std::string& file, int64_t line) {
  return is_table_file(file) ? file + ": row " + std::to_string(line) : file + ":" + std::to_string(line);
}

void for_each_table_row(const std::string& path, const std::vector<std::string>& fields,
                        const std::function<void(int64_t, nlohmann::ordered_json&&)>& fn) {
  if (is_arrow(path)) arrow::ArrowFile::open(path).for_each_row(fields, fn);
  else parquet::ParquetFile::open(path).for_each_row(fields, fn);
}

}  // namespace moeforge::data
