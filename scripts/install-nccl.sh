#!/usr/bin/env bash
# Fetches NCCL (headers + library) from PyPI's nvidia-nccl-cu13 wheel into .deps/nccl, for the
# multi-GPU collectives (src/parallel/nccl). CMake runs it when it finds CUDA but no NCCL and a GPU
# answers (MOEFORGE_NCCL=AUTO), or whenever NCCL is missing (MOEFORGE_NCCL=ON). The GPU machine's
# torch environment carries the same NCCL runtime (run with it on LD_LIBRARY_PATH there).
set -euo pipefail
cd "$(dirname "$0")/.."
NCCL_VERSION=${NCCL_VERSION:-2.28.9}
dest=.deps/nccl
if [ -f "$dest/.complete-$NCCL_VERSION" ]; then exit 0; fi
rm -rf "$dest" .deps/nccl-wheel
mkdir -p "$dest" .deps/nccl-wheel
echo "install-nccl: downloading nvidia-nccl-cu13==$NCCL_VERSION" >&2
python3 -m pip download -q --no-deps -d .deps/nccl-wheel "nvidia-nccl-cu13==$NCCL_VERSION"
python3 -m zipfile -e .deps/nccl-wheel/*.whl .deps/nccl-wheel/unpacked
mv .deps/nccl-wheel/unpacked/nvidia/nccl/include "$dest/include"
mv .deps/nccl-wheel/unpacked/nvidia/nccl/lib "$dest/lib"
ln -sf libnccl.so.2 "$dest/lib/libnccl.so"  # the wheel ships only the versioned name
rm -rf .deps/nccl-wheel
touch "$dest/.complete-$NCCL_VERSION"
echo "install-nccl: done ($dest)" >&2
