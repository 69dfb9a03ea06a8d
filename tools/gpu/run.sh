#!/usr/bin/env bash
# On the GPU machine (the device tool runs it in a copy of the repo, $OUT collected): unpacks
# tools/gpu/pack.sh's tarball and
#   tests               runs the GPU tests (summary lines in $OUT/summary.txt, logs beside it); with
#                       2+ GPUs the multi-GPU ones again with MOEFORGE_EP_CHUNKS=2
#   roundtrip           tools/check_hf_roundtrip.py: every fixture through `moeforge convert`, loaded
#                       by the machine's Transformers next to its source (log in $OUT/roundtrip.log)
#   compare ARGS...     bench/compare.sh CONFIG-NAME ARGS with the packed moeforge and the machine's
#                       Transformers (NPROC=N for N GPUs), e.g.
#                       NPROC=8 bash tools/gpu/run.sh compare qwen3-30b-a3b --routing native --seq 4096
#                       (CONFIG-NAME: a file of shared/configs without .json)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
P=$PWD/.gpu_check/p
rm -rf "$P" && mkdir -p "$P" && tar -C "$P" -xJf .gpu_check/gpu_pack.tar.xz
V=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
export LD_LIBRARY_PATH=$V/cudnn/lib:$V/nccl/lib:$V/cublas/lib:$V/cu13/lib:$P/lib:${LD_LIBRARY_PATH:-}
export MOEFORGE_FIXTURES_DIR=$PWD/tests/fixtures MOEFORGE_BIN_PATH=$P/bin/moeforge
export NCCL_NVLS_ENABLE=0  # NVLink multicast stays off on the shared machines
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/nvidia-smi.txt" 2>&1
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
    cat "$OUT/summary.txt" ;;
  roundtrip)
    /opt/torch/.venv/bin/python tools/check_hf_roundtrip.py --moeforge "$P/bin/moeforge" --fixtures tests/fixtures \
      --work /tmp/roundtrip 2>&1 | grep -v -E "Loading weights|Writing model" | tee "$OUT/roundtrip.log" ;;
  compare)
    shift
    name=$1; shift
    MOEFORGE=$P/bin/moeforge PYTHON=/opt/torch/.venv/bin/python MF_FLAGS=${MF_FLAGS:---optimizer-in-backward} \
      bash bench/compare.sh "$P/configs/$name.json" "$@" 2>&1 | tee -a "$OUT/compare.log" ;;
  *) echo "run.sh: unknown part '$1' (tests | roundtrip | compare)" >&2; exit 2 ;;
esac
