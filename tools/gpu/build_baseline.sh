#!/usr/bin/env bash
# On the development machine: builds `moeforge` of another commit (default 858c9bd, the commit
# before issue 16's one model) with this checkout's CUDA build settings, into
# .gpu_check/moeforge_baseline, which tools/gpu/pack.sh then packs beside the current moeforge for
# `run.sh ab` (both binaries benchmarked side by side in one device call).
# usage: tools/gpu/build_baseline.sh [COMMIT]
set -euo pipefail
cd "$(dirname "$0")/../.."
commit=${1:-858c9bd}
src=/tmp/moeforge-baseline-$commit
if [ ! -d "$src" ]; then git worktree add --detach "$src" "$commit"; fi
mkdir -p "$src/.deps"
for d in cutlass cudnn; do [ -e "$src/.deps/$d" ] || ln -s "$PWD/.deps/$d" "$src/.deps/$d"; done
cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DMOEFORGE_CUDA=ON -DMOEFORGE_TESTS=OFF >/dev/null
cmake --build "$src/build" --target moeforge -j "$(nproc)"
mkdir -p .gpu_check
cp "$src/build/moeforge" .gpu_check/moeforge_baseline
echo "$commit" > .gpu_check/moeforge_baseline.commit
echo "build_baseline: .gpu_check/moeforge_baseline from $commit"
