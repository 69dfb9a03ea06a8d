// moeforge convert: load a model folder and save it again (re-sharding, or checking that a folder
// survives the round trip); the output keeps the source's tensor names, layout and dtypes.
#include <cstdio>

#include "cli/app.h"
#include "cli/commands.h"
#include "core/error.h"
#include "hf/safetensors.h"
#include "models/pretrained.h"

namespace moeforge::cli {

int cmd_convert(const std::vector<std::string>& argv) {
  auto app = make_app("convert", "Load a model folder and save it again: the same tensor names, layout and dtypes, "
                      "re-sharded;\nwritten to a temporary folder, then renamed.",
                      "\nExample: moeforge convert --model DIR --out DIR2 --max-shard-size 2GB");
  std::string src, out, shard = "5GB";
  bool overwrite = false;
  app->add_option("--model", src, "Hugging Face model folder")->required();
  app->add_option("--out", out, "output folder")->required();
  app->add_option("--max-shard-size", shard, "largest safetensors file (a larger model is sharded with an index)");
  app->add_flag("--overwrite", overwrite, "replace an existing output folder");
  if (auto code = parse(*app, argv)) return *code;
  models::SaveOptions opts;
  opts.overwrite = overwrite;
  opts.max_shard_bytes = hf::parse_size(shard);
  auto loaded = models::from_pretrained(src);
  models::save_pretrained(*loaded.model, loaded.source_dir, out, opts);
  std::printf("wrote %s (%zu tensors)\n", out.c_str(),
              loaded.model->adapter().export_tensors(loaded.model->params(), std::nullopt).size());
  return 0;
}

}  // namespace moeforge::cli
