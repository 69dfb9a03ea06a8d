// What moeforge writes for people to look at: PNG plots (a valid file whose pixels hold the
// curves) and TensorBoard event files (TFRecord framing and CRC-32C; tools/tests reads them back
// with the tensorboard package itself).
#include <gtest/gtest.h>
#include <zlib.h>

#include <cstring>
#include <fstream>
#include <sstream>

#include "report/chart.h"
#include "report/metrics.h"
#include "report/png.h"
#include "report/tensorboard.h"
#include "test_util.h"

using namespace moeforge;
namespace fs = std::filesystem;

namespace {

uint32_t be32(const std::string& s, size_t at) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v = v << 8 | static_cast<uint8_t>(s[at + i]);
  return v;
}

// Decodes a PNG as moeforge writes it (8-bit RGB, filter 0 rows), checking every chunk's CRC.
report::Image decode_png(const std::string& png) {
  EXPECT_EQ(png.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
  size_t at = 8;
  int w = 0, h = 0;
  std::string idat;
  while (at < png.size()) {
    const uint32_t len = be32(png, at);
    const std::string type = png.substr(at + 4, 4), data = png.substr(at + 8, len);
    const uint32_t crc = be32(png, at + 8 + len);
    EXPECT_EQ(crc, crc32(0, reinterpret_cast<const Bytef*>(png.data() + at + 4), len + 4)) << type;
    if (type == "IHDR") {
      w = static_cast<int>(be32(data, 0));
      h = static_cast<int>(be32(data, 4));
      EXPECT_EQ(data[8], 8);
      EXPECT_EQ(data[9], 2);
    } else if (type == "IDAT") {
      idat += data;
    }
    at += 12 + len;
  }
  std::string raw(static_cast<size_t>(h) * (1 + 3 * w), '\0');
  uLongf n = raw.size();
  EXPECT_EQ(uncompress(reinterpret_cast<Bytef*>(raw.data()), &n, reinterpret_cast<const Bytef*>(idat.data()), idat.size()), Z_OK);
  report::Image img(w, h, {});
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x) {
      const char* p = raw.data() + y * (1 + 3 * w) + 1 + 3 * x;
      img.set(x, y, {static_cast<uint8_t>(p[0]), static_cast<uint8_t>(p[1]), static_cast<uint8_t>(p[2])});
    }
  return img;
}

int count_color(const report::Image& img, report::Rgb c, int y0, int y1) {
  int n = 0;
  for (int y = y0; y < y1; ++y)
    for (int x = 0; x < img.width(); ++x) n += img.at(x, y) == c;
  return n;
}

}  // namespace

TEST(Png, RoundTripsPixels) {
  report::Image img(37, 21, {255, 255, 255});
  img.line(0, 0, 36, 20, {200, 10, 10}, 2);
  img.fill_rect(5, 15, 9, 19, {0, 0, 255});
  const report::Image back = decode_png(img.png());
  ASSERT_EQ(back.width(), 37);
  ASSERT_EQ(back.height(), 21);
  for (int y = 0; y < 21; ++y)
    for (int x = 0; x < 37; ++x) ASSERT_TRUE(back.at(x, y) == img.at(x, y)) << x << "," << y;
  EXPECT_TRUE(back.at(6, 16) == (report::Rgb{0, 0, 255}));
  EXPECT_TRUE(back.at(0, 0) == (report::Rgb{200, 10, 10}));
}

TEST(Chart, NiceTicksAndLabels) {
  EXPECT_EQ(report::nice_ticks(0, 1, 5), (std::vector<double>{0, 0.2, 0.4, 0.6000000000000001, 0.8, 1}));
  const auto t = report::nice_ticks(3, 297, 8);
  EXPECT_EQ(t.front(), 50);
  EXPECT_EQ(t.back(), 250);
  EXPECT_EQ(report::tick_label(0.001), "0.001");
  EXPECT_EQ(report::tick_label(2.5e-5), "2.5e-05");
  EXPECT_EQ(report::tick_label(1200), "1200");
}

// `moeforge plot` on a run's metrics: each panel holds its series' color (the loss falling from
// the top-left: its first point is high in the loss panel, its last low).
TEST(Plot, DrawsEveryPanelFromMetrics) {
  test::TempDir dir;
  {
    std::ofstream m(dir / "metrics.jsonl");
    for (int s = 1; s <= 20; ++s)
      m << R"({"step":)" << s << R"(,"loss":)" << 5.0 / s << R"(,"lr":)" << 1e-3 * s / 20 << R"(,"grad_norm":)"
        << 1.0 + (s % 3) << "}\n";
    m << R"({"step":10,"eval_loss":0.7,"eval_perplexity":2.0,"eval_tokens":5})" << "\n";
  }
  const int rc = std::system((std::string(MOEFORGE_BIN) + " plot " + dir.path.string() + " > /dev/null").c_str());
  ASSERT_EQ(rc, 0);
  std::ifstream f(dir / "loss.png", std::ios::binary);
  const std::string png((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  const report::Image img = decode_png(png);
  ASSERT_EQ(img.width(), 1200);
  ASSERT_EQ(img.height(), 900);
  const report::Rgb train{31, 119, 180}, eval{214, 39, 40}, lr{44, 160, 44}, gn{148, 103, 189};
  EXPECT_GT(count_color(img, train, 0, 300), 500);
  EXPECT_GT(count_color(img, eval, 0, 300), 20);
  EXPECT_GT(count_color(img, lr, 300, 600), 500);
  EXPECT_EQ(count_color(img, lr, 0, 300), 0);
  EXPECT_GT(count_color(img, gn, 600, 900), 500);
  // Bad metrics: one error naming file:line.
  std::ofstream(dir / "bad.jsonl") << R"({"step":1,"loss":1})" << "\n{oops\n";
  const std::string e = test::error_of([&] { report::read_metrics(dir / "bad.jsonl"); });
  EXPECT_NE(e.find("bad.jsonl:2"), std::string::npos) << e;
}

TEST(TensorBoard, Crc32cAndRecordFraming) {
  EXPECT_EQ(report::crc32c("123456789", 9), 0xE3069283u);  // the CRC-32C check value (RFC 3720)
  test::TempDir dir;
  std::string path;
  {
    report::EventWriter w(dir / "tb");
    w.scalar("train/loss", 7, 1.5);
    path = w.path();
  }
  EXPECT_NE(fs::path(path).filename().string().find("events.out.tfevents."), std::string::npos);
  std::ifstream f(path, std::ios::binary);
  const std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  // Two records, each: u64 length, masked crc of it, data, masked crc of data.
  size_t at = 0;
  std::vector<std::string> records;
  while (at < s.size()) {
    uint64_t len = 0;
    std::memcpy(&len, s.data() + at, 8);
    uint32_t lc = 0, dc = 0;
    std::memcpy(&lc, s.data() + at + 8, 4);
    ASSERT_EQ(lc, report::masked_crc32c(s.data() + at, 8));
    const std::string data = s.substr(at + 12, len);
    std::memcpy(&dc, s.data() + at + 12 + len, 4);
    ASSERT_EQ(dc, report::masked_crc32c(data.data(), data.size()));
    records.push_back(data);
    at += 16 + len;
  }
  ASSERT_EQ(records.size(), 2u);
  EXPECT_NE(records[0].find("brain.Event:2"), std::string::npos);
  EXPECT_NE(records[1].find("train/loss"), std::string::npos);
  // step = 7: field 2, varint.
  EXPECT_NE(records[1].find(std::string("\x10\x07", 2)), std::string::npos);
  // simple_value 1.5f: field 2 of the Value, fixed32.
  const float v = 1.5f;
  std::string fv("\x15", 1);
  fv.append(reinterpret_cast<const char*>(&v), 4);
  EXPECT_NE(records[1].find(fv), std::string::npos);
}
