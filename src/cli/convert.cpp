// moeforge convert: load a model folder and save it again (re-sharding, or checking that a folder
// survives the round trip); the output keeps the source's tensor names, layout and dtypes.
#include <cstdio>

#include "cli/args.h"
#include "cli/commands.h"
#include "core/error.h"
#include "hf/safetensors.h"
#include "models/pretrained.h"

namespace moeforge::cli {

int cmd_convert(const std::vector<std::string>& argv) {
  Args args(argv, {"--model", "--out", "--max-shard-size"}, {"--overwrite"});
  MF_CHECK(args.positionals().empty(), "convert: unexpected argument '", args.positionals().front(), "'");
  const std::string src = args.require("--model"), out = args.require("--out");
  models::SaveOptions opts;
  opts.overwrite = args.has("--overwrite");
  if (auto s = args.get("--max-shard-size")) opts.max_shard_bytes = hf::parse_size(*s);
  auto loaded = models::from_pretrained(src);
  models::save_pretrained(*loaded.model, loaded.source_dir, out, opts);
  std::printf("wrote %s (%zu tensors)\n", out.c_str(),
              loaded.model->adapter().export_tensors(loaded.model->params(), std::nullopt).size());
  return 0;
}

}  // namespace moeforge::cli
