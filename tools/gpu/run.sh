#!/usr/bin/env bash
# On the GPU machine (the device tool runs it in a copy of the repo, $OUT collected): unpacks
# tools/gpu/pack.sh's tarball and
#   tests               runs the GPU tests (summary lines in $OUT/summary.txt, logs beside it); with
#                       2+ GPUs the multi-GPU ones again with MOEFORGE_EP_CHUNKS=2
#   python              the Python package's pytest suite (GPU cases included) with the packed
#                       extension for the machine's Python 3.12 (tools/gpu/build_python_ext.sh)
#   nemo NAME ARGS...   moeforge, Transformers and NeMo AutoModel (bench/nemo_baseline.py: Qwen3-MoE,
#                       DeepSeek-V3, GPT-OSS) on one
#                       workload, both routings ($OUT/nemo.txt); with PACK_DIR=.gpu_nemo
#                       (tools/gpu/fetch_nemo_wheels.sh), e.g. PACK_DIR=.gpu_nemo bash tools/gpu/run.sh
#                       nemo qwen3-30b-a3b --layers 4 --seq 4096 --steps 6 --warmup 2
#   roundtrip           tools/check_hf_roundtrip.py: every fixture through `moeforge convert`, loaded
#                       by the machine's Transformers next to its source (log in $OUT/roundtrip.log);
#                       then tools/check_peft_roundtrip.py (LoRA adapters into PEFT; $OUT/peft_roundtrip.log)
#   compare ARGS...     bench/compare.sh CONFIG-NAME ARGS with the packed moeforge and the machine's
#                       Transformers (NPROC=N for N GPUs), e.g.
#                       NPROC=8 bash tools/gpu/run.sh compare qwen3-30b-a3b --routing native --seq 4096
#                       (CONFIG-NAME: a file of shared/configs without .json)
#   only BIN [FILTER]   one packed test binary, with an optional gtest filter ($OUT/BIN.log)
#   bench ARGS...       the packed `moeforge bench ARGS` (configs by name: $P/configs/NAME.json), with
#                       MOEFORGE_PHASE_TIMES=1 for the per-phase times unless PHASES=0 (PHASES=events:
#                       device times without synchronising) ($OUT/bench.log)
#   ab [BENCH FLAGS]    the packed moeforge against the packed baseline build of another commit
#                       (tools/gpu/build_baseline.sh), alternating per case: q30 cut to 4 and 8 layers,
#                       native and balanced routing, bf16, optimizer in backward, seq 4096; with 2+
#                       GPUs also the 48-layer EP 2 run. One JSON row per run in $OUT/ab.log and a
#                       table of ratios (issue 16: within 2%, peak memory not higher). AB_CONFIG=NAME and
#                       AB_LAYERS="4" pick another config of shared/configs and other cuts.
#                       AB_IN_BACKWARD=0 runs AdamW after the backward (for --max-grad-norm).
#   envab VAR=VALUE [BENCH FLAGS]  `ab`'s cases with one binary: the packed moeforge with VAR=VALUE
#                       as the baseline against it without (e.g. envab MOEFORGE_FUSED_ADAMW=0)
#   profile NAME ARGS   Nsight Compute's full report (speed of light, memory chart, warp stalls) of one
#                       launch of `moeforge bench NAME ARGS`: KERNEL=regex (default device_kernel, the
#                       CUTLASS GEMMs) SKIP=n (launches of it skipped first) ($OUT/profile-*.txt)
#   kernels NAME ARGS   Nsight Compute's duration of every kernel of `moeforge bench NAME ARGS`
#                       (give it --warmup 0 --steps 1: ncu serialises every launch), summed by
#                       kernel name by tools/gpu/kernel_table.py ($OUT/kernels-*.txt, raw CSV beside);
#                       KFROM=embedding_kernel with --warmup 2 --steps 1: only the last step's launches
#                       KBIN=moeforge_baseline: the packed baseline's kernels instead
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
PACK=${PACK_DIR:-.gpu_check}  # what tools/gpu/pack.sh made (PACK_DIR=.gpu_nemo: the slim pack + NeMo's wheels)
P=$PWD/$PACK/p
rm -rf "$P" && mkdir -p "$P" && tar -C "$P" -xJf "$PACK/gpu_pack.tar.xz"
source tools/gpu/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/nvidia-smi.txt" 2>&1
# Python packages the machine's venv lacks (tools/gpu/fetch_wheels.sh: PEFT for the LoRA baseline),
# unpacked onto PYTHONPATH (wheels are zip files; these need no build step).
if [ -d .gpu_check/wheels ]; then
  mkdir -p /tmp/pyextra
  for w in .gpu_check/wheels/*.whl; do
    mod=$(basename "$w" | cut -d- -f1 | tr 'A-Z' 'a-z'); [ "$mod" = pyyaml ] && mod=yaml
    /opt/torch/.venv/bin/python -c "import $mod" 2>/dev/null ||
      /opt/torch/.venv/bin/python -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall('/tmp/pyextra')" "$w"
  done
  export PYTHONPATH=/tmp/pyextra${PYTHONPATH:+:$PYTHONPATH}
fi
# Nsight Compute, and a file-name tag for a run's arguments (ncu modes).
find_ncu() {
  ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
  [ -n "$ncu" ] || { echo "run.sh $1: ncu not found" >&2; exit 2; }
}
tag_of() { echo "$*" | tr -c 'A-Za-z0-9.-' '_' | cut -c1-80; }
case "${1:-tests}" in
  tests)
    for t in test_backend_ops test_cuda_dist test_cuda_ops test_cuda_training test_cuda_model; do
      timeout 300 "$P/bin/$t" > "$OUT/$t.log" 2>&1; echo "$t rc=$?" >> "$OUT/summary.txt"
      grep -E "^\[  (PASSED|FAILED|SKIPPED) " "$OUT/$t.log" >> "$OUT/summary.txt"
    done
    if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
      MOEFORGE_EP_CHUNKS=2 timeout 300 "$P/bin/test_cuda_dist" --gtest_filter='*MultiGpu*' > "$OUT/test_cuda_dist_chunks2.log" 2>&1
      echo "test_cuda_dist (MOEFORGE_EP_CHUNKS=2) rc=$?" >> "$OUT/summary.txt"
      grep -E "^\[  (PASSED|FAILED|SKIPPED) " "$OUT/test_cuda_dist_chunks2.log" >> "$OUT/summary.txt"
    fi
    # The generate command on the GPU: the demo chat model, greedy, bf16 and fp32 (ids against the CPU's).
    for prec in fp32 bf16; do
      "$P/bin/moeforge" generate --model examples/demo_model --chat --prompt 'Count from 3 to 9.' --max-new-tokens 16 \
        --json --device cuda --precision $prec > "$OUT/generate_$prec.json" 2>> "$OUT/generate.log"
      echo "generate --device cuda --precision $prec rc=$?" >> "$OUT/summary.txt"
    done
    "$P/bin/moeforge" generate --model examples/demo_model --chat --prompt 'Count from 3 to 9.' --max-new-tokens 16 \
      --json > "$OUT/generate_cpu.json" 2>> "$OUT/generate.log"
    python3 -c "import json,sys; a,b=(json.load(open(sys.argv[i]))['generated_ids'] for i in (1,2)); print('generate fp32 cuda == cpu:', a==b)" \
      "$OUT/generate_fp32.json" "$OUT/generate_cpu.json" >> "$OUT/summary.txt"
    cat "$OUT/summary.txt" ;;
  python)
    # The Python package's tests with the GPU (python/tests/test_cuda.py) and without, on the
    # machine's Python 3.12 and torch: the packed extension beside python/moeforge/*.py.
    ext=$(ls "$P"/python/_moeforge*.so 2>/dev/null | head -n 1)
    [ -n "$ext" ] || { echo "run.sh python: the pack has no Python extension (tools/gpu/build_python_ext.sh)" >&2; exit 2; }
    rm -rf /tmp/pypkg && mkdir -p /tmp/pypkg/moeforge && cp python/moeforge/*.py "$ext" /tmp/pypkg/moeforge/
    PYTHONPATH=/tmp/pypkg:${PYTHONPATH:-} MOEFORGE_BIN=$P/bin/moeforge timeout 500 /opt/torch/.venv/bin/python -m pytest -q -rs \
      -p no:cacheprovider python/tests > "$OUT/pytest.log" 2>&1
    echo "pytest python/tests rc=$?" >> "$OUT/summary.txt"
    tail -n 25 "$OUT/pytest.log" ;;
  nemo)
    # moeforge, Transformers and NeMo AutoModel on the same workload, both routings, one GPU:
    # bench/nemo_baseline.py with NeMo's wheels (tools/gpu/fetch_nemo_wheels.sh; PACK_DIR=.gpu_nemo)
    # on PYTHONPATH for its run only (it brings Transformers 5.18; the Transformers row keeps the
    # machine's). One JSON row per run in $OUT/nemo.log, the table in $OUT/nemo.txt.
    shift
    name=$1; shift
    cfg=$P/configs/$name.json
    py=/opt/torch/.venv/bin/python
    rm -rf /tmp/nemo_site && mkdir -p /tmp/nemo_site
    for w in "$PACK"/wheels/*.whl; do $py -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall('/tmp/nemo_site')" "$w"; done
    for routing in native balanced; do  # NeMo first: the row no earlier run has
      row=$(PYTHONPATH=/tmp/nemo_site timeout 300 $py bench/nemo_baseline.py "$cfg" --routing "$routing" "$@" 2>>"$OUT/nemo.err" | tail -n 1)
      echo "nemo_automodel $routing $row" >> "$OUT/nemo.log"
      row=$(timeout 240 "$P/bin/moeforge" bench "$cfg" --routing "$routing" --precision bf16 --optimizer-in-backward "$@" 2>>"$OUT/nemo.err" | tail -n 1)
      echo "moeforge $routing $row" >> "$OUT/nemo.log"
      row=$(timeout 300 $py bench/hf_baseline.py "$cfg" --routing "$routing" "$@" 2>>"$OUT/nemo.err" | tail -n 1)
      echo "transformers $routing $row" >> "$OUT/nemo.log"
    done
    $py - "$OUT/nemo.log" <<'PY' | tee "$OUT/nemo.txt"
import json, sys
rows = []
for line in open(sys.argv[1]):
    impl, routing, js = (line.rstrip("\n").split(" ", 2) + [""])[:3]
    try:
        rows.append((impl, routing, json.loads(js)))
    except ValueError:
        rows.append((impl, routing, None))
print("%-16s %-9s %10s %8s %9s %9s %8s %8s" % ("impl", "routing", "tok/s/GPU", "TFLOP/s", "peak GiB", "fwd ms", "bwd ms", "step ms"))
for impl, routing, r in rows:
    if r is None:
        print("%-16s %-9s failed (nemo.err)" % (impl, routing))
        continue
    print("%-16s %-9s %10.0f %8.1f %9.2f %9.1f %8.1f %8.1f" % (impl, routing, r["tokens_per_s_per_gpu"], r["model_tflops_per_gpu"],
          r["peak_allocated_gib"], r["fwd_loss_ms"], r["bwd_ms"], r["step_ms"]))
PY
    ;;
  roundtrip)
    /opt/torch/.venv/bin/python tools/check_hf_roundtrip.py --moeforge "$P/bin/moeforge" --fixtures tests/fixtures \
      --work /tmp/roundtrip 2>&1 | grep -v -E "Loading weights|Writing model" | tee "$OUT/roundtrip.log"
    /opt/torch/.venv/bin/python tools/check_peft_roundtrip.py --moeforge "$P/bin/moeforge" --fixtures tests/fixtures \
      --work /tmp/peft_roundtrip 2>&1 | grep -v -E "Loading weights|Writing model" | tee "$OUT/peft_roundtrip.log" ;;
  only)
    timeout 300 "$P/bin/$2" ${3:+--gtest_filter="$3"} > "$OUT/$2.log" 2>&1; echo "$2 rc=$?" | tee -a "$OUT/summary.txt"
    grep -E "^\[  (PASSED|FAILED|SKIPPED|  OK) |Failure|error" "$OUT/$2.log" | tail -n 60 ;;
  bench)
    shift
    name=$1; shift
    MOEFORGE_PHASE_TIMES=${PHASES:-1} timeout 500 "$P/bin/moeforge" bench "$P/configs/$name.json" "$@" 2>&1 | tee -a "$OUT/bench.log" ;;
  kernels)
    shift
    name=$1; shift
    find_ncu kernels
    tag=$(tag_of "${KBIN:-moeforge} $name $*")
    # Caches and clocks left alone (the numbers are the step's, not a cold-cache replay's).
    timeout "${KTIMEOUT:-560}" "$ncu" --csv --print-units base --print-kernel-base function --metrics gpu__time_duration.sum \
      --cache-control none --clock-control none "$P/bin/${KBIN:-moeforge}" bench "$P/configs/$name.json" "$@" \
      > "$OUT/kernels-$tag.csv" 2> "$OUT/kernels-$tag.err"
    echo "ncu rc=$?" | tee -a "$OUT/summary.txt"
    python3 tools/gpu/kernel_table.py ${KFROM:+--from-last "$KFROM"} "$OUT/kernels-$tag.csv" | tee "$OUT/kernels-$tag.txt" | head -n 60 ;;
  profile)
    shift
    name=$1; shift
    find_ncu profile
    tag=$(tag_of "${KERNEL:-device_kernel}-${SKIP:-0} $name $*")
    timeout "${KTIMEOUT:-560}" "$ncu" --set full --kernel-name "regex:${KERNEL:-device_kernel}" --launch-skip "${SKIP:-0}" \
      --launch-count 1 --cache-control none --clock-control none "$P/bin/moeforge" bench "$P/configs/$name.json" "$@" \
      > "$OUT/profile-$tag.txt" 2> "$OUT/profile-$tag.err"
    echo "ncu rc=$?" | tee -a "$OUT/summary.txt"
    grep -v -E "^==PROF==|^  *-+ *$" "$OUT/profile-$tag.txt" | grep -E "Duration|Throughput|Busy|Pipe|Stall|stall|Warp Cycles|Eligible|Issued|Occupancy|Registers|Shared Memory|L2 Hit|L1/TEX Hit|DRAM|Bandwidth|Block Size|Grid Size|bound|OPT" | head -n 80 ;;
  compare)
    shift
    name=$1; shift
    MOEFORGE=$P/bin/moeforge PYTHON=/opt/torch/.venv/bin/python MF_FLAGS=${MF_FLAGS:---optimizer-in-backward} \
      bash bench/compare.sh "$P/configs/$name.json" "$@" 2>&1 | tee -a "$OUT/compare.log" ;;
  ab|envab)
    mode=$1; shift
    if [ "$mode" = envab ]; then
      # The baseline is the same binary under an environment setting: a wrapper script stands in for it.
      setting=$1; shift
      printf '#!/usr/bin/env bash\nexport %s\nexec "%s" "$@"\n' "$setting" "$P/bin/moeforge" > "$P/bin/moeforge_baseline"
      chmod +x "$P/bin/moeforge_baseline"
      echo "moeforge with $setting" > "$P/moeforge_baseline.commit"
    fi
    [ -x "$P/bin/moeforge_baseline" ] || { echo "run.sh ab: the pack has no moeforge_baseline (tools/gpu/build_baseline.sh)" >&2; exit 2; }
    # AB_CONFIG (a file of shared/configs without .json) and AB_LAYERS pick other cases, e.g.
    # AB_CONFIG=gpt-oss-20b AB_LAYERS=4 bash tools/gpu/run.sh ab
    ab_name=${AB_CONFIG:-qwen3-30b-a3b}
    cfg=$P/configs/$ab_name.json
    short=$([ "$ab_name" = qwen3-30b-a3b ] && echo q30 || echo "$ab_name")
    # AB_IN_BACKWARD=0: AdamW after the backward instead (e.g. with --max-grad-norm, which needs it).
    in_backward=(--optimizer-in-backward); [ "${AB_IN_BACKWARD:-1}" = 1 ] || in_backward=()
    common=(--seq 4096 --steps 6 --warmup 2 --precision bf16 "${in_backward[@]}" "$@")
    run_case() {  # label, then the bench arguments; baseline first, then the current build
      local label=$1; shift
      for bin in moeforge_baseline moeforge; do
        row=$("$@" 2>>"$OUT/ab.err" | tail -n 1)
        echo "$label $bin $row" >> "$OUT/ab.log"
        set -- "${@/moeforge_baseline/moeforge}"
      done
    }
    for layers in ${AB_LAYERS:-4 8}; do
      for routing in native balanced; do
        run_case "$short-L$layers-$routing" "$P/bin/moeforge_baseline" bench "$cfg" --layers "$layers" --routing "$routing" "${common[@]}"
      done
    done
    if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
      for routing in native balanced; do
        run_case "$short-48-ep2-$routing" "$P/bin/moeforge_baseline" launch --nproc-per-node 2 -- bench "$cfg" --routing "$routing" "${common[@]}"
      done
    fi
    /opt/torch/.venv/bin/python - "$OUT/ab.log" "$(cat "$P/moeforge_baseline.commit" 2>/dev/null)" <<'PY' | tee "$OUT/ab.txt"
import json, sys
rows = {}
for line in open(sys.argv[1]):
    label, impl, js = line.split(" ", 2)
    try:
        rows.setdefault(label, {})[impl] = json.loads(js)
    except ValueError:
        rows.setdefault(label, {})[impl] = None
print("baseline commit", sys.argv[2])
print("%-22s %12s %12s %7s %10s %10s %7s" % ("case", "base tok/s", "new tok/s", "ratio", "base GiB", "new GiB", "ratio"))
for label, r in rows.items():
    a, b = r.get("moeforge_baseline"), r.get("moeforge")
    if not a or not b:
        print("%-22s failed (see ab.err)" % label)
        continue
    ta, tb = a["tokens_per_s_per_gpu"], b["tokens_per_s_per_gpu"]
    ma, mb = a["peak_allocated_gib"], b["peak_allocated_gib"]
    print("%-22s %12.0f %12.0f %6.3fx %10.2f %10.2f %6.3fx" % (label, ta, tb, tb / ta, ma, mb, mb / ma))
PY
    ;;
  *) echo "run.sh: unknown part '$1' (tests | python | nemo | only | bench | kernels | profile | roundtrip | compare | ab | envab)" >&2; exit 2 ;;
esac
