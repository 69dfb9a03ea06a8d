#!/usr/bin/env bash
# On the GPU machine: the AdamW kernel variants of ops/cuda/optimizer.cu (MOEFORGE_ADAMW_KERNEL)
# timed by `cuda_ops_bench adamw` (one q30 layer's experts, bf16 policy), each twice in alternation,
# then the optimizer tests under every variant. Logs in $OUT/adamw-variants.txt.
# usage: bash tools/gpu/adamw_variants.sh [VARIANT...]   (default: all)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
P=$PWD/.gpu_check/p
rm -rf "$P" && mkdir -p "$P" && tar -C "$P" -xJf .gpu_check/gpu_pack.tar.xz
source tools/gpu/env.sh
variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(8x2 8x3 4x3 4x4 p8x2 p4x3 p4x2)
for round in 1 2; do
  for v in "${variants[@]}"; do MOEFORGE_ADAMW_KERNEL=$v "$P/bin/cuda_ops_bench" adamw 2>/dev/null; done
done | tee "$OUT/adamw-variants.txt"
for v in "${variants[@]}"; do
  a=$(MOEFORGE_ADAMW_KERNEL=$v "$P/bin/test_cuda_ops" --gtest_filter='CudaOptimizer*' 2>&1 | tail -n 1)
  b=$(MOEFORGE_ADAMW_KERNEL=$v "$P/bin/test_backend_ops" --gtest_filter='*adamw*' 2>&1 | tail -n 1)
  echo "$v: test_cuda_ops CudaOptimizer* $a; test_backend_ops *adamw* $b"
done | tee -a "$OUT/adamw-variants.txt"
