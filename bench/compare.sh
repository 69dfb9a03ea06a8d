#!/usr/bin/env bash
# Runs `moeforge bench` and bench/hf_baseline.py on the same workload in one call (on the GPU
# machine) and prints both rows and the ratios (moeforge / Transformers: tokens/s and peak memory).
# With NPROC=N (N > 1) both run on N GPUs: `moeforge launch --nproc-per-node N -- bench` (experts
# split over every rank unless MF_FLAGS has --ep-size) against Transformers + FSDP2
# (bench/hf_baseline_fsdp.py under torch.distributed.run); figures are per GPU.
# usage: bench/compare.sh CONFIG [bench flags: --layers N --seq S --routing R --steps N --warmup N]
#        MOEFORGE=path/to/moeforge PRECISION=bf16 PYTHON=python3 NPROC=1 (environment); MF_FLAGS:
#        flags for moeforge only (e.g. --optimizer-in-backward)
set -euo pipefail
config=$1; shift
MOEFORGE=${MOEFORGE:-build/moeforge}
PYTHON=${PYTHON:-python3}
PRECISION=${PRECISION:-bf16}
NPROC=${NPROC:-1}
here=$(dirname "$0")
if [ "$NPROC" -gt 1 ]; then
  mf_json=$("$MOEFORGE" launch --nproc-per-node "$NPROC" -- bench "$config" --precision "$PRECISION" ${MF_FLAGS:-} "$@" | tail -n 1)
  hf_json=$("$PYTHON" -m torch.distributed.run --nproc-per-node "$NPROC" "$here/hf_baseline_fsdp.py" "$config" "$@" | tail -n 1) || hf_json=""
else
  mf_json=$("$MOEFORGE" bench "$config" --precision "$PRECISION" ${MF_FLAGS:-} "$@" | tail -n 1)
  hf_json=$("$PYTHON" "$here/hf_baseline.py" "$config" "$@" | tail -n 1) || hf_json=""
fi
"$PYTHON" - "$mf_json" "$hf_json" <<'PY'
import json, sys
mf = json.loads(sys.argv[1])
try:
    hf = json.loads(sys.argv[2])
except ValueError:  # the Transformers side failed (its error is above, e.g. out of memory): keep moeforge's row
    hf = None
cols = [("tokens_per_s_per_gpu", "tok/s/GPU", "%10.0f"), ("model_tflops_per_gpu", "TFLOP/s", "%8.1f"),
        ("peak_allocated_gib", "peak GiB", "%9.2f"), ("device_used_gib", "dev used", "%9.2f"),
        ("fwd_loss_ms", "fwd+loss", "%9.1f"), ("bwd_ms", "bwd ms", "%8.1f"), ("optimizer_ms", "opt ms", "%8.1f"),
        ("step_ms", "step ms", "%8.1f")]
print("%-24s" % "impl" + "".join(" %*s" % (len(f % 0) , n) for _, n, f in cols))
for r in (mf, hf) if hf else (mf,):
    name = r["impl"] + "/" + r.get("precision", "") + ("/opt-in-bwd" if r.get("optimizer_in_backward") else "")
    print("%-24s" % name + "".join(" " + f % r[k] for k, _, f in cols))
if hf:
    print("ratio moeforge/transformers: tokens/s %.2fx, peak allocated %.2fx  (%s routing, %d layers, seq %d, %d GPU(s))" % (
        mf["tokens_per_s_per_gpu"] / hf["tokens_per_s_per_gpu"], mf["peak_allocated_gib"] / hf["peak_allocated_gib"],
        mf["routing"], mf["layers"], mf["seq"], mf.get("gpus", 1)))
else:
    print("transformers: failed (its error is above); moeforge's row only")
print("MF_JSON " + json.dumps(mf))
print("HF_JSON " + json.dumps(hf) if hf else "HF_JSON null")
PY
