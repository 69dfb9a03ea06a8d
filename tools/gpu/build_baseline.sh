#!/usr/bin/env bash
# On the development machine: builds `moeforge` of another commit (default 858c9bd, the commit
# before issue 16's one model) with this checkout's CUDA build settings, into
# build-baseline/moeforge_baseline, which tools/gpu/pack.sh then packs beside the current moeforge for
# `run.sh ab` (both binaries benchmarked side by side in one device call).
# usage: tools/gpu/build_baseline.sh [COMMIT]
set -euo pipefail
cd "$(dirname "$0")/../.."
commit=${1:-858c9bd}
src=/tmp/moeforge-baseline-$commit
if [ ! -d "$src" ]; then git worktree add --detach "$src" "$commit"; fi
mkdir -p "$src/.deps"
for d in cutlass cudnn; do [ -e "$src/.deps/$d" ] || ln -s "$PWD/.deps/$d" "$src/.deps/$d"; done
launcher=()
if command -v ccache >/dev/null 2>&1; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
fi
cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DMOEFORGE_CUDA=ON -DMOEFORGE_CUDNN=ON -DMOEFORGE_TESTS=OFF \
  "${launcher[@]}" >/dev/null
cmake --build "$src/build" --target moeforge -j "$(nproc)"
mkdir -p build-baseline
cp "$src/build/moeforge" build-baseline/moeforge_baseline
echo "$commit" > build-baseline/moeforge_baseline.commit
echo "build_baseline: build-baseline/moeforge_baseline from $commit"
