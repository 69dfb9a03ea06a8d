// moeforge plot: a run's loss (and validation loss), learning rate and gradient norm against step,
// drawn from its metrics.jsonl as a PNG.
#include <cstdio>
#include <filesystem>

#include "cli/app.h"
#include "cli/commands.h"
#include "core/error.h"
#include "report/chart.h"
#include "report/metrics.h"

namespace moeforge::cli {

int cmd_plot(const std::vector<std::string>& argv) {
  auto app = make_app("plot", "Draw a run's loss, validation loss, learning rate and gradient norm against step (from "
                      "its\\nmetrics.jsonl) as a PNG.",
                      "\\nExample: moeforge plot out/ -o out/loss.png");
  std::string run, out;
  int64_t width = 1200;
  app->add_option("run", run, "the run's output folder (or its metrics.jsonl)")->required();
  app->add_option("-o,--output", out, "the PNG to write (default: <run>/loss.png)");
  app->add_option("--width", width, "image width in pixels")->check(CLI::Range(400, 8000));
  if (auto code = parse(*app, argv)) return *code;
  namespace fs = std::filesystem;
  const report::RunMetrics m = report::read_metrics(run);
  if (out.empty()) out = ((fs::is_directory(run) ? fs::path(run) : fs::path(run).parent_path()) / "loss.png").string();
  std::vector<report::Panel> panels;
  report::Panel loss{"loss", {{"train", m.step, m.loss, {31, 119, 180}}}};
  if (!m.eval_step.empty()) loss.series.push_back({"eval", m.eval_step, m.eval_loss, {214, 39, 40}, true});
  panels.push_back(loss);
  panels.push_back({"learning rate", {{"lr", m.step, m.lr, {44, 160, 44}}}});
  panels.push_back({"gradient norm", {{"grad norm", m.step, m.grad_norm, {148, 103, 189}}}});
  report::draw_panels(panels, static_cast<int>(width)).save_png(out);
  std::printf("wrote %s (%zu training and %zu validation records)\n", out.c_str(), m.step.size(), m.eval_step.size());
  return 0;
}

}  // namespace moeforge::cli
