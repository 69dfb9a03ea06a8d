#!/usr/bin/env bash
# The multi-GPU measurements the open issues still owe, in the order to take them when a machine
# with 2, 4 or 8 GPUs is lent (each part fits one 10-minute device call; a session has 30 device
# minutes). On the GPU machine, after tools/gpu/pack.sh (with build-baseline/ holding 858c9bd's
# moeforge for issue 16's comparison: cp /tmp/moeforge-baseline-858c9bd/build/moeforge
# build-baseline/moeforge_baseline, or tools/gpu/build_baseline.sh 858c9bd):
#   run(command="bash tools/gpu/owed.sh PART", carry=[".gpu_check"], kind="nvidia-h100-x8")
# Parts, most owed first:
#   tests     every GPU test, the multi-GPU ones included (test_cuda_dist: EP x ZeRO-1/3, LoRA over
#             EP x ZeRO (issue 18), checkpoints, NCCL's frozen-peer timeout (issue 22)), then the
#             Python package's suite with its two-GPU test (issue 20)
#   ep2       issue 16: q30-L4/L8 and 48-layer EP 2 against the baseline build (within 2%), and
#             issue 21: q30-L8 on 2 GPUs, exchange chunked (MOEFORGE_EP_CHUNKS=2) or not, against
#             one GPU (>= 95% per GPU)
#   scaling [N]  issue 21 / the expert-parallel issue: full q30 on N GPUs (default: all of them), both
#             routings, against Transformers + FSDP2 in the same call (one N per device call)
#   nemotron  issue 17: all 52 Nemotron-H layers with EP on every GPU, both routings, against
#             Transformers + FSDP2
# Everything is logged under $OUT (owed-PART.txt: the lines to copy into docs/benchmarks.md).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
part=${1:-tests}
gpus=$(nvidia-smi -L | wc -l)
log=$OUT/owed-$part.txt
echo "owed.sh $part on $gpus GPU(s): $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)" | tee "$log"
run() { bash tools/gpu/run.sh "$@"; }
# What run.sh sets for the packed binaries, for the parts that call them directly.
P=$PWD/.gpu_check/p
source tools/gpu/env.sh
case "$part" in
  tests)
    [ "$gpus" -ge 2 ] || echo "note: one GPU only, the multi-GPU tests will skip" | tee -a "$log"
    run tests > /dev/null 2>&1
    cat "$OUT/summary.txt" >> "$log"
    run python 2>&1 | tail -n 5 >> "$log" ;;
  ep2)
    [ "$gpus" -ge 2 ] || { echo "ep2 needs 2 GPUs" | tee -a "$log"; exit 2; }
    run ab 2>&1 | tail -n 12 >> "$log"
    cfg=.gpu_check/p/configs/qwen3-30b-a3b.json
    common=(--layers 8 --seq 4096 --steps 6 --warmup 2 --precision bf16 --optimizer-in-backward)
    for routing in native balanced; do
      one=$(CUDA_VISIBLE_DEVICES=0 timeout 240 .gpu_check/p/bin/moeforge bench "$cfg" --routing "$routing" "${common[@]}" 2>/dev/null | tail -n 1)
      echo "q30-L8 $routing 1gpu $one" >> "$log"
      for chunks in 1 2; do
        two=$(MOEFORGE_EP_CHUNKS=$chunks timeout 240 .gpu_check/p/bin/moeforge launch --nproc-per-node 2 -- bench "$cfg" \
              --routing "$routing" "${common[@]}" 2>/dev/null | tail -n 1)
        echo "q30-L8 $routing ep2-chunks$chunks $two" >> "$log"
      done
    done
    python3 - "$log" <<'PY' | tee -a "$log"
import json, sys
rows = {}
for line in open(sys.argv[1]):
    parts = line.split(" ", 3)
    if len(parts) == 4 and parts[0] == "q30-L8":
        try:
            rows[(parts[1], parts[2])] = json.loads(parts[3])["tokens_per_s_per_gpu"]
        except (ValueError, KeyError):
            pass
for routing in ("native", "balanced"):
    one = rows.get((routing, "1gpu"))
    for chunks in ("1", "2"):
        two = rows.get((routing, "ep2-chunks" + chunks))
        if one and two:
            print("q30-L8 %s: 1 GPU %.0f, EP 2 (chunks %s) %.0f tok/s/GPU = %.1f%% per GPU" % (routing, one, chunks, two, 100 * two / one))
PY
    ;;
  scaling)
    n=${2:-$gpus}
    [ "$n" -le "$gpus" ] && [ "$n" -ge 2 ] || { echo "scaling $n: this machine has $gpus GPU(s)" | tee -a "$log"; exit 2; }
    for routing in native balanced; do
      echo "== q30, $n GPUs, $routing" >> "$log"
      NPROC=$n timeout 280 bash tools/gpu/run.sh compare qwen3-30b-a3b --routing "$routing" --seq 4096 --steps 4 --warmup 2 \
        2>&1 | tail -n 4 >> "$log"
    done ;;
  nemotron)
    [ "$gpus" -ge 2 ] || { echo "nemotron needs 2 GPUs" | tee -a "$log"; exit 2; }
    for routing in native balanced; do
      echo "== nemotron-3-nano, 52 layers, $gpus GPUs, $routing" >> "$log"
      NPROC=$gpus timeout 280 bash tools/gpu/run.sh compare nemotron-3-nano --routing "$routing" --seq 4096 --steps 4 --warmup 2 \
        2>&1 | tail -n 4 >> "$log"
    done ;;
  *) echo "owed.sh: unknown part '$part' (tests | ep2 | scaling | nemotron)" >&2; exit 2 ;;
esac
cat "$log"
