// An RGB image and its PNG encoding (8-bit truecolor, zlib-compressed, CRC-checked chunks), for
// the plots moeforge draws of a run.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace moeforge::report {

struct Rgb {
  uint8_t r = 0, g = 0, b = 0;
  bool operator==(const Rgb& o) const { return r == o.r && g == o.g && b == o.b; }
};

class Image {
 public:
  Image(int width, int height, Rgb background);
  int width() const { return w_; }
  int height() const { return h_; }
  void set(int x, int y, Rgb c);  // ignores points outside the image
  Rgb at(int x, int y) const;
  void fill_rect(int x0, int y0, int x1, int y1, Rgb c);  // [x0, x1) x [y0, y1)
  // A line `thickness` pixels wide between two points (Bresenham, a square pen).
  void line(int x0, int y0, int x1, int y1, Rgb c, int thickness = 1);
  // The PNG file's bytes.
  std::string png() const;
  // Writes the PNG to `path` atomically (a temporary file renamed over it).
  void save_png(const std::string& path) const;

 private:
  int w_, h_;
  std::vector<uint8_t> px_;  // rows of RGB triples
};

}  // namespace moeforge::report
