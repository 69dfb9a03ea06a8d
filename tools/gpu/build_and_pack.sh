#!/usr/bin/env bash
# On the development machine, from a fresh checkout: everything before the first device call in
# one command. Installs the build's dependencies and CUTLASS (make deps), configures `build` with the
# CUDA backend and -DMOEFORGE_CUDNN=ON, which fetches cuDNN when it is missing (a machine without a
# GPU would otherwise leave cuDNN out, and attention on the native kernels makes every bench number
# meaningless: q30-L4 steps of ~679 ms against ~46), through ccache when it is installed, builds
# everything and packs it (tools/gpu/pack.sh). ~15 minutes on 2 cores from nothing, a minute or two after a small change.
# Then: run(command="bash tools/gpu/run.sh tests", carry=[".gpu_check"]).
# usage: tools/gpu/build_and_pack.sh [BUILD_DIR=build]
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${1:-build}
make deps >/dev/null
launcher=()
if command -v ccache >/dev/null 2>&1; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
fi
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DMOEFORGE_CUDA=ON -DMOEFORGE_CUDNN=ON "${launcher[@]}" >/dev/null
cmake --build "$build" -j "$(nproc)"
"$build/moeforge" --version
bash tools/gpu/pack.sh "$build"
