#include "cli/app.h"

#include <algorithm>
#include <cstdio>
#include <iostream>
#include <sstream>

#include "core/error.h"

namespace moeforge::cli {

std::unique_ptr<CLI::App> make_app(const std::string& name, const std::string& description, const std::string& footer) {
  auto app = std::make_unique<CLI::App>(description, "moeforge " + name);
  app->option_defaults()->always_capture_default();
  app->get_formatter()->column_width(34);
  if (!footer.empty()) app->footer(footer);
  return app;
}

std::optional<int> parse(CLI::App& app, const std::vector<std::string>& argv) {
  std::vector<std::string> reversed(argv.rbegin(), argv.rend());  // CLI11 takes them last first
  try {
    app.parse(reversed);
  } catch (const CLI::CallForHelp&) {
    std::cout << app.help();
    return 0;
  } catch (const CLI::CallForAllHelp&) {
    std::cout << app.help("", CLI::AppFormatMode::All);
    return 0;
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "%s: usage error: %s (%s --help lists the options)\n", app.get_name().c_str(), e.what(),
                 app.get_name().c_str());
    return 2;
  }
  return std::nullopt;
}

CLI::Validator at_least(double lo) {
  std::ostringstream name;
  name << ">=" << lo;
  return CLI::Validator(
      [lo](std::string& text) -> std::string {
        size_t used = 0;
        double v = 0;
        try {
          v = std::stod(text, &used);
        } catch (const std::exception&) {
          used = 0;
        }
        if (used != text.size() || text.empty()) return "'" + text + "' is not a number";
        if (!(v >= lo)) {
          std::ostringstream m;
          m << "must be >= " << lo << ", got " << text;
          return m.str();
        }
        return "";
      },
      name.str());
}

std::vector<int64_t> parse_id_list(const std::string& text, const std::string& flag) {
  std::vector<int64_t> ids;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    size_t used = 0;
    long long v = 0;
    try {
      v = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    MF_CHECK(used == item.size() && !item.empty(), flag, ": '", item, "' is not a token id (expected comma-separated integers)");
    ids.push_back(v);
  }
  MF_CHECK(!ids.empty(), flag, ": no token ids given");
  return ids;
}

}  // namespace moeforge::cli
