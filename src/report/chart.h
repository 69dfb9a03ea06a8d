// Line charts of a run's metrics against step: panels stacked vertically, each with its axes,
// "nice" ticks (1, 2 or 5 times a power of ten) labelled, a title and a legend.
#pragma once
#include <string>
#include <vector>

#include "report/png.h"

namespace moeforge::report {

struct Series {
  std::string name;
  std::vector<double> x, y;  // same length; non-finite y values are skipped
  Rgb color;
  bool markers = false;      // a square at every point (sparse series: validation)
};

struct Panel {
  std::string title;
  std::vector<Series> series;
};

// `panels` stacked in one image `width` wide, each `panel_height` tall; they share the step axis's range.
Image draw_panels(const std::vector<Panel>& panels, int width = 1200, int panel_height = 300);

// Tick values covering [lo, hi]: about `target` of them at a 1/2/5 x 10^k spacing.
std::vector<double> nice_ticks(double lo, double hi, int target = 5);
// A tick label: up to 4 significant digits, no trailing zeros ("0.001", "2.5e-05", "1200").
std::string tick_label(double v);

}  // namespace moeforge::report
