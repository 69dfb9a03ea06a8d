// Rows in the two other layouts that datasets on the Hugging Face hub commonly use, read as the
// conversations they hold, so that they train like a `messages` row (rendered by the chat
// template, loss on the assistant's turns), as LLaMA-Factory's sharegpt and alpaca formats do:
//   ShareGPT  {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", ...}, ...],
//              "system"?: "...", "tools"?: ...}   ("role"/"content" keys inside are taken too)
//   Alpaca    {"instruction": "...", "input"?: "...", "output": "...", "system"?: "...",
//              "history"?: [["question", "answer"], ...]}
// The user turn of an Alpaca row is the instruction, then a newline and the input when there is one.
#pragma once
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

namespace moeforge::data {

// {"messages": [...], plus the row's tools and chat_template_kwargs} for a ShareGPT row;
// nullopt for a row without "conversations". Errors name `where`.
std::optional<nlohmann::ordered_json> sharegpt_conversation(const nlohmann::ordered_json& row, const std::string& where);
// The same for an Alpaca row (one with "instruction" and "output").
std::optional<nlohmann::ordered_json> alpaca_conversation(const nlohmann::ordered_json& row, const std::string& where);

}  // namespace moeforge::data
