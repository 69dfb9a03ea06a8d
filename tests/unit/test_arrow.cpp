// Arrow IPC datasets: every fixture (tools/make_arrow_fixtures.py: stream and file formats, the
// legacy framing and metadata V4, LZ4_FRAME and ZSTD bodies, every value type a row holds, columns of
// other types stepped over) reads as pyarrow reads it; a folder written by datasets' save_to_disk
// trains as the same rows in jsonl; a DatasetDict folder asks for a split; bad files are one error
// naming the file.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "data/arrow_ipc.h"
#include "data/dataset.h"
#include "data/parquet_codecs.h"
#include "hf/tokenizer/tokenizer.h"
#include "test_util.h"

using namespace moeforge;
using data::arrow::ArrowFile;
using data::arrow::Json;

namespace {

std::string dir() { return test::fixture("arrow"); }

std::vector<Json> rows_of(const ArrowFile& f, const std::vector<std::string>& fields) { return test::table_rows(f, fields); }
std::vector<Json> expected_rows(const std::string& name) { return test::jsonl_objects(dir() + "/" + name + ".expected.jsonl"); }

Json manifest() { return Json::parse(test::read_text(dir() + "/MANIFEST.json")); }

data::DatasetOptions text_options(const std::string& path, const hf::Tokenizer& tok) {
  data::DatasetOptions o;
  o.path = path;
  o.tokenizer = &tok;
  o.eos_id = 2;
  return o;
}

}  // namespace

TEST(ArrowRead, EveryFixtureReadsAsPyarrowReadsIt) {
  const Json m = manifest();
  ASSERT_GE(m["cases"].size(), 4u);
  for (const auto& [file, c] : m["cases"].items()) {
    const std::string name = std::filesystem::path(file).stem().string();
    const auto fields = c["fields"].get<std::vector<std::string>>();
    const auto f = ArrowFile::open(dir() + "/" + file);
    const auto got = rows_of(f, fields);
    const auto want = expected_rows(name);
    ASSERT_EQ(got.size(), want.size()) << name;
    EXPECT_EQ(f.num_rows(), static_cast<int64_t>(want.size())) << name;
    for (size_t r = 0; r < want.size(); ++r) ASSERT_EQ(got[r], want[r]) << name << " row " << r;
  }
}

// The columns beside a dataset's (timestamp, decimal, union, run-end encoded) are stepped over by
// counting their buffers; asked for, each is one error naming it. The dictionary-encoded and
// string-view columns among them are read as their values.
TEST(ArrowRead, OnlyTheFieldsAskedForAreRead) {
  const auto f = ArrowFile::open(dir() + "/messages_stream.arrow");
  EXPECT_EQ(f.top_level_fields(),
            (std::vector<std::string>{"source", "messages", "created", "tools", "score", "prompt", "tag", "text", "note",
                                      "completion", "lang", "chat_template_kwargs"}));
  EXPECT_EQ(rows_of(f, {"tools", "nothing_like_this"}).size(), 23u);
  const auto sources = rows_of(f, {"source", "note"});
  ASSERT_EQ(sources.size(), 23u);
  const std::vector<std::string> written = {"web", "book", "code"};  // tools/make_arrow_fixtures.py: i % 3
  for (size_t i = 0; i < sources.size(); ++i) {
    EXPECT_EQ(sources[i].value("source", ""), written[i % 3]) << i;
    EXPECT_TRUE(sources[i].contains("note") && sources[i]["note"].is_string()) << sources[i].dump();
  }
  for (const auto& [column, type] : std::vector<std::pair<std::string, std::string>>{
           {"created", "timestamp"}, {"score", "decimal"}, {"tag", "union"}, {"lang", "run-end encoded"}}) {
    const std::string err = test::error_of([&] { rows_of(f, {column}); });
    EXPECT_NE(err.find("column '" + column + "' has type " + type + ", which a dataset row does not hold"),
              std::string::npos)
        << err;
  }
  const std::string none = test::error_of([&] { rows_of(f, {"labels", "input_ids"}); });
  EXPECT_NE(none.find("messages_stream.arrow: has none of the columns labels, input_ids (its columns: source, messages"),
            std::string::npos)
      << none;
}

// LZ4 frames: linked blocks whose matches reach into the previous block, a block stored
// uncompressed, block checksums and the content size flagged (skipped), and a bad magic number.
TEST(ArrowCodecs, Lz4FramesWithLinkedAndStoredBlocks) {
  const std::vector<uint8_t> frame = {
      0x04, 0x22, 0x4d, 0x18,  // magic
      0x40 | 0x10 | 0x08, 0x40,  // version 01, block checksums, content size; 64 KB blocks
      14, 0, 0, 0, 0, 0, 0, 0,   // content size
      0xaa,                      // header checksum (not verified)
      5, 0, 0, 0, (4 << 4), 'a', 'b', 'c', 'd', 1, 2, 3, 4,  // block 1: 4 literals "abcd" + checksum
      3, 0, 0, 0, (0 << 4) | 2, 4, 0, 9, 9, 9, 9,  // block 2: a match of 6 from 4 back (into block 1) + checksum
      4, 0, 0, 0x80, 'w', 'x', 'y', 'z', 7, 7, 7, 7,  // block 3: stored, "wxyz" + checksum
      0, 0, 0, 0};  // end mark
  const auto out = data::parquet::lz4_frame_decompress(frame.data(), frame.size(), 14, "f");
  EXPECT_EQ(std::string(out.begin(), out.end()), "abcdabcdabwxyz");
  std::vector<uint8_t> bad = frame;
  bad[0] = 0x05;
  EXPECT_NE(test::error_of([&] { data::parquet::lz4_frame_decompress(bad.data(), bad.size(), 14, "f.arrow"); })
                .find("f.arrow: not an LZ4 frame"),
            std::string::npos);
  EXPECT_NE(test::error_of([&] { data::parquet::lz4_frame_decompress(frame.data(), frame.size(), 15, "f.arrow"); })
                .find("LZ4 data gives 14 bytes, the header says 15"),
            std::string::npos);
}

// A folder written by datasets' save_to_disk reads its Arrow files in state.json's order, as the
// same rows in jsonl do; a DatasetDict's folder names its splits and asks for one.
TEST(ArrowDataset, ASavedDatasetFolderTrainsAsTheSameRowsInJsonl) {
  const hf::Tokenizer tok = hf::Tokenizer::load(test::fixture("chat/qwen3"));
  test::TempDir tmp;
  std::filesystem::copy_file(dir() + "/saved.expected.jsonl", tmp / "saved.jsonl");
  const auto from_arrow = data::load_dataset(text_options(dir() + "/saved", tok));
  const auto from_jsonl = data::load_dataset(text_options(tmp / "saved.jsonl", tok));
  ASSERT_EQ(from_arrow.files.size(), 2u);
  EXPECT_EQ(std::filesystem::path(from_arrow.files[0]).filename(), "data-00000-of-00002.arrow");
  ASSERT_EQ(from_arrow.rows.size(), 12u);
  ASSERT_EQ(from_arrow.rows.size(), from_jsonl.rows.size());
  for (size_t r = 0; r < from_jsonl.rows.size(); ++r) {
    EXPECT_EQ(from_arrow.rows[r].input_ids, from_jsonl.rows[r].input_ids) << r;
    EXPECT_EQ(from_arrow.rows[r].labels, from_jsonl.rows[r].labels) << r;
  }
  // The second file's rows count from 1 again, as a second jsonl file's lines do, and name their file.
  EXPECT_EQ(from_arrow.rows[6].line, 1);
  EXPECT_EQ(from_arrow.where(from_arrow.rows[6]), dir() + "/saved/data-00001-of-00002.arrow: row 1");
  EXPECT_EQ(from_jsonl.where(from_jsonl.rows[6]), tmp / "saved.jsonl:7");

  const std::string err = test::error_of([&] { data::load_dataset(text_options(dir() + "/saved_dict", tok)); });
  EXPECT_NE(err.find("saved_dict: a saved DatasetDict with the splits train, test (dataset_dict.json); choose one, e.g. " +
                     dir() + "/saved_dict/train"),
            std::string::npos)
      << err;
  EXPECT_EQ(data::load_dataset(text_options(dir() + "/saved_dict/test", tok)).rows.size(), 3u);

  // A state.json naming a file that is not there is one error naming it.
  test::TempDir broken;
  std::filesystem::copy_file(dir() + "/saved/state.json", broken / "state.json");
  std::filesystem::copy_file(dir() + "/saved/data-00000-of-00002.arrow", broken / "data-00000-of-00002.arrow");
  const std::string missing = test::error_of([&] { data::load_dataset(text_options(broken.path.string(), tok)); });
  EXPECT_NE(missing.find("state.json: _data_files[1]: " + (broken / "data-00001-of-00002.arrow") + " is missing"),
            std::string::npos)
      << missing;
}

// The datasets cache keeps one file per split (NAME-train.arrow beside NAME-test.arrow): a folder of
// them asks for one, as a hub folder of Parquet shards does.
TEST(ArrowDataset, ACacheFolderOfSeveralSplitsIsRefused) {
  const hf::Tokenizer tok = hf::Tokenizer::load(test::fixture("chat/qwen3"));
  test::TempDir tmp;
  std::filesystem::copy_file(dir() + "/saved/data-00000-of-00002.arrow", tmp / "squad-train.arrow");
  std::filesystem::copy_file(dir() + "/saved/data-00001-of-00002.arrow", tmp / "squad-validation.arrow");
  const std::string err = test::error_of([&] { data::load_dataset(text_options(tmp.path.string(), tok)); });
  EXPECT_NE(err.find("folder holds the splits squad-train, squad-validation"), std::string::npos) << err;
  EXPECT_EQ(data::load_dataset(text_options(tmp / "squad-train.arrow", tok)).rows.size(), 6u);
}

// The file format is read through its footer's blocks: without the end-of-stream marker before
// the footer (which writers need not put there) it reads the same.
TEST(ArrowRead, TheFileFormatIsReadThroughItsFooter) {
  const std::string bytes = test::read_text(dir() + "/text_file_lz4.feather");
  const size_t n = bytes.size();
  const auto footer_len = static_cast<size_t>(static_cast<uint8_t>(bytes[n - 10])) |
                          (static_cast<size_t>(static_cast<uint8_t>(bytes[n - 9])) << 8);
  const size_t footer_at = n - 10 - footer_len;
  ASSERT_EQ(bytes.substr(footer_at - 8, 8), std::string("\xff\xff\xff\xff\0\0\0\0", 8));
  const std::string without_eos = bytes.substr(0, footer_at - 8) + bytes.substr(footer_at);
  const auto want = expected_rows("text_file_lz4");
  EXPECT_EQ(rows_of(ArrowFile::from_bytes(without_eos, "t.feather"), {"text"}), want);
  const std::string cut = test::error_of([&] { ArrowFile::from_bytes(bytes.substr(0, n - 3), "t.feather"); });
  EXPECT_NE(cut.find("t.feather: an Arrow file without ARROW1 at its end (cut short?)"), std::string::npos) << cut;
}

// A schema written by hand (FlatBuffers laid out byte by byte): an integer field whose type table is
// missing has no width to read its values with, and is refused when the file is opened.
TEST(ArrowBadInput, AnIntegerFieldWithoutItsWidthIsRefused) {
  std::string meta(84, '\0');
  const auto u16 = [&](size_t at, uint16_t v) { std::memcpy(&meta[at], &v, 2); };
  const auto u32 = [&](size_t at, uint32_t v) { std::memcpy(&meta[at], &v, 4); };
  u32(0, 16);                                              // root: the Message table at 16
  u16(4, 10), u16(6, 12), u16(8, 4), u16(10, 6), u16(12, 8);  // its vtable: version, header type, header
  u32(16, 16 - 4);                                         // Message: soffset to its vtable
  u16(20, 4);                                              // version V5
  meta[22] = 1;                                            // header type: Schema
  u32(24, 36 - 24);                                        // header -> the Schema table at 36
  u16(28, 8), u16(30, 8), u16(32, 0), u16(34, 4);          // Schema's vtable: fields at +4
  u32(36, 36 - 28);
  u32(40, 44 - 40);                                        // fields -> the vector at 44
  u32(44, 1), u32(48, 64 - 48);                            // one field, at 64
  u16(52, 10), u16(54, 12), u16(56, 4), u16(58, 0), u16(60, 8);  // Field's vtable: name, type_type (no type)
  u32(64, 64 - 52);
  u32(68, 76 - 68);                                        // name -> the string at 76
  meta[72] = 2;                                            // type_type: Int
  u32(76, 1), meta[80] = 'x';
  std::string file = "\xff\xff\xff\xff";
  const uint32_t len = static_cast<uint32_t>(meta.size());
  file.append(reinterpret_cast<const char*>(&len), 4);
  file += meta + std::string("\xff\xff\xff\xff\0\0\0\0", 8);
  const std::string err = test::error_of([&] { ArrowFile::from_bytes(file, "hand.arrow"); });
  EXPECT_NE(err.find("hand.arrow: message at byte 0: field 'x' is an integer of 0 bits"), std::string::npos) << err;
}

// Damaged files: every truncation and every single-byte change of a fixture either reads or is one
// moeforge error naming the file, never a crash or a read out of bounds (the sanitizer build runs
// this too; tests/fuzz/fuzz_arrow.cpp goes further).
TEST(ArrowBadInput, EveryTruncationAndByteChangeIsOneErrorOrARead) {
  const Json m = manifest();
  for (const std::string file : {"messages_stream.arrow", "tokens_zstd.arrow", "text_file_lz4.feather", "all_types_legacy.arrow",
                                 "dictionaries_views.arrow", "dictionaries_file.feather"}) {
    const std::string bytes = test::read_text(dir() + "/" + file);
    const auto fields = m["cases"][file]["fields"].get<std::vector<std::string>>();
    const auto attempt = [&](std::string b) {
      try {
        rows_of(ArrowFile::from_bytes(std::move(b), "damaged.arrow"), fields);
      } catch (const Error& e) {
        EXPECT_EQ(std::string(e.what()).rfind("damaged.arrow", 0), 0u) << e.what();
      }
    };
    for (size_t n = 0; n < bytes.size(); n += 61) attempt(bytes.substr(0, n));
    for (size_t i = 0; i < bytes.size(); i += 3) {
      std::string b = bytes;
      b[i] = static_cast<char>(b[i] ^ (0x55 + i % 7));
      attempt(b);
    }
  }
  EXPECT_NE(test::error_of([] { ArrowFile::from_bytes("PAR1 not arrow at all", "t.arrow"); }).find("t.arrow: not an Arrow IPC file"),
            std::string::npos);
}
