// Datasets (jsonl forms, files/folders/globs, bad lines), packing, and the packing invariant: packed
// documents get exactly the per-token losses they get alone.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <thread>

#include "core/error.h"
#include "data/dataset.h"
#include "data/model_text.h"
#include "data/token_cache.h"
#include "data/token_batches.h"
#include "hf/safetensors.h"
#include "hf/chat/chat_template.h"
#include "hf/tokenizer/tokenizer.h"
#include "models/pretrained.h"
#include "ops/ops.h"
#include "test_util.h"

using namespace moeforge;

namespace {

// Per-position next-token losses of one [1, S] row (position t predicts t+1; last is unused).
std::vector<float> token_losses(const models::CausalLM& m, const std::vector<int64_t>& ids, const Tensor* pos = nullptr,
                                const Tensor* docs = nullptr) {
  const int64_t s = static_cast<int64_t>(ids.size());
  Tensor in = Tensor::from_i64(ids, {1, s});
  models::ForwardInputs fi{in};
  fi.position_ids = pos;
  fi.doc_ids = docs;
  auto out = m.forward(fi);
  std::vector<int64_t> targets(static_cast<size_t>(s), -100);
  for (int64_t t = 0; t + 1 < s; ++t) targets[t] = ids[t + 1];
  Tensor l = ops::cross_entropy_rows(out.logits.view({s, -1}), Tensor::from_i64(targets, {s}), -100, nullptr);
  return l.to_f32_vector();
}

}  // namespace

TEST(Packing, PackedDocumentsHaveTheLossesTheyHaveAlone) {
  for (const char* name : {"qwen3_moe_a", "qwen3_moe_b"}) {  // b: sliding window + MQA
    auto m = models::from_pretrained(test::fixture(name));
    const std::vector<int64_t> a = {5, 17, 3, 9, 22, 41, 7}, b = {11, 2, 30, 30, 8, 15, 1, 19, 4};
    auto la = token_losses(*m.model, a), lb = token_losses(*m.model, b);
    std::vector<int64_t> packed = a, pos, docs;
    packed.insert(packed.end(), b.begin(), b.end());
    for (size_t i = 0; i < a.size(); ++i) pos.push_back(static_cast<int64_t>(i)), docs.push_back(0);
    for (size_t i = 0; i < b.size(); ++i) pos.push_back(static_cast<int64_t>(i)), docs.push_back(1);
    const int64_t s = static_cast<int64_t>(packed.size());
    Tensor tp = Tensor::from_i64(pos, {1, s}), td = Tensor::from_i64(docs, {1, s});
    auto lp = token_losses(*m.model, packed, &tp, &td);
    for (size_t i = 0; i + 1 < a.size(); ++i) EXPECT_NEAR(lp[i], la[i], 1e-5) << name << " a[" << i << "]";
    for (size_t i = 0; i + 1 < b.size(); ++i) EXPECT_NEAR(lp[a.size() + i], lb[i], 1e-5) << name << " b[" << i << "]";
    // Without the document mask the second document would see the first: the test can fail.
    auto lx = token_losses(*m.model, packed, &tp, nullptr);
    float worst = 0;
    for (size_t i = 1; i + 1 < b.size(); ++i) worst = std::max(worst, std::abs(lx[a.size() + i] - lb[i]));
    EXPECT_GT(worst, 1e-3) << name;
  }
}

TEST(Packing, RowsKeepDocumentBoundaries) {
  std::vector<data::TokenRow> rows;
  for (int d = 0; d < 5; ++d) {
    data::TokenRow r;
    for (int t = 0; t < 4 + d; ++t) r.input_ids.push_back(100 * d + t);
    rows.push_back(r);
  }
  data::TokenBatches tb(rows, 12, 7, /*packing=*/true);
  EXPECT_EQ(tb.stats().documents, 5);
  EXPECT_LT(tb.rows(), 5);
  int64_t tokens = 0;
  for (int64_t i = 0; i < tb.rows(); ++i) {
    auto mb = tb.micro_batch(i, 1);
    const int64_t s = mb.input_ids.size(1);
    EXPECT_LE(s, 12);
    for (int64_t t = 0; t < s; ++t) {
      const int64_t id = mb.input_ids.i64()[t], doc = mb.doc_ids.i64()[t];
      if (doc < 0) continue;
      ++tokens;
      EXPECT_EQ(mb.position_ids.i64()[t], id % 100) << "positions restart per document";
      if (id % 100 == 0) EXPECT_EQ(mb.labels.i64()[t], -100) << "no prediction across a boundary";
      else EXPECT_EQ(mb.labels.i64()[t], id);
      if (t > 0 && mb.doc_ids.i64()[t - 1] == doc) EXPECT_EQ(mb.input_ids.i64()[t - 1] / 100, id / 100);
    }
  }
  EXPECT_EQ(tokens, 4 + 5 + 6 + 7 + 8);
}

TEST(Dataset, TextAndPromptCompletionRows) {
  test::TempDir dir;
  auto tok = hf::Tokenizer::load(test::fixture("tokenizers/llama3"));
  std::ofstream(dir / "d.jsonl") << R"({"text": "Hello world"})" << "\n"
                                 << R"({"prompt": "Question: 2+2?", "completion": " 4"})" << "\n"
                                 << R"({"input_ids": [5, 6, 7], "labels": [-100, 6, 7]})" << "\n";
  data::DatasetOptions o;
  o.path = dir / "d.jsonl";
  o.tokenizer = &tok;
  o.eos_id = 1;
  auto d = data::load_dataset(o);
  ASSERT_EQ(d.rows.size(), 3u);
  auto want = tok.encode("Hello world", true);
  want.push_back(1);
  EXPECT_EQ(test::ids64(d.rows[0].input_ids), want);
  EXPECT_FALSE(d.rows[0].labels) << "a text row trains every token: no labels of its own";
  const auto p = tok.encode("Question: 2+2?", true), c = tok.encode(" 4", false);
  ASSERT_EQ(d.rows[1].input_ids.size(), p.size() + c.size() + 1);
  for (size_t i = 0; i < p.size(); ++i) EXPECT_EQ((*d.rows[1].labels)[i], -100);
  EXPECT_EQ((*d.rows[1].labels)[p.size()], c[0]);
  EXPECT_EQ(d.rows[1].input_ids.back(), 1);
  EXPECT_EQ(*d.rows[2].labels, std::vector<data::TokenId>({-100, 6, 7}));
}

// A dataset holds 32-bit token ids: an id outside that range is an error naming the row, not a
// silently wrapped id.
TEST(Dataset, TokenIdsOutsideThirtyTwoBitsAreNamed) {
  test::TempDir dir;
  std::ofstream(dir / "t.jsonl") << R"({"input_ids": [1, 2]})" << "\n" << R"({"input_ids": [1, 4294967297]})" << "\n"
                                 << R"({"input_ids": [1, 2], "labels": [-100, -2147483649]})" << "\n";
  data::DatasetOptions o;
  o.path = dir / "t.jsonl";
  const std::string err = test::error_of([&] { data::load_dataset(o); });
  EXPECT_NE(err.find("t.jsonl:2: field 'input_ids' holds 4294967297, outside the range of token ids"), std::string::npos)
      << err;
  o.skip_bad_lines = true;
  const auto d = data::load_dataset(o);
  EXPECT_EQ(d.rows.size(), 1u);
  EXPECT_EQ(d.skipped_lines, 2);
  EXPECT_FALSE(d.rows[0].labels) << "token rows without labels train every token: no copy";
}

TEST(Dataset, FoldersAndGlobs) {
  test::TempDir dir;
  std::ofstream(dir / "b.jsonl") << R"({"input_ids": [2, 3]})" << "\n";
  std::ofstream(dir / "a.jsonl") << R"({"input_ids": [1, 2]})" << "\n";
  std::ofstream(dir / "c.txt") << "ignored\n";
  data::DatasetOptions o;
  o.path = dir.path.string();
  auto d = data::load_dataset(o);
  ASSERT_EQ(d.files.size(), 2u);
  EXPECT_EQ(d.rows[0].input_ids[0], 1);
  o.path = dir / "b*.jsonl";
  EXPECT_EQ(data::load_dataset(o).rows.size(), 1u);
}

// A long load reports how far it has come: here every row (progress_seconds 0), counting the rows
// kept and skipped over both files, naming the file being read.
TEST(Dataset, ALoadReportsItsProgress) {
  test::TempDir tmp;
  std::ofstream(tmp / "a.jsonl") << "{\"input_ids\": [1, 2]}\n{\"input_ids\": [3]}\n";
  std::ofstream(tmp / "b.jsonl") << "{\"input_ids\": [4, 5]}\nnot json\n{\"input_ids\": [6]}\n";
  data::DatasetOptions o;
  o.path = tmp.path.string();
  o.skip_bad_lines = true;
  std::vector<data::LoadProgress> seen;
  o.progress_seconds = 0;
  o.on_progress = [&](const data::LoadProgress& p) { seen.push_back(p); };
  const auto d = data::load_dataset(o);
  ASSERT_EQ(d.rows.size(), 4u);
  ASSERT_EQ(seen.size(), 2u);  // after each batch of rows (here: each file's)
  EXPECT_EQ(seen[0].rows, 2);
  EXPECT_EQ(seen[0].file_number, 1u);
  EXPECT_EQ(seen[0].files, 2u);
  EXPECT_EQ(seen[1].file, tmp / "b.jsonl");
  EXPECT_EQ(seen[1].file_number, 2u);
  EXPECT_EQ(seen[1].rows, 4);
  EXPECT_EQ(seen[1].skipped, 1);
  o.progress_seconds = 3600;  // a load that ends sooner reports nothing
  seen.clear();
  data::load_dataset(o);
  EXPECT_TRUE(seen.empty());
}

// Rows are parsed and tokenized on several threads in batches: any number of workers gives the
// same rows in the same order (over batch and file boundaries, text, prompt/completion, messages
// and pre-tokenized rows), the same skipped lines, and the same first error.
TEST(Dataset, ParallelLoadsEqualOneThread) {
  test::TempDir dir;
  const std::string model = test::fixture("chat/qwen3");
  auto tok = hf::Tokenizer::load(model);
  auto chat = hf::ChatTemplate::load(model);
  ASSERT_TRUE(chat.has_value());
  const std::vector<std::string> words = {"the", "cat", "sat", "on", "a", "mat", "é", "日本", "expert", "router"};
  for (const char* name : {"a.jsonl", "b.jsonl"}) {
    std::ofstream f(dir / name);
    for (int i = 0; i < 5000; ++i) {
      std::string text;
      for (int w = 0; w < 3 + i % 17; ++w) text += (w ? " " : "") + words[(i * 7 + w * 3) % words.size()];
      if (i % 997 == 13) f << "not json\n";
      if (i % 4 == 0) f << R"({"text": ")" << text << "\"}\n";
      else if (i % 4 == 1) f << R"({"prompt": ")" << text << R"(", "completion": " )" << i << "\"}\n";
      else if (i % 4 == 2) f << R"({"messages": [{"role": "user", "content": ")" << text << R"("}, {"role": "assistant", "content": "ok"}]})" << "\n";
      else f << R"({"input_ids": [)" << i << ", " << i + 1 << "]}\n";
    }
  }
  data::DatasetOptions o;
  o.path = dir.path.string();
  o.tokenizer = &tok;
  o.chat_template = &*chat;
  o.eos_id = 1;
  o.skip_bad_lines = true;
  o.workers = 1;
  const auto one = data::load_dataset(o);
  o.workers = 4;
  const auto four = data::load_dataset(o);
  EXPECT_EQ(one.skipped_lines, 12);  // the "not json" lines, six a file
  EXPECT_EQ(four.skipped_lines, one.skipped_lines);
  ASSERT_EQ(four.rows.size(), one.rows.size());
  for (size_t i = 0; i < one.rows.size(); ++i) {
    ASSERT_EQ(four.rows[i].input_ids, one.rows[i].input_ids) << i;
    ASSERT_EQ(four.rows[i].labels, one.rows[i].labels) << i;
    ASSERT_EQ(four.rows[i].line, one.rows[i].line) << i;
    ASSERT_EQ(four.rows[i].file, one.rows[i].file) << i;
  }
  EXPECT_EQ(one.rows.back().file, 1);
  o.skip_bad_lines = false;
  for (int workers : {1, 4}) {
    o.workers = workers;
    EXPECT_NE(test::error_of([&] { data::load_dataset(o); }).find("a.jsonl:14: invalid JSON"), std::string::npos) << workers;
  }
}

TEST(DatasetBadInput, MalformedLinesFailOrAreSkippedAndCounted) {
  test::TempDir dir;
  std::ofstream(dir / "d.jsonl") << R"({"input_ids": [1, 2]})" << "\n"
                                 << R"({"input_ids": [1, )" << "\n"
                                 << R"({"title": "no known field"})" << "\n"
                                 << R"({"messages": [{"role": "user", "content": "hi"}]})" << "\n"
                                 << R"({"input_ids": [3, 4]})" << "\n";
  data::DatasetOptions o;
  o.path = dir / "d.jsonl";
  try {
    data::load_dataset(o);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("d.jsonl:2: invalid JSON"), std::string::npos) << e.what();
  }
  o.skip_bad_lines = true;
  auto d = data::load_dataset(o);
  EXPECT_EQ(d.rows.size(), 2u);
  EXPECT_EQ(d.skipped_lines, 3);  // bad JSON, no known field, and a messages row with no tokenizer
  std::ofstream(dir / "e.jsonl") << R"({"title": "x"})" << "\n";
  o.path = dir / "e.jsonl";
  o.skip_bad_lines = false;
  try {
    data::load_dataset(o);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("e.jsonl:1: row has none of the known fields"), std::string::npos) << e.what();
  }
  std::ofstream(dir / "t.jsonl") << R"({"text": "needs a tokenizer"})" << "\n";
  o.path = dir / "t.jsonl";
  try {
    data::load_dataset(o);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("t.jsonl:1: text rows need a tokenizer"), std::string::npos) << e.what();
  }
}

// messages rows: the chat template renders them (as apply_chat_template does) and only assistant
// tokens carry labels; the row's tools and chat_template_kwargs reach the template.
TEST(Dataset, MessagesRowsTrainAssistantTokensOnly) {
  const std::string dir = test::fixture("chat/qwen3");
  auto tok = hf::Tokenizer::load(dir);
  auto chat = hf::ChatTemplate::load(dir);
  ASSERT_TRUE(chat.has_value());
  test::TempDir tmp;
  std::ofstream(tmp / "chat.jsonl")
      << R"({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]})"
      << "\n"
      << R"({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "chat_template_kwargs": {"enable_thinking": false}})"
      << "\n";
  data::DatasetOptions o;
  o.path = tmp / "chat.jsonl";
  o.tokenizer = &tok;
  o.chat_template = &*chat;
  auto d = data::load_dataset(o);
  ASSERT_EQ(d.rows.size(), 2u);
  for (const auto& row : d.rows) {
    std::vector<int64_t> trained;
    for (size_t k = 0; k < row.input_ids.size(); ++k)
      if ((*row.labels)[k] != -100) {
        EXPECT_EQ((*row.labels)[k], row.input_ids[k]);
        trained.push_back(row.input_ids[k]);
      }
    const std::string text = tok.decode(trained, false);
    EXPECT_EQ(text.find("user"), std::string::npos) << text;
    EXPECT_NE(text.find("<|im_end|>"), std::string::npos) << text;  // the model learns to stop
  }
  EXPECT_NE(tok.decode(test::ids64(d.rows[0].input_ids), false).find("<|im_start|>system\nBe brief."), std::string::npos);
}

// Tools as datasets often hold them, a JSON string per row, render as the same list would.
TEST(Dataset, ToolsGivenAsAJsonStringRenderAsTheList) {
  const std::string dir = test::fixture("chat/qwen3");
  auto tok = hf::Tokenizer::load(dir);
  auto chat = hf::ChatTemplate::load(dir);
  const std::string tools = R"([{"type": "function", "function": {"name": "add", "description": "Adds", "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}}])";
  const std::string messages = R"("messages": [{"role": "user", "content": "1+2?"}, {"role": "assistant", "content": "3"}])";
  const nlohmann::json as_string = tools;
  test::TempDir tmp;
  std::ofstream(tmp / "t.jsonl") << "{" << messages << ", \"tools\": " << tools << "}\n"
                                 << "{" << messages << ", \"tools\": " << as_string.dump() << "}\n"
                                 << "{" << messages << "}\n";
  data::DatasetOptions o;
  o.path = tmp / "t.jsonl";
  o.tokenizer = &tok;
  o.chat_template = &*chat;
  const auto d = data::load_dataset(o);
  ASSERT_EQ(d.rows.size(), 3u);
  EXPECT_EQ(d.rows[1].input_ids, d.rows[0].input_ids);
  EXPECT_EQ(d.rows[1].labels, d.rows[0].labels);
  EXPECT_NE(d.rows[2].input_ids, d.rows[0].input_ids);  // the tools reached the template
  EXPECT_NE(tok.decode(test::ids64(d.rows[0].input_ids), false).find("\"name\": \"add\""), std::string::npos);
}

// ShareGPT and Alpaca rows train exactly as the messages rows they stand for.
TEST(Dataset, ShareGptAndAlpacaRowsTrainAsTheirConversations) {
  const std::string dir = test::fixture("chat/qwen3");
  auto tok = hf::Tokenizer::load(dir);
  auto chat = hf::ChatTemplate::load(dir);
  test::TempDir tmp;
  const auto rows = [&](const std::string& jsonl) {
    std::ofstream(tmp / "r.jsonl") << jsonl;
    data::DatasetOptions o;
    o.path = tmp / "r.jsonl";
    o.tokenizer = &tok;
    o.chat_template = &*chat;
    return data::load_dataset(o).rows;
  };
  const auto same = [&](const std::string& row, const std::string& messages_row) {
    const auto a = rows(row + "\n"), b = rows(messages_row + "\n");
    ASSERT_EQ(a.size(), 1u);
    EXPECT_EQ(a[0].input_ids, b[0].input_ids) << row;
    EXPECT_EQ(a[0].labels, b[0].labels) << row;
  };
  same(R"({"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}, {"from": "human", "value": "and 3+3?"}, {"from": "gpt", "value": "6"}], "system": "Be brief."})",
       R"({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]})");
  same(R"({"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "chat_template_kwargs": {"enable_thinking": false}})",
       R"({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "chat_template_kwargs": {"enable_thinking": false}})");
  same(R"({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "history": [["1+1?", "2"]]})",
       R"({"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}, {"role": "user", "content": "Add the numbers.\n2 and 3"}, {"role": "assistant", "content": "5"}]})");
  same(R"({"instruction": "Say hi.", "input": "", "output": "hi", "system": "You are kind."})",
       R"({"messages": [{"role": "system", "content": "You are kind."}, {"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]})");
  // An Alpaca row with its formatted text trains on the text, as text rows do.
  same(R"({"instruction": "Say hi.", "output": "hi", "text": "### Say hi. ### hi"})", R"({"text": "### Say hi. ### hi"})");
  same(R"({"conversations": [{"from": "human", "value": "a"}], "text": "rendered"})", R"({"text": "rendered"})");
}

TEST(DatasetBadInput, MessagesRows) {
  const std::string dir = test::fixture("chat/qwen3");
  auto tok = hf::Tokenizer::load(dir);
  auto chat = hf::ChatTemplate::load(dir);
  test::TempDir tmp;
  data::DatasetOptions o;
  o.tokenizer = &tok;
  o.chat_template_origin = "somewhere";
  auto expect_error = [&](const std::string& row, const std::string& what, bool with_template = true) {
    std::ofstream(tmp / "m.jsonl") << row << "\n";
    o.path = tmp / "m.jsonl";
    o.chat_template = with_template ? &*chat : nullptr;
    try {
      data::load_dataset(o);
      ADD_FAILURE() << "no error for " << row;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("m.jsonl:1: " + what), std::string::npos) << e.what();
    }
  };
  expect_error(R"({"messages": []})", "field 'messages' must be a non-empty list");
  expect_error(R"({"conversations": [{"from": "robot", "value": "x"}]})", "conversations[0]: 'from' is 'robot', expected one of");
  expect_error(R"({"conversations": [{"value": "x"}]})", "conversations[0] must be an object with a string 'from' (or 'role')");
  expect_error(R"({"conversations": "x"})", "field 'conversations' must be a non-empty list");
  expect_error(R"({"instruction": "x", "output": "y", "history": [["only one"]]})", "history[0] must be a [question, answer] pair");
  expect_error(R"({"instruction": 5, "output": "y"})", "field 'instruction' must be a string");
  const std::string qa = R"("messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])";
  expect_error("{" + qa + R"(, "tools": "not json"})", "field 'tools' is a string that is not JSON");
  expect_error("{" + qa + R"(, "tools": "{\"a\": 1}"})", "field 'tools' must be a list (or a JSON string of one)");
  expect_error(R"({"messages": [{"content": "no role"}]})", "messages[0] must be an object with a string 'role'");
  expect_error(R"({"messages": [{"role": "user", "content": 5}]})", "messages[0].content must be a string");
  expect_error(R"({"messages": [{"role": "user", "content": "only a question"}]})", "the conversation has no assistant tokens to train on");
  expect_error(R"({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]})",
               "messages rows need a chat template, and somewhere has none", false);
}

// Held-out validation rows: a seeded share of the rows (at least one), the rest for training, both
// in file order, the same for the same seed.
TEST(Dataset, HoldOutPartitionsTheRowsBySeed) {
  std::vector<data::TokenRow> rows(100);
  for (int64_t i = 0; i < 100; ++i) rows[i].line = i + 1;
  const auto a = data::hold_out(rows, 0.1, 7, "t"), b = data::hold_out(rows, 0.1, 7, "t"), c = data::hold_out(rows, 0.1, 8, "t");
  ASSERT_EQ(a.eval.size(), 10u);
  ASSERT_EQ(a.train.size(), 90u);
  std::vector<int64_t> seen;
  for (const auto* part : {&a.eval, &a.train}) {
    for (size_t i = 0; i < part->size(); ++i) {
      seen.push_back((*part)[i].line);
      if (i > 0) EXPECT_LT((*part)[i - 1].line, (*part)[i].line);  // file order kept
    }
  }
  std::sort(seen.begin(), seen.end());
  for (int64_t i = 0; i < 100; ++i) EXPECT_EQ(seen[i], i + 1);
  std::vector<int64_t> la, lb, lc;
  for (const auto& r : a.eval) la.push_back(r.line);
  for (const auto& r : b.eval) lb.push_back(r.line);
  for (const auto& r : c.eval) lc.push_back(r.line);
  EXPECT_EQ(la, lb);
  EXPECT_NE(la, lc);
  EXPECT_EQ(data::hold_out(rows, 0.001, 7, "t").eval.size(), 1u);  // at least one
  std::vector<data::TokenRow> two(2);
  EXPECT_NE(test::error_of([&] { data::hold_out(two, 0.9, 7, "r.yaml: key 'eval_split'"); })
                .find("r.yaml: key 'eval_split': eval_split 0.9 of 2 rows leaves no row to train on"),
            std::string::npos);
}

TEST(DataParallel, RankSlicesPartitionEachGlobalBatch) {
  for (int64_t world : {1, 2, 4, 8}) {
    std::vector<int> seen(16, 0);
    for (int64_t r = 0; r < world; ++r) {
      const auto s = data::rank_slice(16, r, world);
      EXPECT_EQ(s.count, 16 / world);
      for (int64_t k = s.offset; k < s.offset + s.count; ++k) ++seen[static_cast<size_t>(k)];
    }
    for (int n : seen) EXPECT_EQ(n, 1) << "world " << world;
  }
  EXPECT_THROW(data::rank_slice(6, 0, 4), Error);  // 6 rows cannot split over 4 ranks
  EXPECT_THROW(data::rank_slice(8, 4, 4), Error);
}

namespace {

// The demo model's tokenizer and template over a file of every row form.
struct CacheCase {
  test::TempDir dir;
  std::string model = dir / "model", data = dir / "rows.jsonl", cache = dir / "cache";
  CacheCase() {
    std::filesystem::copy(std::string(MOEFORGE_SOURCE_DIR) + "/examples/demo_model", model,
                          std::filesystem::copy_options::recursive);
    std::ofstream(data) << R"({"text": "Count from 1 to 3."})" << "\n"
                        << R"({"prompt": "Count from 4 to 6.", "completion": " 4 5 6"})" << "\n"
                        << R"({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "7 8 9"}]})"
                        << "\n"
                        << R"({"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, 8]})" << "\n";
  }
  data::ModelText text() const { return data::load_model_text(model, "", "", true, "test"); }
  std::shared_ptr<const data::TokenStore> load() const { return data::load_model_tokens(data, text(), false, false, 1, cache); }
  data::Dataset plain() const { return data::load_model_dataset(data, text(), false, false, 1); }
};

std::vector<data::TokenId> ids_of(std::span<const data::TokenId> s) { return {s.begin(), s.end()}; }
std::vector<int64_t> values(const Tensor& t) { return {t.i64(), t.i64() + t.numel()}; }

// A store holds exactly the rows of a load (labels of their own or none, lines, files, skipped).
void expect_same_rows(const data::TokenStore& got, const data::Dataset& want) {
  ASSERT_EQ(got.size(), want.rows.size());
  EXPECT_EQ(got.files(), want.files);
  EXPECT_EQ(got.skipped_lines(), want.skipped_lines);
  for (size_t i = 0; i < got.size(); ++i) {
    const data::TokenRow& w = want.rows[i];
    EXPECT_EQ(ids_of(got.input_ids(i)), w.input_ids) << "row " << i;
    EXPECT_EQ(got.row(i).has_labels != 0, w.labels.has_value()) << "row " << i;
    EXPECT_EQ(ids_of(got.labels(i)), w.labels.value_or(w.input_ids)) << "row " << i;
    EXPECT_EQ(got.row(i).line, w.line) << "row " << i;
    EXPECT_EQ(got.row(i).file, w.file) << "row " << i;
    EXPECT_EQ(got.where(i), want.where(w)) << "row " << i;
  }
}

std::vector<std::string> cache_files(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : std::filesystem::directory_iterator(dir))
    if (e.path().extension() == ".mftok") out.push_back(e.path().string());
  return out;
}

data::Dataset three_rows() {
  data::Dataset d;
  d.files = {"a.jsonl", "b.parquet"};
  d.skipped_lines = 3;
  d.rows.resize(3);
  d.rows[0] = {4, 0, {1, 2, 3}, std::nullopt};
  d.rows[1] = {9, 1, {7}, std::vector<data::TokenId>{-100}};
  d.rows[2] = {12, 1, {8, 9, 10, 11, 12}, std::vector<data::TokenId>{-100, -100, 10, 11, 12}};
  return d;
}

std::shared_ptr<const data::TokenStore> store_of(data::Dataset d) {
  return data::TokenStore::from_rows(std::move(d.rows), d.files, d.skipped_lines);
}

}  // namespace

// A cache file maps back to exactly the rows written (without copying them), and only for the key
// it was written under.
TEST(TokenCache, WritesAndMapsBackUnderItsKey) {
  test::TempDir dir;
  const data::Dataset d = three_rows();
  const auto store = store_of(three_rows());
  expect_same_rows(*store, d);
  EXPECT_FALSE(store->mapped());
  const std::string path = dir / "x.mftok";
  data::write_token_cache(path, "key one", *store);
  const auto back = data::map_token_cache(path, "key one");
  ASSERT_TRUE(back);
  EXPECT_TRUE(back->mapped());
  expect_same_rows(*back, d);
  EXPECT_FALSE(data::map_token_cache(path, "key two")) << "another key is a miss";
  EXPECT_FALSE(data::map_token_cache(dir / "absent.mftok", "key one"));
  EXPECT_NE(data::token_cache_path(dir.path.string(), "key one"), data::token_cache_path(dir.path.string(), "key two"));
}

// A cut, foreign or tampered file is an error naming it (the cached load then tokenizes over it).
TEST(TokenCache, DamagedFilesAreNamed) {
  test::TempDir dir;
  const std::string path = dir / "x.mftok";
  data::write_token_cache(path, "k", *store_of(three_rows()));
  const std::string whole = test::read_text(path);
  for (size_t cut : {whole.size() - 1, whole.size() - 9, whole.size() / 2, size_t{20}, size_t{0}}) {
    std::ofstream(path, std::ios::binary) << whole.substr(0, cut);
    const std::string e = test::error_of([&] { data::map_token_cache(path, "k"); });
    EXPECT_NE(e.find(path + ": damaged tokenized-data cache"), std::string::npos) << "cut at " << cut << ": " << e;
  }
  std::ofstream(path, std::ios::binary) << "not a cache at all, just text";
  EXPECT_NE(test::error_of([&] { data::map_token_cache(path, "k"); }).find("not a moeforge tokenized-data cache"),
            std::string::npos);
  // A row whose tokens would run past the file's: refused before anything reads them.
  std::string tampered = whole;
  // The file ends: row table, 15 tokens (3 + 1 x 2 + 5 x 2: ids and labels), padding to 8, end marker.
  const size_t token_bytes = 15 * sizeof(data::TokenId), pad = (8 - token_bytes % 8) % 8;
  const size_t table = whole.size() - 8 - pad - token_bytes - 3 * sizeof(data::TokenStore::Row);
  const uint64_t huge = 1u << 20;
  std::memcpy(&tampered[table + 2 * 32 + 16], &huge, sizeof huge);  // row 2's offset
  std::ofstream(path, std::ios::binary) << tampered;
  EXPECT_NE(test::error_of([&] { data::map_token_cache(path, "k"); }).find("row 2's record"), std::string::npos);
}

// The first load tokenizes, writes and maps; the next maps the file (shown by planting other rows
// under the same key); a data file or tokenizer file changed, or the cache damaged, is tokenized again.
TEST(TokenCache, ALoadMapsWhatTheLastWroteUntilAnInputChanges) {
  CacheCase c;
  const data::Dataset plain = c.plain();
  const auto first = c.load();
  expect_same_rows(*first, plain);
  EXPECT_TRUE(first->mapped()) << "the process that writes the file maps it too";
  ASSERT_EQ(cache_files(c.cache).size(), 1u);
  const std::string file = cache_files(c.cache)[0];
  const std::string key = data::token_cache_key(data::dataset_files(c.data), c.text(), false);
  EXPECT_EQ(file, data::token_cache_path(c.cache, key));

  data::Dataset planted = c.plain();
  planted.rows[0].input_ids = {42, 43};
  data::write_token_cache(file, key, *store_of(planted));
  EXPECT_EQ(ids_of(c.load()->input_ids(0)), std::vector<data::TokenId>({42, 43}))
      << "a hit maps the file, it does not tokenize";
  EXPECT_EQ(ids_of(first->input_ids(0)), plain.rows[0].input_ids) << "a store mapped before keeps its file";

  // A damaged file is loaded over and written again.
  std::ofstream(file, std::ios::binary) << "garbage";
  expect_same_rows(*c.load(), plain);
  ASSERT_TRUE(data::map_token_cache(file, key));

  // Every input is in the key: the data file, the tokenizer's files, skip_bad_lines.
  data::write_token_cache(file, key, *store_of(planted));
  std::ofstream(c.data, std::ios::app) << R"({"input_ids": [9, 9]})" << "\n";
  const auto grown = c.load();
  ASSERT_EQ(grown->size(), plain.rows.size() + 1);
  EXPECT_EQ(ids_of(grown->input_ids(0)), plain.rows[0].input_ids);
  const std::string before = data::token_cache_key(data::dataset_files(c.data), c.text(), false);
  EXPECT_NE(before, data::token_cache_key(data::dataset_files(c.data), c.text(), true));
  std::ofstream(c.model + "/tokenizer_config.json", std::ios::app) << "\n";
  EXPECT_NE(before, data::token_cache_key(data::dataset_files(c.data), c.text(), false));
  // No cache folder: tokenized into memory.
  const auto uncached = data::load_model_tokens(c.data, c.text(), false, false, 1, "");
  EXPECT_FALSE(uncached->mapped());
  EXPECT_EQ(uncached->size(), grown->size());
}

// Where no lock can be taken (a file system without them; here the lock's name is a folder) the
// cache is still written and mapped: a file is whole whenever it is there.
TEST(TokenCache, WithoutALockTheFileIsStillWrittenAndMapped) {
  CacheCase c;
  const std::string key = data::token_cache_key(data::dataset_files(c.data), c.text(), false);
  const std::string file = data::token_cache_path(c.cache, key);
  std::filesystem::create_directories(file.substr(0, file.size() - 6) + ".lock");
  const auto first = c.load();
  EXPECT_TRUE(first->mapped());
  expect_same_rows(*first, c.plain());
  ASSERT_TRUE(data::map_token_cache(file, key));
}

// Loads of the same data at once (the ranks of a node) take turns: every one gets the rows, and
// one cache file is left.
TEST(TokenCache, LoadsAtOnceAllGetTheRows) {
  CacheCase c;
  const data::Dataset plain = c.plain();
  std::vector<std::shared_ptr<const data::TokenStore>> got(4);
  std::vector<std::thread> threads;
  for (auto& g : got) threads.emplace_back([&c, &g] { g = c.load(); });
  for (auto& t : threads) t.join();
  for (const auto& g : got) expect_same_rows(*g, plain);
  EXPECT_EQ(cache_files(c.cache).size(), 1u);
}

// Batches over a store's rows are the batches over the same rows loaded (truncation, drops,
// packing, the shuffle), and a subset of the rows batches as those rows alone.
TEST(TokenBatches, OverAStoreTheSameAsOverRows) {
  std::vector<data::TokenRow> rows;
  for (int d = 0; d < 9; ++d) {
    data::TokenRow r;
    r.line = d + 1;
    for (int t = 0; t < 1 + 3 * d % 11; ++t) r.input_ids.push_back(100 * d + t);
    if (d % 3 == 0) {
      r.labels = r.input_ids;
      (*r.labels)[0] = -100;
    }
    rows.push_back(r);
  }
  for (bool packing : {false, true}) {
    const data::TokenBatches a(rows, 12, 5, packing);
    const auto store = data::TokenStore::from_rows(rows);
    const data::TokenBatches b(store, store->every_row(), 12, 5, packing);
    ASSERT_EQ(a.rows(), b.rows());
    EXPECT_EQ(a.stats().dropped, 1);  // the one-token row
    for (int64_t c = 0; c < 3 * a.rows(); c += 2) {
      const auto x = a.micro_batch(c, 2), y = b.micro_batch(c, 2);
      EXPECT_EQ(values(x.input_ids), values(y.input_ids));
      EXPECT_EQ(values(x.labels), values(y.labels));
      EXPECT_EQ(x.loss_tokens, y.loss_tokens);
    }
    // Rows 2, 5 and 7 only: what those rows alone batch to.
    const std::vector<data::TokenRow> some = {rows[2], rows[5], rows[7]};
    const data::TokenBatches alone(some, 12, 5, packing), subset(store, {2, 5, 7}, 12, 5, packing);
    ASSERT_EQ(alone.rows(), subset.rows());
    for (int64_t c = 0; c < 2 * alone.rows(); ++c)
      EXPECT_EQ(values(alone.micro_batch(c, 1).input_ids), values(subset.micro_batch(c, 1).input_ids));
  }
}
