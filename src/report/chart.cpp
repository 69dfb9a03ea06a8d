#include "report/chart.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>

#include "report/font.h"

namespace moeforge::report {

namespace {

constexpr Rgb kWhite{255, 255, 255}, kBlack{30, 30, 30}, kGrid{225, 225, 225}, kAxis{110, 110, 110};
constexpr int kLeft = 110, kRight = 30, kTop = 40, kBottom = 44;  // margins of a panel's plot area

struct Range {
  double lo = std::numeric_limits<double>::infinity(), hi = -std::numeric_limits<double>::infinity();
  void add(double v) {
    if (!std::isfinite(v)) return;
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  bool empty() const { return lo > hi; }
  void pad() {  // a flat series still gets a visible range
    if (empty()) lo = 0, hi = 1;
    if (hi - lo < 1e-12 * std::max(1.0, std::abs(hi))) {
      const double d = std::max(std::abs(hi) * 0.05, 1e-12);
      lo -= d;
      hi += d;
    }
  }
};

}  // namespace

std::vector<double> nice_ticks(double lo, double hi, int target) {
  if (!(hi > lo)) return {lo};
  const double raw = (hi - lo) / std::max(1, target);
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  double step = mag;
  for (double m : {1.0, 2.0, 5.0, 10.0})
    if (m * mag >= raw) {
      step = m * mag;
      break;
    }
  std::vector<double> out;
  for (double v = std::ceil(lo / step) * step; v <= hi + step * 1e-9; v += step)
    out.push_back(std::abs(v) < step * 1e-9 ? 0.0 : v);
  return out;
}

std::string tick_label(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.4g", v);
  return buf;
}

Image draw_panels(const std::vector<Panel>& panels, int width, int panel_height) {
  Image img(width, panel_height * std::max<int>(1, static_cast<int>(panels.size())), kWhite);
  Range xr;
  for (const auto& p : panels)
    for (const auto& s : p.series)
      for (double x : s.x) xr.add(x);
  xr.pad();
  const int plot_w = width - kLeft - kRight, plot_h = panel_height - kTop - kBottom;
  for (size_t pi = 0; pi < panels.size(); ++pi) {
    const Panel& p = panels[pi];
    const int top = static_cast<int>(pi) * panel_height + kTop, left = kLeft;
    Range yr;
    for (const auto& s : p.series)
      for (size_t i = 0; i < s.y.size(); ++i) yr.add(s.y[i]);
    yr.pad();
    auto px = [&](double x) { return left + static_cast<int>(std::lround((x - xr.lo) / (xr.hi - xr.lo) * plot_w)); };
    auto py = [&](double y) { return top + plot_h - static_cast<int>(std::lround((y - yr.lo) / (yr.hi - yr.lo) * plot_h)); };
    // Grid and tick labels.
    for (double t : nice_ticks(yr.lo, yr.hi)) {
      const int y = py(t);
      img.line(left, y, left + plot_w, y, kGrid);
      const std::string s = tick_label(t);
      draw_text(img, left - 10 - text_width(s), y - kGlyphHeight, s, kBlack);
    }
    for (double t : nice_ticks(xr.lo, xr.hi, 8)) {
      const int x = px(t);
      img.line(x, top, x, top + plot_h, kGrid);
      const std::string s = tick_label(t);
      draw_text(img, x - text_width(s) / 2, top + plot_h + 8, s, kBlack);
    }
    img.line(left, top, left, top + plot_h, kAxis, 2);
    img.line(left, top + plot_h, left + plot_w, top + plot_h, kAxis, 2);
    draw_text(img, left, top - 26, p.title, kBlack);
    if (pi + 1 == panels.size()) draw_text(img, left + plot_w - text_width("step"), top + plot_h + 26, "step", kBlack);
    // The series, then the legend at the top right.
    int legend_x = left + plot_w;
    for (auto it = p.series.rbegin(); it != p.series.rend(); ++it) {
      const Series& s = *it;
      bool have = false;
      int lx = 0, ly = 0;
      for (size_t i = 0; i < s.x.size() && i < s.y.size(); ++i) {
        if (!std::isfinite(s.y[i]) || !std::isfinite(s.x[i])) continue;
        const int x = px(s.x[i]), y = py(s.y[i]);
        if (have) img.line(lx, ly, x, y, s.color, 2);
        if (s.markers) img.fill_rect(x - 4, y - 4, x + 5, y + 5, s.color);
        lx = x, ly = y, have = true;
      }
      legend_x -= text_width(s.name) + 40;
      img.fill_rect(legend_x, top - 20, legend_x + 24, top - 14, s.color);
      draw_text(img, legend_x + 30, top - 24, s.name, kBlack);
    }
  }
  return img;
}

}  // namespace moeforge::report
