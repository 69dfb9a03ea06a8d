#include "data/row_formats.h"

#include <map>

#include "core/error.h"

namespace moeforge::data {

namespace {

using Json = nlohmann::ordered_json;

Json message(const std::string& role, Json content) {
  Json m = Json::object();
  m["role"] = role;
  m["content"] = std::move(content);
  return m;
}

// The row's rendering options travel with the conversation (chat_options_of reads them there).
Json with_options(Json messages, const Json& row) {
  Json out = Json::object();
  out["messages"] = std::move(messages);
  for (const char* key : {"tools", "chat_template_kwargs"})
    if (row.contains(key) && !row[key].is_null()) out[key] = row[key];
  return out;
}

// A string field that may be absent or null ("" then).
std::string optional_string(const Json& row, const char* key, const std::string& where) {
  if (!row.contains(key) || row[key].is_null()) return "";
  MF_CHECK(row[key].is_string(), where, ": field '", key, "' must be a string");
  return row[key].get<std::string>();
}

// ShareGPT speakers as the chat templates name them (LLaMA-Factory's names among them).
const std::map<std::string, std::string>& speaker_roles() {
  static const std::map<std::string, std::string> roles = {
      {"human", "user"},          {"user", "user"},           {"gpt", "assistant"},   {"assistant", "assistant"},
      {"model", "assistant"},     {"chatgpt", "assistant"},   {"function_call", "assistant"},
      {"system", "system"},       {"tool", "tool"},           {"observation", "tool"}, {"function", "tool"},
  };
  return roles;
}

}  // namespace

std::optional<Json> sharegpt_conversation(const Json& row, const std::string& where) {
  if (!row.contains("conversations")) return std::nullopt;
  const Json& turns = row["conversations"];
  MF_CHECK(turns.is_array() && !turns.empty(), where, ": field 'conversations' must be a non-empty list");
  Json messages = Json::array();
  const std::string system = optional_string(row, "system", where);
  if (!system.empty()) messages.push_back(message("system", system));
  for (size_t i = 0; i < turns.size(); ++i) {
    const Json& t = turns[i];
    const char* who = t.is_object() && t.contains("from") ? "from" : "role";
    const char* what = t.is_object() && t.contains("value") ? "value" : "content";
    MF_CHECK(t.is_object() && t.contains(who) && t[who].is_string(), where, ": conversations[", i,
             "] must be an object with a string 'from' (or 'role')");
    const std::string speaker = t[who].get<std::string>();
    const auto role = speaker_roles().find(speaker);
    if (role == speaker_roles().end()) {
      std::string known;
      for (const auto& [name, r] : speaker_roles()) known += (known.empty() ? "" : ", ") + name;
      MF_THROW(where, ": conversations[", i, "]: '", who, "' is '", speaker, "', expected one of ", known);
    }
    MF_CHECK(!t.contains(what) || t[what].is_string() || t[what].is_null(), where, ": conversations[", i, "].", what,
             " must be a string");
    messages.push_back(message(role->second, t.contains(what) ? t[what] : Json()));
  }
  return with_options(std::move(messages), row);
}

std::optional<Json> alpaca_conversation(const Json& row, const std::string& where) {
  if (!row.contains("instruction") || !row.contains("output")) return std::nullopt;
  Json messages = Json::array();
  const std::string system = optional_string(row, "system", where);
  if (!system.empty()) messages.push_back(message("system", system));
  if (row.contains("history") && !row["history"].is_null()) {
    const Json& history = row["history"];
    MF_CHECK(history.is_array(), where, ": field 'history' must be a list of [question, answer] pairs");
    for (size_t i = 0; i < history.size(); ++i) {
      const Json& pair = history[i];
      MF_CHECK(pair.is_array() && pair.size() == 2 && pair[0].is_string() && pair[1].is_string(), where, ": history[", i,
               "] must be a [question, answer] pair of strings");
      messages.push_back(message("user", pair[0]));
      messages.push_back(message("assistant", pair[1]));
    }
  }
  std::string user = optional_string(row, "instruction", where);
  const std::string input = optional_string(row, "input", where);
  if (!input.empty()) user += (user.empty() ? "" : "\n") + input;
  messages.push_back(message("user", user));
  messages.push_back(message("assistant", optional_string(row, "output", where)));
  return with_options(std::move(messages), row);
}

}  // namespace moeforge::data
