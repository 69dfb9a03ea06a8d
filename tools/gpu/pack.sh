#!/usr/bin/env bash
# On the development machine: packs a CUDA build's GPU test binaries and moeforge, with the shared
# libraries the GPU machine lacks (everything ldd resolves outside glibc, libstdc++/libgcc, the
# driver and /usr/local/cuda, whose libraries come from the GPU machine's torch venv there), and
# shared/configs, into .gpu_check/gpu_pack.tar.xz (git-ignored; the device tool's carry limit is
# 64 MiB, this is ~15 MB). Then: run(command="bash tools/gpu/run.sh tests", carry=[".gpu_check"]).
# usage: tools/gpu/pack.sh [BUILD_DIR=build]
#   PACK_BINS="moeforge" packs only those binaries (a slim pack beside other carried files, e.g.
#   NeMo AutoModel's wheels: tools/gpu/fetch_nemo_wheels.sh); PACK_DIR puts it elsewhere than .gpu_check.
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${1:-build}
dir=${PACK_DIR:-.gpu_check}
stage=$dir/stage
rm -rf "$stage" && mkdir -p "$stage/bin" "$stage/lib" "$stage/configs"
for b in ${PACK_BINS:-tests/test_backend_ops tests/test_cuda_ops tests/test_cuda_model tests/test_cuda_training tests/test_cuda_dist moeforge cuda_ops_bench}; do
  if [ -f "$build/$b" ]; then cp "$build/$b" "$stage/bin/" && strip "$stage/bin/$(basename "$b")"; fi
done
[ -f "$stage/bin/moeforge" ] || { echo "pack: $build/moeforge not found (build with the CUDA backend first)" >&2; exit 1; }
# A build without cuDNN runs attention on the native kernels (q30-L4 steps took 679 ms on an H200 in
# session 16, against ~46 ms with cuDNN on an H100): its bench numbers compare with nothing, and a
# fresh machine configures without it (no GPU here to fetch it for).
if "$build/moeforge" --version 2>/dev/null | grep -q "cuDNN fused attention off" && [ -z "${ALLOW_NO_CUDNN:-}" ]; then
  echo "pack: $build was configured without cuDNN (reconfigure with -DMOEFORGE_CUDNN=ON; ALLOW_NO_CUDNN=1 packs it anyway)" >&2
  exit 1
fi
# A baseline build of another commit (tools/gpu/build_baseline.sh), for run.sh ab.
if [ -z "${PACK_BINS:-}" ] && [ -f build-baseline/moeforge_baseline ]; then
  cp build-baseline/moeforge_baseline "$stage/bin/moeforge_baseline" && strip "$stage/bin/moeforge_baseline"
  cp build-baseline/moeforge_baseline.commit "$stage/"
fi
# The Python extension built for the GPU machine's Python 3.12 (tools/gpu/build_python_ext.sh), for
# run.sh python.
ext=$(ls build-py312/_moeforge*.so 2>/dev/null | head -n 1 || true)
if [ -z "${PACK_BINS:-}" ] && [ -n "$ext" ]; then mkdir -p "$stage/python" && cp "$ext" "$stage/python/" && strip "$stage/python/$(basename "$ext")"; fi
for b in "$stage"/bin/* "$stage"/python/*.so; do [ -f "$b" ] || continue; ldd "$b" | awk '/=>/ {print $3}'; done | sort -u | while read -r lib; do
  case "$lib" in
    */libc.so*|*/libm.so*|*/libpthread*|*/libdl.so*|*/librt.so*|*/ld-linux*|*/libcuda.so*|/usr/local/cuda*|*/libgcc_s*|*/libstdc++*) ;;
    */libcudnn*|*/libnccl*) ;;  # the GPU machine's torch venv has cuDNN and NCCL (run.sh puts them first on LD_LIBRARY_PATH)
    *) cp -L "$lib" "$stage/lib/" ;;
  esac
done
if [ -d ../shared/configs ]; then cp ../shared/configs/*.json "$stage/configs/"; fi
tar -C "$stage" -cJf "$dir/gpu_pack.tar.xz" .
rm -rf "$stage"
ls -la "$dir/gpu_pack.tar.xz"
