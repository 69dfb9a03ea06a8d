// Every subcommand's command line on CLI11: one CLI::App per command ("moeforge <name>"), so help
// (-h/--help, with each option's default), validation and error wording come from one place.
#pragma once
#include <CLI/CLI.hpp>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace moeforge::cli {

// A command's parser: "moeforge <name>" with a description (shown first in --help) and the
// footer (examples, notes); options show their defaults in --help.
std::unique_ptr<CLI::App> make_app(const std::string& name, const std::string& description,
                                   const std::string& footer = "");

// Parses `argv` (the arguments after the command's name). Returns the exit code when the command
// ends here: 0 after -h/--help (the help on stdout), 2 after a usage error (one line on stderr
// naming the option, and where to find the options); nullopt to go on.
std::optional<int> parse(CLI::App& app, const std::vector<std::string>& argv);

// A number >= lo (as text: CLI11 validates before converting), with an error that says so.
CLI::Validator at_least(double lo);

// "1,2,3" -> ids; an error naming `flag` on anything else.
std::vector<int64_t> parse_id_list(const std::string& text, const std::string& flag);

}  // namespace moeforge::cli
