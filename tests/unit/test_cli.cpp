// The moeforge binary end to end: inspect and eval work on the fixtures, and each bad input gives
// exactly one error line naming the file and field, exit status 1, and no crash.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "data/model_text.h"
#include "data/token_cache.h"
#include "data/token_batches.h"
#include "hf/safetensors.h"
#include "models/pretrained.h"
#include "test_util.h"

using namespace moeforge;
namespace fs = std::filesystem;

namespace {

struct CmdResult {
  int status = -1;
  std::string out, err;
};

CmdResult run(const std::string& args) {
  test::TempDir tmp;
  const std::string cmd = std::string(MOEFORGE_BIN) + " " + args + " >" + (tmp / "out") + " 2>" + (tmp / "err");
  CmdResult r;
  const int s = std::system(cmd.c_str());
  r.status = WIFEXITED(s) ? WEXITSTATUS(s) : 128 + WTERMSIG(s);
  std::stringstream o, e;
  o << std::ifstream(tmp / "out").rdbuf();
  e << std::ifstream(tmp / "err").rdbuf();
  r.out = o.str();
  r.err = e.str();
  return r;
}

int lines(const std::string& s) { return static_cast<int>(std::count(s.begin(), s.end(), '\n')); }

void expect_one_line_error(const CmdResult& r, const std::vector<std::string>& needles) {
  EXPECT_EQ(r.status, 1) << r.err;
  EXPECT_EQ(lines(r.err), 1) << r.err;
  for (const auto& n : needles) EXPECT_NE(r.err.find(n), std::string::npos) << "missing '" << n << "' in: " << r.err;
}

void copy_dir(const std::string& src, const std::string& dst) {
  fs::create_directories(dst);
  for (const auto& de : fs::directory_iterator(src))
    if (de.is_regular_file()) fs::copy_file(de.path(), fs::path(dst) / de.path().filename());
}

}  // namespace

TEST(Cli, InspectReportsParametersAndTensors) {
  CmdResult r = run("inspect " + test::fixture("qwen3_moe_a") + " --json");
  ASSERT_EQ(r.status, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  // embed 128*32 + lm_head 128*32 + 3 layers of attention (q 64x32, k/v 32x32, o 32x64, norms)
  // + 2 MoE layers (router 8x32 + 8 experts x 3 x 16x32) + 1 dense MLP (3 x 48x32) + norms.
  const int64_t attn = 64 * 32 + 2 * 32 * 32 + 32 * 64 + 16 + 16;
  const int64_t moe = 8 * 32 + 8 * 3 * 16 * 32, dense = 3 * 48 * 32;
  const int64_t total = 2 * 128 * 32 + 3 * (attn + 2 * 32) + 2 * moe + dense + 32;
  EXPECT_EQ(j["parameters"]["total"], total);
  EXPECT_EQ(j["parameters"]["active"], total - 2 * 6 * 3 * 16 * 32);
  EXPECT_EQ(j["tensors"]["found"], j["tensors"]["expected"]);
  EXPECT_EQ(j["tensors"]["missing"], 0);
  EXPECT_EQ(j["moe_layers"], 2);
  EXPECT_EQ(j["training_memory_excluding_activations"]["bf16"]["bytes"], 8.0 * total);
  CmdResult text = run("inspect " + test::fixture("qwen3_moe_b"));
  ASSERT_EQ(text.status, 0);
  EXPECT_NE(text.out.find("sliding window 5"), std::string::npos) << text.out;
}

// Per-GPU memory under expert parallelism: experts split over --ep-size, dense weights and
// gradients whole, dense moments split over every GPU (what the multi-GPU trainer holds).
TEST(Cli, InspectEstimatesMemoryPerGpu) {
  CmdResult r = run("inspect " + test::fixture("qwen3_moe_a") + " --json --gpus 4 --ep-size 2");
  ASSERT_EQ(r.status, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  const double experts = 2 * 8 * 3 * 16 * 32;  // 2 MoE layers of 8 experts (gate, up, down 16x32)
  const double dense = j["parameters"]["total"].get<double>() - experts;
  const auto& pg = j["training_memory_per_gpu_excluding_activations"];
  EXPECT_EQ(pg["expert_parameters"].get<double>(), experts);
  EXPECT_EQ(pg["bf16"]["weights"].get<double>(), (experts / 2 + dense) * 2);
  EXPECT_EQ(pg["bf16"]["moments"].get<double>(), (experts / 2 + dense / 4) * 4);
  EXPECT_EQ(pg["bf16-mixed"]["masters"].get<double>(), (experts / 2 + dense) * 4);
  EXPECT_EQ(pg["fp32"]["bytes"].get<double>(), (experts / 2 + dense) * 8 + (experts / 2 + dense / 4) * 8);
  expect_one_line_error(run("inspect " + test::fixture("qwen3_moe_a") + " --gpus 4 --ep-size 3"),
                        {"--ep-size 3 does not divide --gpus 4"});
  expect_one_line_error(run("inspect " + test::fixture("qwen3_moe_a") + " --gpus 16 --ep-size 16"),
                        {"--ep-size 16 does not divide the model's 8 experts"});
}

// inspect on a PEFT adapter folder: its config and tensors, how the experts are adapted, and whether
// a base model takes it (shapes checked, no base weights read).
TEST(Cli, InspectDescribesAnAdapterAndChecksItAgainstItsBase) {
  const std::string fused = test::fixture("gpt_oss_a") + "/lora_experts/adapter_after";
  CmdResult r = run("inspect " + fused + " --base " + test::fixture("gpt_oss_a") + " --json");
  ASSERT_EQ(r.status, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["r"], 4);
  EXPECT_EQ(j["scaling"], 2.0);
  EXPECT_EQ(j["target_parameters"], nlohmann::json({"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}));
  EXPECT_EQ(j["tensors"], 12);  // q_proj, gate_up (base_layer) and down: A and B, in 2 layers
  EXPECT_NE(j["routed_experts"].get<std::string>().find("fused"), std::string::npos);
  EXPECT_EQ(j["base"]["takes_it"], true);
  CmdResult per = run("inspect " + test::fixture("qwen3_moe_a") + "/lora_experts/adapter_after --base " +
                      test::fixture("qwen3_moe_a"));
  ASSERT_EQ(per.status, 0) << per.err;
  EXPECT_NE(per.out.find("routed experts: per expert"), std::string::npos) << per.out;
  EXPECT_NE(per.out.find("takes it"), std::string::npos) << per.out;
  // An adapter for another model: one error naming the adapter's config and what does not fit.
  expect_one_line_error(run("inspect " + test::fixture("qwen3_moe_a") + "/lora_experts/adapter_after --base " +
                            test::fixture("gpt_oss_a")),
                        {"adapter_config.json", "'gate_proj' matches no projection of this gpt_oss model"});
  expect_one_line_error(run("inspect " + test::fixture("gpt_oss_a") + " --base " + test::fixture("gpt_oss_a")),
                        {"is not a LoRA adapter folder"});
}

TEST(Cli, InspectWorksOnABareConfig) {
  // The published parameter counts (total, activated) of the real configs in ../shared/configs.
  // GPT-OSS's card counts active parameters without the input embedding table. DeepSeek-V3 is
  // published as 671B total (685B with its MTP layer), 37B activated (two digits: +-1B).
  struct Published {
    const char* config;
    double total_b, active_b;
    const char* active_key;
    double active_tolerance = 0.1;
  };
  for (const Published& p :
       {Published{"qwen3-30b-a3b", 30.5, 3.3, "active"}, Published{"mixtral-8x7b", 46.7, 12.9, "active"},
        Published{"gpt-oss-20b", 20.9, 3.6, "active_without_embedding"},
        Published{"deepseek-v3", 671.0, 37.0, "active", 1.0}}) {
    CmdResult r = run("inspect " + std::string(MOEFORGE_FIXTURES) + "/../../../shared/configs/" + p.config + ".json --json");
    if (r.status != 0 && r.err.find("no such file") != std::string::npos) GTEST_SKIP() << "shared/configs not beside the repo";
    ASSERT_EQ(r.status, 0) << r.err;
    auto j = nlohmann::json::parse(r.out);
    EXPECT_NEAR(j["parameters"]["total"].get<double>() / 1e9, p.total_b, 0.1) << p.config;
    EXPECT_NEAR(j["parameters"][p.active_key].get<double>() / 1e9, p.active_b, p.active_tolerance) << p.config;
    if (std::string(p.config) == "deepseek-v3")
      EXPECT_NEAR(j["parameters"]["total_with_mtp"].get<double>() / 1e9, 685.0, 1.0);
  }
}

TEST(Cli, EvalMatchesTheReferenceLoss) {
  test::TempDir tmp;
  auto ref = hf::SafetensorsFile::open(test::fixture("qwen3_moe_b") + "/reference.safetensors");
  Tensor ids = ref.get("input_ids");
  std::ofstream f(tmp / "tok.jsonl");
  for (int64_t b = 0; b < 2; ++b) {
    nlohmann::json row;
    row["input_ids"] = std::vector<int64_t>(ids.data<int64_t>() + b * 12, ids.data<int64_t>() + (b + 1) * 12);
    f << row.dump() << "\n\n";
  }
  f.close();
  CmdResult r = run("eval --model " + test::fixture("qwen3_moe_b") + " --tokens " + (tmp / "tok.jsonl") +
              " --logits-out " + (tmp / "logits.safetensors"));
  ASSERT_EQ(r.status, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  ASSERT_EQ(j["rows"].size(), 2u);
  EXPECT_EQ(j["rows"][1]["line"], 3);  // blank lines skipped, numbering kept
  EXPECT_EQ(j["rows"][0]["tokens"], 11);
  // Row logits equal the reference batch's rows.
  auto logits = hf::SafetensorsFile::open(tmp / "logits.safetensors");
  Tensor want = ref.get("logits");
  Tensor row1 = logits.get("logits.1");
  float m = 0;
  for (int64_t i = 0; i < row1.numel(); ++i)
    m = std::max(m, std::abs(row1.f32()[i] - want.data<float>()[row1.numel() + i]));
  EXPECT_LT(m, 1e-4f);
}

// LoRA adapters from the command line: eval runs one beside the base (unmerged) and merge folds it
// in; both give the logits Transformers + PEFT computed with the fixture's starting adapter.
TEST(Cli, EvalWithAnAdapterAndMergeMatchPeft) {
  test::TempDir tmp;
  const std::string base = test::fixture("llama_a"), adapter = base + "/lora/adapter_init";
  auto ref = hf::SafetensorsFile::open(base + "/lora/reference.safetensors");
  Tensor ids = ref.get("input_ids");
  const int64_t seq = ids.size(1);
  std::ofstream f(tmp / "tok.jsonl");
  for (int64_t b = 0; b < ids.size(0); ++b) {
    nlohmann::json row;
    row["input_ids"] = std::vector<int64_t>(ids.data<int64_t>() + b * seq, ids.data<int64_t>() + (b + 1) * seq);
    f << row.dump() << "\n";
  }
  f.close();
  const Tensor want = ref.get("logits");
  const auto row1_error = [&](const std::string& logits_file) {
    Tensor row1 = hf::SafetensorsFile::open(logits_file).get("logits.1");
    float m = 0;
    for (int64_t i = 0; i < row1.numel(); ++i) m = std::max(m, std::abs(row1.f32()[i] - want.data<float>()[row1.numel() + i]));
    return m;
  };
  CmdResult r = run("eval --model " + base + " --tokens " + (tmp / "tok.jsonl") + " --adapter " + adapter +
                    " --logits-out " + (tmp / "unmerged.safetensors"));
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_LT(row1_error(tmp / "unmerged.safetensors"), 1e-4f);
  r = run("merge --model " + base + " --adapter " + adapter + " --out " + (tmp / "merged"));
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("14 projections merged"), std::string::npos) << r.out;
  EXPECT_FALSE(fs::exists(tmp / "merged/adapter_model.safetensors"));
  r = run("eval --model " + (tmp / "merged") + " --tokens " + (tmp / "tok.jsonl") + " --logits-out " +
          (tmp / "merged.safetensors"));
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_LT(row1_error(tmp / "merged.safetensors"), 1e-4f);
  // Without the adapter the base's logits are elsewhere (the test can fail).
  r = run("eval --model " + base + " --tokens " + (tmp / "tok.jsonl") + " --logits-out " + (tmp / "base.safetensors"));
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_GT(row1_error(tmp / "base.safetensors"), 1e-3f);
  // Bad input: an existing output, a folder that is not an adapter.
  expect_one_line_error(run("merge --model " + base + " --adapter " + adapter + " --out " + (tmp / "merged")),
                        {"exists", "overwrite"});
  expect_one_line_error(run("merge --model " + base + " --adapter " + base + " --out " + (tmp / "m2")),
                        {"adapter_config.json"});
  EXPECT_FALSE(fs::exists(tmp / "m2"));
}

// JSON nested far deeper than any real file (the JSON library recurses: this used to end in a
// segmentation fault): one line naming the file, for a dataset line, a config.json, a tokenizer.json,
// a safetensors header and a recipe's training run.
TEST(CliBadInput, DeeplyNestedJsonIsOneLineNotACrash) {
  test::TempDir tmp;
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  std::ofstream(tmp / "deep.jsonl") << "{\"input_ids\": " << deep << "}\n";
  expect_one_line_error(run("eval --model " + test::fixture("llama_a") + " --tokens " + (tmp / "deep.jsonl")),
                        {"deep.jsonl:1", "nested deeper than 512"});
  fs::create_directories(tmp / "model");
  std::ofstream(tmp / "model/config.json") << "{\"model_type\": \"llama\", \"x\": " << deep << "}";
  expect_one_line_error(run("inspect " + (tmp / "model")), {"config.json", "nested deeper than 512"});
  // A model folder whose tokenizer.json, or whose weights' header, nests that deep.
  copy_dir(test::fixture("llama_a"), tmp / "tok");
  std::ofstream(tmp / "tok/tokenizer.json") << "{\"model\": " << deep << "}";
  std::ofstream(tmp / "r.yaml") << "model: " << (tmp / "tok") << "\ndata: " << (tmp / "deep.jsonl")
                                << "\noutput_dir: " << (tmp / "out") << "\nseq_len: 8\nsteps: 1\n";
  expect_one_line_error(run("train " + (tmp / "r.yaml")), {"tokenizer.json", "nested deeper than 512"});
  copy_dir(test::fixture("llama_a"), tmp / "st");
  for (const auto& de : fs::directory_iterator(tmp / "st"))
    if (de.path().extension() == ".safetensors") fs::remove(de.path());
  fs::remove(tmp / "st/model.safetensors.index.json");
  {
    std::ofstream f(tmp / "st/model.safetensors", std::ios::binary);
    const std::string header = "{\"a\": " + deep + "}";
    const uint64_t n = header.size();
    f.write(reinterpret_cast<const char*>(&n), 8);
    f << header;
  }
  expect_one_line_error(run("inspect " + (tmp / "st")), {"model.safetensors", "nested deeper than 512"});
}

TEST(CliBadInput, EachProblemIsOneLine) {
  test::TempDir tmp;
  const std::string a = test::fixture("qwen3_moe_a");
  std::ofstream(tmp / "ok.jsonl") << R"({"input_ids": [1, 2, 3]})" << "\n";
  std::ofstream(tmp / "bad.jsonl") << R"({"input_ids": [1, 2, 3]})" << "\n" << R"({"input_ids": [1, "x"]})" << "\n";
  std::ofstream(tmp / "big.jsonl") << R"({"input_ids": [1, 2, 999]})" << "\n";
  std::ofstream(tmp / "nofield.jsonl") << R"({"text": "hello"})" << "\n";
  expect_one_line_error(run("eval --model " + a + " --tokens " + (tmp / "bad.jsonl")), {"bad.jsonl:2", "input_ids"});
  expect_one_line_error(run("eval --model " + a + " --tokens " + (tmp / "big.jsonl")), {"big.jsonl:1", "999"});
  // A text row without a tokenizer in the model folder, and a row of no known form.
  expect_one_line_error(run("eval --model " + a + " --data " + (tmp / "nofield.jsonl")), {"nofield.jsonl:1", "tokenizer"});
  std::ofstream(tmp / "noform.jsonl") << R"({"foo": 1})" << "\n";
  expect_one_line_error(run("eval --model " + a + " --data " + (tmp / "noform.jsonl")), {"noform.jsonl:1", "input_ids"});
  expect_one_line_error(run("eval --model " + (tmp / "nope") + " --tokens " + (tmp / "ok.jsonl")), {"nope"});
  expect_one_line_error(run("eval --model " + a), {"--data"});
  expect_one_line_error(run("inspect " + (tmp / "nope")), {"nope"});

  // A checkpoint with a truncated shard.
  copy_dir(test::fixture("qwen3_moe_b"), tmp / "trunc");
  fs::resize_file(tmp / "trunc/model.safetensors", 1000);
  expect_one_line_error(run("eval --model " + (tmp / "trunc") + " --tokens " + (tmp / "ok.jsonl")),
                        {"trunc/model.safetensors", "header length"});
  // A config with an unsupported model type.
  copy_dir(test::fixture("qwen3_moe_b"), tmp / "type");
  auto cfg = nlohmann::ordered_json::parse(std::ifstream(tmp / "type/config.json"));
  cfg["model_type"] = "mamba";
  std::ofstream(tmp / "type/config.json") << cfg.dump();
  expect_one_line_error(run("inspect " + (tmp / "type")), {"type/config.json", "model_type", "mamba"});
  // Weights holding NaN: eval prints what it computed but fails with one line naming the line.
  copy_dir(test::fixture("qwen3_moe_b"), tmp / "nan");
  {
    auto ck = hf::SafetensorsCheckpoint::open(tmp / "nan");
    hf::NamedTensors all;
    for (const auto& n : ck.names()) {
      Tensor t = ck.get(n).to(DType::F32);
      if (n == "model.norm.weight") t.f32()[0] = NAN;
      all.emplace_back(n, t);
    }
    fs::remove(tmp / "nan/model.safetensors");
    hf::save_safetensors(tmp / "nan/model.safetensors", all);
  }
  const CmdResult nan = run("eval --model " + (tmp / "nan") + " --tokens " + (tmp / "ok.jsonl"));
  expect_one_line_error(nan, {"the loss of line 1 is nan", "NaN or Inf"});
  EXPECT_NE(nan.out.find("\"rows\""), std::string::npos);
  // A config missing a required field.
  cfg["model_type"] = "qwen3_moe";
  cfg.erase("num_attention_heads");
  std::ofstream(tmp / "type/config.json") << cfg.dump();
  expect_one_line_error(run("eval --model " + (tmp / "type") + " --tokens " + (tmp / "ok.jsonl")),
                        {"config.json", "'num_attention_heads'"});
}

TEST(Cli, TrainPrintsPlainProgressLinesWhenNotATerminal) {
  test::TempDir tmp;
  std::ofstream(tmp / "r.yaml") << "model: " << test::fixture("qwen3_moe_a") << "\ndata: " << MOEFORGE_FIXTURES
                                << "/../../examples/data/arith.jsonl\noutput_dir: " << (tmp / "out")
                                << "\nseq_len: 16\nglobal_batch: 2\nsteps: 4\nlog_every: 2\n";
  CmdResult r = run("train " + (tmp / "r.yaml") + " optimizer.lr=1e-3");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.err.find("data: 512 documents"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("step 2/4 | loss "), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("step 4/4 | loss "), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find('\r'), std::string::npos) << "no in-place updates when stderr is a file";
  EXPECT_TRUE(fs::exists(tmp / "out/final/config.json"));
}

TEST(CliBadInput, TrainRecipeErrorsAreOneLine) {
  test::TempDir tmp;
  std::ofstream(tmp / "r.yaml") << "model: " << test::fixture("qwen3_moe_a") << "\ndata: x.jsonl\noutput_dir: "
                                << (tmp / "out") << "\nsteps: 1\nlerning_rate: 3\n";
  expect_one_line_error(run("train " + (tmp / "r.yaml")), {"r.yaml", "unknown key 'lerning_rate'"});
  std::ofstream(tmp / "bad.yaml") << "model: [unclosed\n";
  expect_one_line_error(run("train " + (tmp / "bad.yaml")), {"bad.yaml", "invalid YAML"});
  expect_one_line_error(run("train " + (tmp / "missing.yaml")), {"missing.yaml"});
}

TEST(Cli, TokenizeEncodesAndDecodes) {
  const std::string dir = test::fixture("tokenizers/llama3");
  CmdResult r = run("tokenize --tokenizer " + dir + " --text 'Hello world'");
  ASSERT_EQ(r.status, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["tokens"][0], "<|begin_of_text|>");
  std::string ids;
  for (size_t i = 1; i < j["ids"].size(); ++i) ids += (i > 1 ? "," : "") + std::to_string(j["ids"][i].get<int64_t>());
  CmdResult d = run("tokenize --tokenizer " + dir + " --decode " + ids);
  ASSERT_EQ(d.status, 0) << d.err;
  EXPECT_EQ(nlohmann::json::parse(d.out)["text"], "Hello world");
  expect_one_line_error(run("tokenize --tokenizer " + dir + " --decode 1,x"), {"'x' is not a token id"});
  expect_one_line_error(run("tokenize --tokenizer /nonexistent --text hi"), {"/nonexistent", "tokenizer.json"});
}

TEST(Cli, TokenizeRendersConversations) {
  const std::string dir = test::fixture("chat/qwen3");
  test::TempDir tmp;
  std::ofstream(tmp / "conv.json") << R"([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])";
  CmdResult r = run("tokenize --tokenizer " + dir + " --messages " + (tmp / "conv.json"));
  ASSERT_EQ(r.status, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["text"], "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nhello<|im_end|>\n");
  EXPECT_EQ(j["ids"].size(), j["assistant_mask"].size());
  int trained = 0;
  for (const auto& m : j["assistant_mask"]) trained += m.get<int>();
  EXPECT_GT(trained, 0);
  std::ofstream(tmp / "bad.json") << R"({"conversation": []})";
  expect_one_line_error(run("tokenize --tokenizer " + dir + " --messages " + (tmp / "bad.json")),
                        {"bad.json", "expected a list of messages"});
  expect_one_line_error(run("tokenize --tokenizer " + test::fixture("tokenizers/llama3") + " --messages " + (tmp / "conv.json")),
                        {"no chat template"});
}

// eval on every training format: per-row losses are the model's loss on the rows as training
// tokenizes them (the messages row counting only the assistant's tokens), the totals their
// token-weighted mean and its exponential.
TEST(Cli, EvalTakesEveryTrainingFormat) {
  test::TempDir tmp;
  const std::string model = std::string(MOEFORGE_SOURCE_DIR) + "/examples/demo_model";
  const std::string file = (tmp / "rows.jsonl");
  std::ofstream(file) << R"({"text": "Count from 1 to 3."})" << "\n"
                      << R"({"prompt": "Count from 4 to 6.", "completion": " 4 5 6"})" << "\n"
                      << R"({"messages": [{"role": "user", "content": "Count from 7 to 9."}, {"role": "assistant", "content": "7 8 9"}]})"
                      << "\n"
                      << R"({"input_ids": [5, 6, 7, 8]})" << "\n";
  const CmdResult r = run("eval --model " + model + " --data " + file);
  ASSERT_EQ(r.status, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  ASSERT_EQ(j["rows"].size(), 4u);
  const data::ModelText text = data::load_model_text(model, "", "", true, "test");
  const data::Dataset ds = data::load_model_dataset(file, text, false);
  auto m = models::from_pretrained(model);
  double sum = 0;
  int64_t tokens = 0;
  for (size_t i = 0; i < 4; ++i) {
    const auto& row = ds.rows[i];
    const int64_t s = static_cast<int64_t>(row.input_ids.size());
    Tensor ids = Tensor::from_i64(test::ids64(row.input_ids), {1, s}), labels = Tensor::from_i64(test::ids64(row.labels.value_or(row.input_ids)), {1, s});
    const auto o = m.model->forward({ids, &labels});
    EXPECT_NEAR(j["rows"][i]["loss"].get<double>(), o.loss, 1e-5) << "row " << i;
    EXPECT_EQ(j["rows"][i]["tokens"].get<int64_t>(), o.loss_tokens) << "row " << i;
    sum += static_cast<double>(o.loss) * o.loss_tokens;
    tokens += o.loss_tokens;
  }
  // The messages row counts the assistant's "7 8 9" and end-of-turn tokens only.
  const auto enc = text.chat->encode(*text.tokenizer, nlohmann::ordered_json::parse(
      R"([{"role": "user", "content": "Count from 7 to 9."}, {"role": "assistant", "content": "7 8 9"}])"), {});
  EXPECT_EQ(j["rows"][2]["tokens"].get<int64_t>(), std::count(enc.assistant_mask.begin(), enc.assistant_mask.end(), 1));
  EXPECT_NEAR(j["token_weighted_loss"].get<double>(), sum / tokens, 1e-5);
  EXPECT_NEAR(j["perplexity"].get<double>(), std::exp(sum / tokens), 1e-3);
  const CmdResult s = run("eval --model " + model + " --data " + file + " --summary");
  ASSERT_EQ(s.status, 0) << s.err;
  EXPECT_FALSE(nlohmann::json::parse(s.out).contains("rows"));
  EXPECT_EQ(nlohmann::json::parse(s.out)["loss_tokens"].get<int64_t>(), tokens);
}

// generate: greedy ids equal Transformers' (the fixture's reference), --json carries them, stop
// strings end the text after them, and the command-line errors are usage errors (exit 2).
TEST(Cli, GenerateGreedyJsonStopsAndErrors) {
  const std::string a = test::fixture("llama_a");
  auto ref = hf::SafetensorsFile::open(a + "/generate_reference.safetensors");
  const Tensor p = ref.get("prompt_ids").clone(), g = ref.get("generated_ids").clone();
  std::string prompt;
  for (int64_t i = 0; i < p.numel(); ++i) prompt += (i ? "," : "") + std::to_string(p.i64()[i]);
  CmdResult r = run("generate --model " + a + " --prompt-ids " + prompt + " --max-new-tokens " +
                    std::to_string(g.numel()) + " --json");
  ASSERT_EQ(r.status, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["generated_ids"].get<std::vector<int64_t>>(), std::vector<int64_t>(g.i64(), g.i64() + g.numel()));
  EXPECT_EQ(j["sampling"], "greedy");
  EXPECT_EQ(j["stop_reason"], "length");

  const std::string demo = std::string(MOEFORGE_SOURCE_DIR) + "/examples/demo_model";
  r = run("generate --model " + demo + " --chat --prompt 'Count from 3 to 7.' --max-new-tokens 12 --json --ignore-eos");
  ASSERT_EQ(r.status, 0) << r.err;
  j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["prompt"], "<|im_start|>user\nCount from 3 to 7.<|im_end|>\n<|im_start|>assistant\n");
  EXPECT_EQ(j["generated_ids"].size(), 12u);
  const std::string text = j["text"];
  ASSERT_GE(text.size(), 2u);
  // The same run stopped at a piece of its own text: the text ends right after that piece.
  const std::string stop = text.substr(text.size() / 2, 1);
  r = run("generate --model " + demo + " --chat --prompt 'Count from 3 to 7.' --max-new-tokens 12 --json --ignore-eos "
          "--stop '" + stop + "'");
  ASSERT_EQ(r.status, 0) << r.err;
  j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["stop_reason"], "stop_string");
  EXPECT_EQ(j["text"].get<std::string>(), text.substr(0, text.find(stop) + 1));
  // Streaming prints the text itself.
  r = run("generate --model " + demo + " --prompt 'Count from' --max-new-tokens 5 --ignore-eos");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.err.find("tokens/s"), std::string::npos) << r.err;

  r = run("generate --help");
  EXPECT_EQ(r.status, 0);
  EXPECT_NE(r.out.find("--max-new-tokens"), std::string::npos);
  r = run("generate --model " + a + " --prompt-ids 1 --max-new-tokens many");
  EXPECT_EQ(r.status, 2);
  EXPECT_EQ(lines(r.err), 1) << r.err;
  EXPECT_NE(r.err.find("--max-new-tokens"), std::string::npos) << r.err;
  expect_one_line_error(run("generate --model " + a), {"prompt"});
  expect_one_line_error(run("generate --model " + a + " --prompt hello"), {"tokenizer.json"});
  expect_one_line_error(run("generate --model " + a + " --prompt-ids 1,x"), {"--prompt-ids", "'x'"});
  expect_one_line_error(run("generate --model " + a + " --prompt-ids 1,99999"), {"99999", "vocabulary"});
}

// generate --prompts: one JSON line per prompt, in order, each the result the single-prompt form
// gives (greedy), from text, a conversation and ids alike; a bad line is one error naming the file
// and line, before the model loads.
TEST(Cli, GeneratePromptsFileGivesEachPromptsOwnResult) {
  test::TempDir tmp;
  const std::string demo = std::string(MOEFORGE_SOURCE_DIR) + "/examples/demo_model";
  const std::string flags = " --max-new-tokens 6 --ignore-eos --greedy";
  const std::string file = tmp / "prompts.jsonl";
  std::ofstream(file) << "{\"prompt\": \"Count from 3 to 7.\"}\n\n"
                         "{\"prompt_ids\": [3, 1, 4, 1, 5]}\n"
                         "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi there\"}]}\n";
  const CmdResult many = run("generate --model " + demo + " --prompts " + file + flags);
  ASSERT_EQ(many.status, 0) << many.err;
  std::vector<nlohmann::json> rows;
  std::istringstream lines_in(many.out);
  for (std::string line; std::getline(lines_in, line);) rows.push_back(nlohmann::json::parse(line));
  ASSERT_EQ(rows.size(), 3u) << many.out;
  const auto alone = [&](const std::string& how) {
    const CmdResult r = run("generate --model " + demo + " " + how + flags + " --json");
    EXPECT_EQ(r.status, 0) << r.err;
    return nlohmann::json::parse(r.out);
  };
  const std::string conv = tmp / "conv.json";
  std::ofstream(conv) << "[{\"role\": \"user\", \"content\": \"Hi there\"}]";
  const nlohmann::json want[] = {alone("--prompt 'Count from 3 to 7.'"), alone("--prompt-ids 3,1,4,1,5"),
                                 alone("--messages " + conv)};
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(rows[i]["index"], i);
    EXPECT_EQ(rows[i]["prompt_ids"], want[i]["prompt_ids"]) << i;
    EXPECT_EQ(rows[i]["generated_ids"], want[i]["generated_ids"]) << i;
    EXPECT_EQ(rows[i].value("prompt", ""), want[i].value("prompt", "")) << i;
  }
  EXPECT_NE(many.err.find("prompt 3/3"), std::string::npos) << many.err;  // progress on stderr
  // The summary names the sequences a step really ran: 3 prompts under the default batch of 8.
  EXPECT_NE(many.err.find("up to 3 sequences per step"), std::string::npos) << many.err;
  // Two sequences per step (the third prompt joins when one ends) or one at a time: the same lines,
  // in the file's order.
  for (const char* batch : {" --batch-size 2", " --batch-size 1"}) {
    const CmdResult r = run("generate --model " + demo + " --prompts " + file + flags + batch);
    ASSERT_EQ(r.status, 0) << r.err;
    std::istringstream in(r.out);
    size_t i = 0;
    for (std::string line; std::getline(in, line); ++i) {
      const auto row = nlohmann::json::parse(line);
      EXPECT_EQ(row["index"], i) << batch;
      EXPECT_EQ(row["generated_ids"], want[std::min<size_t>(i, 2)]["generated_ids"]) << batch << ", prompt " << i;
    }
    EXPECT_EQ(i, 3u) << batch;
  }
  EXPECT_EQ(run("generate --model " + demo + " --prompts " + file + " --batch-size 0").status, 2);
  // --chat wraps each text prompt as a user message.
  std::ofstream(tmp / "chat.jsonl") << "{\"prompt\": \"Hi there\"}\n";
  const CmdResult chat = run("generate --model " + demo + " --chat --prompts " + (tmp / "chat.jsonl") + flags);
  ASSERT_EQ(chat.status, 0) << chat.err;
  EXPECT_EQ(nlohmann::json::parse(chat.out)["generated_ids"], want[2]["generated_ids"]);

  const auto bad = [&](const std::string& body) {
    std::ofstream(tmp / "bad.jsonl") << body;
    return run("generate --model " + demo + " --prompts " + (tmp / "bad.jsonl"));
  };
  expect_one_line_error(bad("{\"prompt\": \"a\"}\n{\"prompt\": 3}\n"), {"bad.jsonl:2", "'prompt'"});
  expect_one_line_error(bad("{\"prompt\": \"a\", \"prompt_ids\": [1]}\n"), {"bad.jsonl:1", "exactly one"});
  expect_one_line_error(bad("not json\n"), {"bad.jsonl:1", "JSON"});
  expect_one_line_error(bad("{\"prompt_ids\": [1, \"x\"]}\n"), {"bad.jsonl:1", "token id"});
  expect_one_line_error(bad("{\"prompt_ids\": [1, 99999]}\n"), {"bad.jsonl:1", "99999", "vocabulary"});
  expect_one_line_error(bad("\n\n"), {"bad.jsonl", "no prompts"});
  expect_one_line_error(run("generate --model " + demo + " --prompts " + (tmp / "missing.jsonl")), {"missing.jsonl"});
  EXPECT_EQ(run("generate --model " + demo + " --prompts " + file + " --prompt hi").status, 2);
}

// Clipping needs the whole norm before any update: with the optimizer in backward, bench refuses it
// (one line, before it looks for a GPU or the config).
TEST(Cli, BenchRefusesClippingWithOptimizerInBackward) {
  expect_one_line_error(run("bench no_such_config.json --optimizer-in-backward --max-grad-norm 1"),
                        {"--max-grad-norm", "--optimizer-in-backward"});
  EXPECT_EQ(run("bench no_such_config.json --max-grad-norm -1").status, 2);  // a usage error
}

// Help everywhere: `moeforge help`, `help COMMAND`, `COMMAND --help` and -h exit 0 with the full
// option list; --version names the commit; an unknown command or option is a usage error (2).
TEST(Cli, HelpAndVersionForEveryCommand) {
  CmdResult top = run("help");
  ASSERT_EQ(top.status, 0);
  for (const char* cmd : {"train", "generate", "eval", "plot", "inspect", "tokenize", "convert", "merge", "bench", "launch",
                          "dist-check"}) {
    EXPECT_NE(top.out.find(std::string("  ") + cmd + " "), std::string::npos) << cmd;
    for (const std::string form : {std::string("help ") + cmd, std::string(cmd) + " --help", std::string(cmd) + " -h"}) {
      const CmdResult r = run(form);
      EXPECT_EQ(r.status, 0) << form << ": " << r.err;
      EXPECT_NE(r.out.find("Usage: moeforge " + std::string(cmd)), std::string::npos) << form << ": " << r.out;
    }
  }
  EXPECT_NE(run("inspect --help").out.find("--gpus"), std::string::npos);
  EXPECT_NE(run("train --help").out.find("eval_every: 0"), std::string::npos);  // the recipe keys with defaults
  const CmdResult v = run("--version");
  EXPECT_EQ(v.status, 0);
  EXPECT_NE(v.out.find("moeforge "), std::string::npos);
  EXPECT_NE(v.out.find("commit "), std::string::npos);
  EXPECT_NE(v.out.find("CUDA"), std::string::npos);
  EXPECT_EQ(run("frobnicate").status, 2);
  const CmdResult bad = run("convert --model a --out b --shard 3");
  EXPECT_EQ(bad.status, 2);
  EXPECT_EQ(lines(bad.err), 1) << bad.err;
  EXPECT_NE(bad.err.find("--shard"), std::string::npos) << bad.err;
  EXPECT_EQ(run("").status, 2);  // no command: the usage on stderr
}

// generate --adapter (the LoRA adapter unmerged) gives the ids the merged folder gives, and they
// differ from the base model's.
TEST(Cli, GenerateWithAnAdapterEqualsTheMergedModel) {
  test::TempDir tmp;
  const std::string base = test::fixture("llama_a"), adapter = base + "/lora/adapter_after";
  const std::string args = " --prompt-ids 3,1,4,1,5,9,2,6 --max-new-tokens 16 --json --ignore-eos";
  CmdResult with = run("generate --model " + base + " --adapter " + adapter + args);
  ASSERT_EQ(with.status, 0) << with.err;
  ASSERT_EQ(run("merge --model " + base + " --adapter " + adapter + " --out " + (tmp / "merged")).status, 0);
  CmdResult merged = run("generate --model " + (tmp / "merged") + args);
  ASSERT_EQ(merged.status, 0) << merged.err;
  CmdResult plain = run("generate --model " + base + args);
  const auto ids = [](const CmdResult& r) { return nlohmann::json::parse(r.out)["generated_ids"].get<std::vector<int64_t>>(); };
  EXPECT_EQ(ids(with), ids(merged));
  EXPECT_NE(ids(with), ids(plain)) << "the adapter changed nothing: the test would prove little";
}

// Crash safety of every save: the process is stopped (as by kill -9) at each file-system step of a
// run's saves in turn (MOEFORGE_FAULT_AT=N: checkpoint-2, checkpoint-4 with the pruning of
// checkpoint-2, the re-save of checkpoint-4 and final/ after a resume, recipe.yaml); each time,
// `resume=true` (or a fresh start when no checkpoint was complete yet) finishes the run with a
// final model identical to the uninterrupted run's, and leaves no temporary folder behind.
TEST(CliFaults, AKillAtAnyPointOfASaveLosesNothing) {
  test::TempDir tmp;
  std::ofstream(tmp / "r.yaml") << "model: " << test::fixture("qwen3_moe_a") << "\ndata: " << MOEFORGE_FIXTURES
                                << "/../data/arith64.jsonl\nseq_len: 16\nmicro_batch: 2\nglobal_batch: 2\nsteps: 4\n"
                                << "save_every: 2\nsave_total_limit: 1\nlog_every: 4\nseed: 5\nthreads: 1\n";
  const std::string bin = std::string(MOEFORGE_BIN), recipe = tmp / "r.yaml";
  auto sh = [](const std::string& cmd) {
    const int s = std::system((cmd + " >/dev/null 2>&1").c_str());
    return WIFEXITED(s) ? WEXITSTATUS(s) : 128 + WTERMSIG(s);
  };
  ASSERT_EQ(sh(bin + " train " + recipe + " output_dir=" + (tmp / "straight")), 0);
  const std::string want = test::read_text(tmp / "straight/final/model.safetensors");
  // Every 7th fault point here (about 20 of the run's ~140); MOEFORGE_FAULT_SWEEP=1 tries every one
  // (`make test-faults`, a few minutes: each try fsyncs its saves).
  const int stride = std::getenv("MOEFORGE_FAULT_SWEEP") ? 1 : 7;
  int killed = 0;
  for (int n = 1; n <= 1000; n += stride) {
    const std::string out = tmp / ("k" + std::to_string(n));
    const int rc = sh("MOEFORGE_FAULT_AT=" + std::to_string(n) + " " + bin + " train " + recipe + " output_dir=" + out);
    if (rc == 0) break;  // past the last fault point: every one was tried
    ASSERT_EQ(rc, 86) << "fault point " << n;
    ++killed;
    // Resume; when the kill came before any checkpoint was complete, start over (what a user does).
    const CmdResult resumed = run("train " + recipe + " output_dir=" + out + " resume=true");
    int again = resumed.status;
    if (again != 0 && resumed.err.find("holds no complete checkpoint") != std::string::npos)
      again = sh(bin + " train " + recipe + " output_dir=" + out + " overwrite=true");
    ASSERT_TRUE(again == 0 || resumed.status == 0) << resumed.err;
    ASSERT_EQ(again, 0) << "resuming after fault point " << n;
    EXPECT_EQ(test::read_text(out + "/final/model.safetensors"), want) << "fault point " << n;
    for (const auto& de : fs::directory_iterator(out)) {
      const std::string name = de.path().filename().string();
      EXPECT_TRUE(name.find(".tmp.") == std::string::npos && name.find(".old.") == std::string::npos &&
                  name.find(".pruned") == std::string::npos)
          << name << " left after fault point " << n;
    }
    fs::remove_all(out);
  }
  EXPECT_GT(killed * stride, 60) << "the saves should pass many fault points";
  RecordProperty("fault_points_tried", killed);
}

// `moeforge dataset`: the rows, tokens and trained tokens that training's own loading gives, a
// seq_len's cut, and samples whose marked runs are exactly the row's tokens with and without loss.
TEST(Cli, DatasetReportsWhatTrainingLoads) {
  const std::string demo = std::string(MOEFORGE_SOURCE_DIR) + "/examples/demo_model";
  const std::string file = std::string(MOEFORGE_SOURCE_DIR) + "/examples/data/count_chat.jsonl";
  const CmdResult r = run("dataset --model " + demo + " --data " + file + " --seq-len 30 --show 3 --json");
  ASSERT_EQ(r.status, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  const data::ModelText text = data::load_model_text(demo, "", "", true, "test");
  const data::Dataset ds = data::load_model_dataset(file, text, false, false);
  int64_t total = 0, trained = 0, longer = 0, cut = 0;
  for (const auto& row : ds.rows) {
    const auto n = static_cast<int64_t>(row.input_ids.size());
    total += n;
    for (const int64_t l : *row.labels) trained += l != -100;
    if (n > 30) ++longer, cut += n - 30;
  }
  EXPECT_EQ(j["rows"], ds.rows.size());
  EXPECT_EQ(j["tokens"]["total"], total);
  EXPECT_EQ(j["trained_tokens"], trained);
  EXPECT_EQ(j["seq_len"]["rows_longer"], longer);
  EXPECT_EQ(j["seq_len"]["tokens_cut"], cut);
  EXPECT_GT(longer, 0);  // the cut is exercised
  ASSERT_EQ(j["samples"].size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    const auto& row = ds.rows[i];
    std::vector<int64_t> kept, lost;
    for (size_t k = 0; k < row.input_ids.size(); ++k) ((*row.labels)[k] != -100 ? kept : lost).push_back(row.input_ids[k]);
    std::string all, marked;
    for (const auto& s : j["samples"][i]["segments"]) {
      all += s["text"].get<std::string>();
      if (s["trained"]) marked += s["text"].get<std::string>();
    }
    EXPECT_EQ(all, text.tokenizer->decode(test::ids64(row.input_ids), false)) << i;
    EXPECT_EQ(marked, text.tokenizer->decode(kept, false)) << i;  // the assistant's answer and its end
  }
  const CmdResult human = run("dataset --model " + demo + " --data " + file + " --show 1");
  ASSERT_EQ(human.status, 0) << human.err;
  EXPECT_NE(human.out.find("[[" + j["samples"][0]["segments"][1]["text"].get<std::string>() + "]]"), std::string::npos)
      << human.out;
  const CmdResult no_data = run("dataset --model " + demo);
  EXPECT_EQ(no_data.status, 2);
  EXPECT_NE(no_data.err.find("--model and --data are required without --recipe"), std::string::npos) << no_data.err;
  const CmdResult missing = run("dataset --model " + demo + " --data /nonexistent/x.parquet");
  EXPECT_EQ(missing.status, 1);
  EXPECT_NE(missing.err.find("/nonexistent/x.parquet: no such file"), std::string::npos) << missing.err;
}

// `moeforge dataset --recipe`: the recipe's model, data and data settings, its eval_split's held-out
// rows and its packing as train computes them (data::hold_out and TokenBatches on the same rows);
// a flag given beside the recipe wins.
// moeforge cache lists each file (rows, input tokens, the data it holds) and --clear removes those
// unused for --older-than days, keeping a file whose lock a running process holds.
TEST(Cli, CacheListsAndClears) {
  test::TempDir tmp;
  const std::string dir = tmp / "cache";
  fs::create_directories(dir);
  std::vector<data::TokenRow> rows(2);
  rows[0].input_ids = {1, 2, 3};
  rows[1].input_ids = {4, 5};
  rows[1].labels = std::vector<data::TokenId>{-100, 5};
  const auto store = data::TokenStore::from_rows(rows, {"d.jsonl"});
  std::vector<std::string> paths;
  for (const char* name : {"old", "new", "held"}) {
    const std::string key = std::string("moeforge tokenized dataset v1\ndata /data/") + name + ".jsonl 12 3.4\n";
    paths.push_back(data::token_cache_path(dir, key));
    data::write_token_cache(paths.back(), key, *store);
  }
  const struct timespec forty_days_ago[2] = {{time(nullptr) - 40 * 86400, 0}, {time(nullptr) - 40 * 86400, 0}};
  ASSERT_EQ(::utimensat(AT_FDCWD, paths[0].c_str(), forty_days_ago, 0), 0);
  ASSERT_EQ(::utimensat(AT_FDCWD, paths[2].c_str(), forty_days_ago, 0), 0);

  const CmdResult list = run("cache --dir " + dir + " --json");
  ASSERT_EQ(list.status, 0) << list.err;
  const auto j = nlohmann::json::parse(list.out);
  ASSERT_EQ(j["files"].size(), 3u);
  EXPECT_EQ(j["files"][0]["path"], paths[1]) << "the most recently used first";
  EXPECT_EQ(j["files"][0]["rows"], 2);
  EXPECT_EQ(j["files"][0]["tokens"], 5) << "input tokens, not the labels stored beside them";
  EXPECT_EQ(j["files"][0]["holds"], "/data/new.jsonl");

  // A running process holds the third one's lock: --clear keeps it and says so.
  const std::string lock = paths[2].substr(0, paths[2].size() - 6) + ".lock";
  const int fd = ::open(lock.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::flock(fd, LOCK_EX), 0);
  const CmdResult clear = run("cache --dir " + dir + " --clear --older-than 30");
  ::close(fd);
  ASSERT_EQ(clear.status, 0) << clear.err;
  EXPECT_FALSE(fs::exists(paths[0]));
  EXPECT_TRUE(fs::exists(paths[1])) << "used today";
  EXPECT_TRUE(fs::exists(paths[2])) << "in use";
  EXPECT_NE(clear.out.find("[in use, kept]"), std::string::npos) << clear.out;
  EXPECT_NE(clear.out.find("2 files"), std::string::npos) << clear.out;
  // A mapped hit marks its file used now.
  ASSERT_EQ(::utimensat(AT_FDCWD, paths[1].c_str(), forty_days_ago, 0), 0);
  ASSERT_TRUE(data::map_token_cache(paths[1], std::string("moeforge tokenized dataset v1\ndata /data/new.jsonl 12 3.4\n")));
  struct stat st {};
  ASSERT_EQ(::stat(paths[1].c_str(), &st), 0);
  EXPECT_GT(st.st_mtim.tv_sec, time(nullptr) - 3600);
  EXPECT_EQ(run("cache --dir " + dir + " --clear").status, 0);
  EXPECT_FALSE(fs::exists(paths[1]));
  EXPECT_FALSE(fs::exists(paths[2]));
}

TEST(Cli, DatasetTakesARecipe) {
  const std::string demo = std::string(MOEFORGE_SOURCE_DIR) + "/examples/demo_model";
  const std::string file = std::string(MOEFORGE_SOURCE_DIR) + "/examples/data/count_chat.jsonl";
  const std::string other = std::string(MOEFORGE_SOURCE_DIR) + "/examples/data/count_chat_eval.jsonl";
  test::TempDir tmp;
  std::ofstream(tmp / "r.yaml") << "model: " << demo << "\ndata: " << file
                                << "\nseq_len: 128\npacking: true\neval_split: 0.1\nseed: 7\nsteps: 10\n"
                                   "micro_batch: 2\nglobal_batch: 2\noutput_dir: "
                                << (tmp / "out") << "\n";
  const CmdResult r = run("dataset --recipe " + (tmp / "r.yaml") + " --show 0 --json");
  ASSERT_EQ(r.status, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  const data::ModelText text = data::load_model_text(demo, "", "", true, "test");
  data::Dataset ds = data::load_model_dataset(file, text, false, false);
  EXPECT_EQ(j["rows"], ds.rows.size());
  EXPECT_EQ(j["seq_len"]["value"], 128);
  data::HeldOut split = data::hold_out(std::move(ds.rows), 0.1, 7, "test");
  EXPECT_EQ(j["eval_split"]["rows_held_out"], split.eval.size());
  EXPECT_EQ(j["eval_split"]["rows_trained"], split.train.size());
  const data::TokenBatches packed(std::move(split.train), 128, 7, true);
  EXPECT_EQ(j["packing"]["rows"], packed.stats().packed_rows);
  EXPECT_LT(packed.stats().packed_rows, static_cast<int64_t>(j["eval_split"]["rows_trained"].get<size_t>()));
  // --data beside the recipe wins; the human form names the split and the packing.
  const CmdResult flag = run("dataset --recipe " + (tmp / "r.yaml") + " --data " + other + " --show 0");
  ASSERT_EQ(flag.status, 0) << flag.err;
  const data::Dataset eval_rows = data::load_model_dataset(other, text, false, false);
  EXPECT_NE(flag.out.find("dataset: " + std::to_string(eval_rows.rows.size()) + " rows from 1 file"), std::string::npos)
      << flag.out;
  EXPECT_NE(flag.out.find("rows held out for validation"), std::string::npos) << flag.out;
  EXPECT_NE(flag.out.find("packing: "), std::string::npos) << flag.out;
  const CmdResult bad = run("dataset --recipe " + (tmp / "nothing.yaml"));
  EXPECT_EQ(bad.status, 1);
  EXPECT_NE(bad.err.find("nothing.yaml"), std::string::npos) << bad.err;
}

// generate --prompts takes a Parquet or an Arrow file (a hub dataset's held-out split as it is):
// the same result lines as the same rows in jsonl (pyarrow's reading of the file).
class CliTablePrompts : public ::testing::TestWithParam<std::string> {};

TEST_P(CliTablePrompts, GeneratePromptsEqualTheirJsonl) {
  const std::string demo = std::string(MOEFORGE_SOURCE_DIR) + "/examples/demo_model";
  const std::string base = test::fixture(GetParam());
  const std::string file = base + (GetParam().find("parquet") == 0 ? ".parquet" : ".arrow");
  const std::string flags = " --max-new-tokens 4 --greedy --threads 1";
  const CmdResult pq = run("generate --model " + demo + " --prompts " + file + flags);
  const CmdResult jl = run("generate --model " + demo + " --prompts " + base + ".expected.jsonl" + flags);
  ASSERT_EQ(pq.status, 0) << pq.err;
  ASSERT_EQ(jl.status, 0) << jl.err;
  std::istringstream a(pq.out), b(jl.out);
  size_t n = 0;
  for (std::string la, lb; std::getline(a, la) && std::getline(b, lb); ++n) {
    const auto ja = nlohmann::json::parse(la), jb = nlohmann::json::parse(lb);
    EXPECT_EQ(ja["prompt_ids"], jb["prompt_ids"]) << n;
    EXPECT_EQ(ja["generated_ids"], jb["generated_ids"]) << n;
  }
  EXPECT_EQ(n, 6u);
  EXPECT_NE(pq.err.find(std::filesystem::path(file).filename().string() + ": row 6"), std::string::npos)
      << pq.err;  // progress names rows
}

INSTANTIATE_TEST_SUITE_P(Formats, CliTablePrompts,
                         ::testing::Values("parquet/prompts_snappy", "arrow/prompts_stream"),
                         [](const auto& info) { return info.param.substr(0, info.param.find('/')); });

// generate --prompts takes a folder or a glob as --data does: a save_to_disk folder (its files in
// state.json's order) gives the lines its files give one after the other, and a glob the same.
TEST(Cli, GeneratePromptsFromAFolderOrAGlob) {
  const std::string demo = std::string(MOEFORGE_SOURCE_DIR) + "/examples/demo_model";
  const std::string flags = " --max-new-tokens 3 --greedy --threads 1";
  test::TempDir saved;
  std::filesystem::copy_file(test::fixture("arrow/prompts_stream.arrow"), saved / "data-00000-of-00002.arrow");
  std::filesystem::copy_file(test::fixture("parquet/prompts_snappy.parquet"), saved / "data-00001-of-00002.parquet");
  std::ofstream(saved / "state.json") << R"({"_data_files": [{"filename": "data-00001-of-00002.parquet"},)"
                                      << R"( {"filename": "data-00000-of-00002.arrow"}]})";
  const CmdResult folder = run("generate --model " + demo + " --prompts " + saved.path.string() + flags);
  const CmdResult one = run("generate --model " + demo + " --prompts " + test::fixture("parquet/prompts_snappy.expected.jsonl") + flags);
  ASSERT_EQ(folder.status, 0) << folder.err;
  ASSERT_EQ(one.status, 0) << one.err;
  const auto ids_of = [](const std::string& out) {
    std::vector<nlohmann::json> ids;
    std::istringstream in(out);
    for (std::string line; std::getline(in, line);) ids.push_back(nlohmann::json::parse(line)["generated_ids"]);
    return ids;
  };
  const auto both = ids_of(folder.out), single = ids_of(one.out);
  ASSERT_EQ(both.size(), 2 * single.size());  // the Parquet file first (state.json's order), then the Arrow one
  for (size_t i = 0; i < single.size(); ++i) {
    EXPECT_EQ(both[i], single[i]) << i;
    EXPECT_EQ(both[single.size() + i], single[i]) << i;  // the same rows in Arrow
  }
  const CmdResult glob = run("generate --model " + demo + " --prompts '" + (saved / "data-*") + "'" + flags);
  ASSERT_EQ(glob.status, 0) << glob.err;
  EXPECT_EQ(ids_of(glob.out).size(), 2 * single.size());
}
