// A 5 x 7 pixel font (digits, lowercase letters -- uppercase drawn as lowercase -- and the
// punctuation numbers and labels need), drawn at an integer scale: the plots' axis labels and titles.
#pragma once
#include <string>

#include "report/png.h"

namespace moeforge::report {

constexpr int kGlyphWidth = 5, kGlyphHeight = 7;

// Draws `text` with its top-left corner at (x, y), each pixel a scale x scale square; returns the
// width drawn. Characters the font lacks are drawn as '?'.
int draw_text(Image& img, int x, int y, const std::string& text, Rgb color, int scale = 2);
int text_width(const std::string& text, int scale = 2);

}  // namespace moeforge::report
