// Parquet datasets: every fixture (tools/make_parquet_fixtures.py: every codec, page kind and
// encoding the reader takes, nesting with nulls at each level) reads as pyarrow reads it; rows of a
// Parquet file train exactly as the same rows in jsonl; bad files are one error naming the file.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "data/dataset.h"
#include "data/parquet_codecs.h"
#include "data/parquet_reader.h"
#include "data/parquet_values.h"
#include "hf/chat/chat_template.h"
#include "hf/tokenizer/tokenizer.h"
#include "test_util.h"

using namespace moeforge;
using data::parquet::Json;
using data::parquet::ParquetFile;

namespace {

std::string dir() { return test::fixture("parquet"); }

std::vector<Json> rows_of(const ParquetFile& f, const std::vector<std::string>& fields) { return test::table_rows(f, fields); }
std::vector<Json> expected_rows(const std::string& name) { return test::jsonl_objects(dir() + "/" + name + ".expected.jsonl"); }

}  // namespace

TEST(ParquetRead, EveryFixtureReadsAsPyarrowReadsIt) {
  const Json manifest = Json::parse(test::read_text(dir() + "/MANIFEST.json"));
  ASSERT_GE(manifest["cases"].size(), 7u);
  for (const auto& [name, c] : manifest["cases"].items()) {
    const auto fields = c["fields"].get<std::vector<std::string>>();
    const auto f = ParquetFile::open(dir() + "/" + name + ".parquet");
    const auto got = rows_of(f, fields);
    const auto want = expected_rows(name);
    ASSERT_EQ(got.size(), want.size()) << name;
    EXPECT_EQ(f.num_rows(), static_cast<int64_t>(want.size())) << name;
    for (size_t r = 0; r < want.size(); ++r) ASSERT_EQ(got[r], want[r]) << name << " row " << r;
  }
}

TEST(ParquetRead, OnlyTheFieldsAskedForAreRead) {
  // prompt_completion_gzip holds an INT96 column ('created') that the reader refuses when asked.
  const auto f = ParquetFile::open(dir() + "/prompt_completion_gzip.parquet");
  EXPECT_EQ(f.top_level_fields(), (std::vector<std::string>{"prompt", "completion", "created"}));
  EXPECT_EQ(rows_of(f, {"completion", "nothing_like_this"}).size(), 12u);
  const std::string err = test::error_of([&] { rows_of(f, {"created"}); });
  EXPECT_NE(err.find("column 'created', row group 0: INT96 values"), std::string::npos) << err;
  const std::string none = test::error_of([&] { rows_of(f, {"text", "messages"}); });
  EXPECT_NE(none.find("has none of the columns text, messages"), std::string::npos) << none;
}

TEST(ParquetCodecs, SnappyAndLz4BlocksWithOverlappingCopies) {
  // Snappy: length 12, a literal "abc", a copy of 9 bytes from 3 back (it overlaps what it writes).
  const uint8_t snappy[] = {12, (3 - 1) << 2, 'a', 'b', 'c', (0 << 5) | ((9 - 4) << 2) | 1, 3};
  const auto s = data::parquet::snappy_decompress(snappy, sizeof snappy, 12, "s");
  EXPECT_EQ(std::string(s.begin(), s.end()), "abcabcabcabc");
  // LZ4: a token of 3 literals and a match of 4 + 5, offset 3; then a last token of 1 literal.
  const uint8_t lz4[] = {(3 << 4) | 5, 'x', 'y', 'z', 3, 0, (1 << 4), '!'};
  const auto l = data::parquet::lz4_block_decompress(lz4, sizeof lz4, 13, "l");
  EXPECT_EQ(std::string(l.begin(), l.end()), "xyzxyzxyzxyz!");
  // The deprecated LZ4 codec: two Hadoop-framed blocks (sizes big-endian), or the bare block.
  const uint8_t framed[] = {0, 0, 0, 13, 0, 0, 0, 8, (3 << 4) | 5, 'x', 'y', 'z', 3, 0, (1 << 4), '!',
                            0, 0, 0, 2,  0, 0, 0, 3, (2 << 4), 'o', 'k'};
  const auto h = data::parquet::lz4_hadoop_decompress(framed, sizeof framed, 15, "h");
  EXPECT_EQ(std::string(h.begin(), h.end()), "xyzxyzxyzxyz!ok");
  const auto bare = data::parquet::decompress(data::parquet::Codec::Lz4, lz4, sizeof lz4, 13, "b");
  EXPECT_EQ(std::string(bare.begin(), bare.end()), "xyzxyzxyzxyz!");
  EXPECT_NE(test::error_of([&] { data::parquet::lz4_hadoop_decompress(framed, sizeof framed, 16, "f.parquet"); })
                .find("f.parquet: "),
            std::string::npos);
  const uint8_t bad_offset[] = {12, (3 - 1) << 2, 'a', 'b', 'c', (0 << 5) | ((9 - 4) << 2) | 1, 4};
  EXPECT_NE(test::error_of([&] { data::parquet::snappy_decompress(bad_offset, sizeof bad_offset, 12, "f.parquet"); })
                .find("f.parquet: malformed SNAPPY data"),
            std::string::npos);
  EXPECT_NE(test::error_of([&] { data::parquet::snappy_decompress(snappy, sizeof snappy, 13, "f.parquet"); })
                .find("SNAPPY data holds 12 bytes, the header says 13"),
            std::string::npos);
}

namespace {

struct Chat {
  hf::Tokenizer tok = hf::Tokenizer::load(test::fixture("chat/qwen3"));
  hf::ChatTemplate chat = *hf::ChatTemplate::load(test::fixture("chat/qwen3"));
  data::DatasetOptions options(const std::string& path) const {
    data::DatasetOptions o;
    o.path = path;
    o.tokenizer = &tok;
    o.chat_template = &chat;
    o.skip_bad_lines = true;  // some fixture rows have no assistant turn, some mismatched labels
    o.eos_id = 2;
    return o;
  }
};

}  // namespace

// The dataset side: a Parquet file's rows become the same token rows as the same rows in jsonl
// (pyarrow's reading of the file, written as lines), skipped rows included.
// BYTE_STREAM_SPLIT on FIXED_LEN_BYTE_ARRAY (the fixture's columns are numbers: pyarrow's rows of
// bytes do not go through JSON): byte k of every value in stream k; a page too short is one error.
TEST(ParquetValues, ByteStreamSplitFixedLengthValues) {
  using namespace data::parquet;
  const std::vector<std::string> want = {"abc", "XYZ", "123", std::string("\x01\x00\xff", 3)};
  std::string split(12, '\0');
  for (size_t k = 0; k < 3; ++k)
    for (size_t i = 0; i < want.size(); ++i) split[k * want.size() + i] = want[i][k];
  const auto* p = reinterpret_cast<const uint8_t*>(split.data());
  Bytes in{p, p + split.size()};
  std::vector<Json> out;
  decode_values(Encoding::ByteStreamSplit, LeafType{PhysicalType::FixedLenByteArray, 3, false}, in, want.size(), out, "t");
  ASSERT_EQ(out.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) EXPECT_EQ(out[i].get<std::string>(), want[i]) << i;
  EXPECT_EQ(in.left(), 0u);
  Bytes short_in{p, p + 11};
  EXPECT_NE(test::error_of([&] {
              decode_values(Encoding::ByteStreamSplit, LeafType{PhysicalType::FixedLenByteArray, 3, false}, short_in, 4, out, "t");
            }).find("t: its values run past the page"),
            std::string::npos);
}

TEST(ParquetDataset, RowsTrainAsTheSameRowsInJsonl) {
  const Chat chat;
  for (const std::string name :
       {"messages_lz4", "tokens_zstd_v2", "text_snappy", "prompt_completion_gzip", "sharegpt_snappy", "alpaca_zstd"}) {
    test::TempDir tmp;
    std::filesystem::copy_file(dir() + "/" + name + ".expected.jsonl", tmp / (name + ".jsonl"));
    const auto from_parquet = data::load_dataset(chat.options(dir() + "/" + name + ".parquet"));
    const auto from_jsonl = data::load_dataset(chat.options(tmp / (name + ".jsonl")));
    EXPECT_EQ(from_parquet.skipped_lines, from_jsonl.skipped_lines) << name;
    ASSERT_EQ(from_parquet.rows.size(), from_jsonl.rows.size()) << name;
    for (size_t r = 0; r < from_jsonl.rows.size(); ++r) {
      EXPECT_EQ(from_parquet.rows[r].line, from_jsonl.rows[r].line) << name << " row " << r;  // rows count from 1
      EXPECT_EQ(from_parquet.rows[r].input_ids, from_jsonl.rows[r].input_ids) << name << " row " << r;
      EXPECT_EQ(from_parquet.rows[r].labels, from_jsonl.rows[r].labels) << name << " row " << r;
    }
  }
}

TEST(ParquetDataset, AFolderReadsItsJsonlAndParquetFilesInOrder) {
  const Chat chat;
  test::TempDir tmp;
  std::filesystem::copy_file(dir() + "/text_snappy.parquet", tmp / "b.parquet");
  std::ofstream(tmp / "a.jsonl") << "{\"text\": \"the cat\"}\n";
  std::ofstream(tmp / "c.txt") << "not data\n";
  const auto d = data::load_dataset(chat.options(tmp.path.string()));
  ASSERT_EQ(d.files.size(), 2u);
  EXPECT_EQ(std::filesystem::path(d.files[0]).filename(), "a.jsonl");
  EXPECT_EQ(d.rows.size(), 51u);
}

// A dataset folder as the hub lays it out (data/train-*.parquet beside data/test-*.parquet) is not
// read whole: that would train on the test split. A glob picks one.
TEST(ParquetDataset, AFolderOfSeveralSplitsIsRefusedAndAGlobPicksOne) {
  const Chat chat;
  test::TempDir tmp;
  std::filesystem::copy_file(dir() + "/text_snappy.parquet", tmp / "train-00000-of-00002.parquet");
  std::filesystem::copy_file(dir() + "/text_snappy.parquet", tmp / "train-00001-of-00002.parquet");
  std::filesystem::copy_file(dir() + "/text_snappy.parquet", tmp / "test-00000-of-00001.parquet");
  const std::string err = test::error_of([&] { data::load_dataset(chat.options(tmp.path.string())); });
  EXPECT_NE(err.find("folder holds the splits test, train (by their file names); choose one with a glob, e.g. " +
                     (tmp / "train*")),
            std::string::npos)
      << err;
  EXPECT_EQ(data::load_dataset(chat.options(tmp / "train-*.parquet")).rows.size(), 100u);
  // jsonl splits by name too; one split alone (or names that say none) is read whole.
  test::TempDir plain;
  std::ofstream(plain / "train.jsonl") << "{\"text\": \"a\"}\n";
  std::ofstream(plain / "validation.jsonl") << "{\"text\": \"b\"}\n";
  EXPECT_NE(test::error_of([&] { data::load_dataset(chat.options(plain.path.string())); }).find("splits train, validation"),
            std::string::npos);
  std::filesystem::remove(plain / "validation.jsonl");
  std::ofstream(plain / "more.jsonl") << "{\"text\": \"c\"}\n";
  EXPECT_EQ(data::load_dataset(chat.options(plain.path.string())).rows.size(), 2u);
}

TEST(ParquetDataset, BadRowsAreNamedByFileAndRow) {
  const Chat chat;
  auto o = chat.options(dir() + "/messages_lz4.parquet");
  o.skip_bad_lines = false;
  const std::string err = test::error_of([&] { data::load_dataset(o); });
  EXPECT_NE(err.find("messages_lz4.parquet: row "), std::string::npos) << err;
  const std::string none = test::error_of([&] { data::load_dataset(chat.options(dir() + "/nested_v1.parquet")); });
  EXPECT_NE(none.find("nested_v1.parquet: has none of the columns input_ids, labels, text"), std::string::npos) << none;
}

// Inputs fuzz_parquet found crashing (tests/data/parquet_fuzz): each is one moeforge error naming the
// file. The first (session 21): a list entry whose definition level said its element was absent,
// read as a value past the column's values (std::out_of_range, not an Error).
TEST(ParquetBadInput, FuzzFoundInputsAreOneError) {
  const std::string folder = test::fixture("../data/parquet_fuzz");
  size_t seen = 0;
  for (const auto& entry : std::filesystem::directory_iterator(folder)) {
    ++seen;
    const std::string err = test::error_of([&] {
      const auto f = ParquetFile::from_bytes(test::read_text(entry.path().string()), "found.parquet");
      f.for_each_row(f.top_level_fields(), [](int64_t, Json&&) {});
    });
    EXPECT_EQ(err.rfind("found.parquet", 0), 0u) << entry.path() << ": " << err;
  }
  EXPECT_GE(seen, 1u);
}

// Damaged files: every truncation and every single-byte change of a fixture either reads or is one
// moeforge error naming the file, never a crash or a read out of bounds (the sanitizer build runs
// this too; tests/fuzz/fuzz_parquet.cpp goes further).
TEST(ParquetBadInput, EveryTruncationAndByteChangeIsOneErrorOrARead) {
  for (const std::string name : {"messages_lz4", "tokens_zstd_v2", "nested_v2", "byte_stream_split"}) {
    const std::string bytes = test::read_text(dir() + "/" + name + ".parquet");
    const Json manifest = Json::parse(test::read_text(dir() + "/MANIFEST.json"));
    const auto fields = manifest["cases"][name]["fields"].get<std::vector<std::string>>();
    const auto attempt = [&](std::string b) {
      try {
        rows_of(ParquetFile::from_bytes(std::move(b), "damaged.parquet"), fields);
      } catch (const Error& e) {
        EXPECT_EQ(std::string(e.what()).rfind("damaged.parquet", 0), 0u) << e.what();
      }
    };
    for (size_t n = 0; n < bytes.size(); n += 97) attempt(bytes.substr(0, n));
    for (size_t i = 0; i < bytes.size(); i += 5) {
      std::string b = bytes;
      b[i] = static_cast<char>(b[i] ^ (0x55 + i % 7));
      attempt(b);
    }
    EXPECT_NE(test::error_of([&] { rows_of(ParquetFile::from_bytes(bytes.substr(0, 100), "t.parquet"), fields); })
                  .find("t.parquet: not a Parquet file"),
              std::string::npos);
  }
}
