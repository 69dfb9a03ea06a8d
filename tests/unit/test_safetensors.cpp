// The safetensors reader and writer, and every kind of malformed file the reader must refuse
// with an error naming the file (and the tensor, where there is one).
#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "hf/safetensors.h"
#include "test_util.h"

using namespace moeforge;
using test::TempDir;

namespace {

// A raw file: 8-byte little-endian header length, header text, data bytes.
std::string raw_file(const std::string& header, size_t data_bytes, uint64_t claimed_len = UINT64_MAX) {
  const uint64_t n = claimed_len == UINT64_MAX ? header.size() : claimed_len;
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header + std::string(data_bytes, '\x01');
}

std::string error_of(const std::string& path) {
  try {
    hf::SafetensorsFile::open(path);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(Safetensors, WriteThenReadGivesIdenticalTensors) {
  TempDir dir;
  Tensor a = test::random_tensor({3, 4}, 1), b = test::random_tensor({5}, 2, 1.f, DType::BF16);
  Tensor c = Tensor::from_i64({1, 2, 3}, {3});
  hf::save_safetensors(dir / "x.safetensors", {{"a", a}, {"b", b}, {"c", c}, {"empty", Tensor::empty({0, 3}, DType::F32)}});
  auto f = hf::SafetensorsFile::open(dir / "x.safetensors");
  EXPECT_EQ(f.metadata().at("format"), "pt");
  EXPECT_EQ(f.get("a").shape(), a.shape());
  EXPECT_EQ(test::max_abs_diff(f.get("a"), a), 0.f);
  EXPECT_EQ(f.get("b").dtype(), DType::BF16);
  EXPECT_EQ(test::max_abs_diff(f.get("b"), b), 0.f);
  EXPECT_EQ(f.get("c").i64()[2], 3);
  EXPECT_EQ(f.get("empty").numel(), 0);
  // Every tensor starts aligned to its element size (I64 first, then F32, then BF16).
  for (const auto& e : f.entries()) EXPECT_EQ(e.begin % dtype_size(e.dtype), 0u) << e.name;
  EXPECT_EQ(f.entry("c").begin, 0u);
}

TEST(Safetensors, ShardedSaveWritesAnIndexAndReadsBack) {
  TempDir dir;
  hf::NamedTensors ts;
  for (int i = 0; i < 5; ++i) ts.emplace_back("t" + std::to_string(i), test::random_tensor({100}, i));
  auto files = hf::save_sharded(dir.path.string(), ts, 900);  // 400 bytes each: two per shard
  ASSERT_EQ(files.size(), 4u);
  EXPECT_EQ(files[0], "model-00001-of-00003.safetensors");
  auto idx = nlohmann::json::parse(std::ifstream(dir / "model.safetensors.index.json"));
  EXPECT_EQ(idx["metadata"]["total_size"], 2000);
  EXPECT_EQ(idx["weight_map"]["t4"], "model-00003-of-00003.safetensors");
  auto ckpt = hf::SafetensorsCheckpoint::open(dir.path.string());
  ASSERT_EQ(ckpt.names().size(), 5u);
  for (auto& [n, t] : ts) EXPECT_EQ(test::max_abs_diff(ckpt.get(n), t), 0.f);
}

TEST(Safetensors, UnalignedTensorsFromOtherWritersAreCopied) {
  TempDir dir;
  // A U8 tensor of 3 bytes first puts the I64 tensor at offset 3.
  std::string data = std::string("\x01\x02\x03", 3) + std::string("\x07\0\0\0\0\0\0\0", 8);
  std::string header = R"({"u":{"dtype":"U8","shape":[3],"data_offsets":[0,3]},"i":{"dtype":"I64","shape":[1],"data_offsets":[3,11]}})";
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
  test::write_bytes(dir / "u.safetensors", bytes + header + data);
  auto f = hf::SafetensorsFile::open(dir / "u.safetensors");
  EXPECT_EQ(f.get("i").i64()[0], 7);
}

TEST(Safetensors, ReadsTransformersShardedFixture) {
  auto ckpt = hf::SafetensorsCheckpoint::open(test::fixture("qwen3_moe_a"));
  EXPECT_TRUE(ckpt.contains("model.layers.0.mlp.experts.7.down_proj.weight"));
  EXPECT_EQ(ckpt.entry("model.embed_tokens.weight").shape, Shape({128, 32}));
}

TEST(SafetensorsBadInput, TruncatedFile) {
  TempDir dir;
  test::write_bytes(dir / "t.safetensors", "abc");
  EXPECT_NE(error_of(dir / "t.safetensors").find("truncated"), std::string::npos);
  EXPECT_NE(error_of(dir / "t.safetensors").find("t.safetensors"), std::string::npos);
}

TEST(SafetensorsBadInput, TruncatedData) {
  TempDir dir;
  std::string ok = raw_file(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 16);
  test::write_bytes(dir / "t.safetensors", ok.substr(0, ok.size() - 5));
  EXPECT_NE(error_of(dir / "t.safetensors").find("past the end of the data area"), std::string::npos);
}

TEST(SafetensorsBadInput, HeaderLengthPastEnd) {
  TempDir dir;
  test::write_bytes(dir / "h.safetensors", raw_file("{}", 0, 1000));
  const std::string e = error_of(dir / "h.safetensors");
  EXPECT_NE(e.find("header length 1000 runs past the end"), std::string::npos) << e;
  test::write_bytes(dir / "h2.safetensors", raw_file("{}", 0, UINT64_MAX - 3));
  EXPECT_NE(error_of(dir / "h2.safetensors").find("runs past the end"), std::string::npos);
}

TEST(SafetensorsBadInput, InvalidJson) {
  TempDir dir;
  test::write_bytes(dir / "j.safetensors", raw_file(R"({"a": {"dtype": )", 0));
  EXPECT_NE(error_of(dir / "j.safetensors").find("invalid JSON header"), std::string::npos);
  test::write_bytes(dir / "k.safetensors", raw_file(R"([1, 2])", 0));
  EXPECT_NE(error_of(dir / "k.safetensors").find("must be a JSON object"), std::string::npos);
}

TEST(SafetensorsBadInput, UnknownDtype) {
  TempDir dir;
  test::write_bytes(dir / "d.safetensors", raw_file(R"({"w":{"dtype":"F12","shape":[2],"data_offsets":[0,4]}})", 4));
  const std::string e = error_of(dir / "d.safetensors");
  EXPECT_NE(e.find("tensor 'w': unknown dtype 'F12'"), std::string::npos) << e;
}

TEST(SafetensorsBadInput, OverlappingOffsets) {
  TempDir dir;
  test::write_bytes(dir / "o.safetensors",
                    raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                             R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12));
  const std::string e = error_of(dir / "o.safetensors");
  EXPECT_NE(e.find("overlap"), std::string::npos) << e;
  EXPECT_NE(e.find("'b'"), std::string::npos) << e;
}

TEST(SafetensorsBadInput, OutOfRangeOffsets) {
  TempDir dir;
  test::write_bytes(dir / "r.safetensors", raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,800]}})", 8));
  EXPECT_NE(error_of(dir / "r.safetensors").find("run past the end of the data area"), std::string::npos);
  test::write_bytes(dir / "n.safetensors", raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}})", 8));
  EXPECT_NE(error_of(dir / "n.safetensors").find("non-negative integer"), std::string::npos);
}

TEST(SafetensorsBadInput, ByteLengthMustMatchShape) {
  TempDir dir;
  test::write_bytes(dir / "s.safetensors", raw_file(R"({"a":{"dtype":"BF16","shape":[3],"data_offsets":[0,8]}})", 8));
  const std::string e = error_of(dir / "s.safetensors");
  EXPECT_NE(e.find("span 8 bytes but BF16 [3] needs 6"), std::string::npos) << e;
}

TEST(SafetensorsBadInput, GapsAndTrailingBytes) {
  TempDir dir;
  test::write_bytes(dir / "g.safetensors", raw_file(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}})", 4));
  EXPECT_NE(error_of(dir / "g.safetensors").find("gap of 2 bytes"), std::string::npos);
  test::write_bytes(dir / "t.safetensors", raw_file(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})", 4));
  EXPECT_NE(error_of(dir / "t.safetensors").find("after the last tensor"), std::string::npos);
}

TEST(SafetensorsBadInput, BadShape) {
  TempDir dir;
  test::write_bytes(dir / "b.safetensors", raw_file(R"({"a":{"dtype":"U8","shape":[2.5],"data_offsets":[0,2]}})", 2));
  EXPECT_NE(error_of(dir / "b.safetensors").find("shape dimension"), std::string::npos);
  test::write_bytes(dir / "h.safetensors",
                    raw_file(R"({"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,2]}})", 2));
  EXPECT_NE(error_of(dir / "h.safetensors").find("is too large"), std::string::npos);
}

TEST(SafetensorsBadInput, IndexNamesMissingShardOrTensor) {
  TempDir dir;
  hf::save_safetensors(dir / "model-00001-of-00002.safetensors", {{"a", test::random_tensor({2}, 1)}});
  test::write_bytes(dir / "model.safetensors.index.json",
                    R"({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})");
  try {
    hf::SafetensorsCheckpoint::open(dir.path.string());
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model-00002-of-00002.safetensors' which does not exist"), std::string::npos)
        << e.what();
  }
  test::write_bytes(dir / "model.safetensors.index.json",
                    R"({"weight_map": {"a": "model-00001-of-00002.safetensors", "zz": "model-00001-of-00002.safetensors"}})");
  try {
    hf::SafetensorsCheckpoint::open(dir.path.string());
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("tensor 'zz' is listed"), std::string::npos) << e.what();
  }
}

TEST(Safetensors, ParseSize) {
  EXPECT_EQ(hf::parse_size("5GB"), 5000000000ull);
  EXPECT_EQ(hf::parse_size("24KB"), 24000ull);
  EXPECT_EQ(hf::parse_size("1GiB"), 1073741824ull);
  EXPECT_EQ(hf::parse_size("123"), 123ull);
  EXPECT_THROW(hf::parse_size("5XB"), Error);
}
