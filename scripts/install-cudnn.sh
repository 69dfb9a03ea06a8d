#!/usr/bin/env bash
# Fetches cuDNN 9 (headers + libraries) and the cuDNN frontend headers from PyPI into .deps/, for
# building the cuDNN fused-attention path (src/ops/cuda/attention_cudnn.cpp). Optional: without it
# the CUDA backend uses its own attention kernels. The GPU machine's torch environment carries a
# cuDNN 9 runtime of at least this version; point LD_LIBRARY_PATH at it there (docs/testing.md).
set -euo pipefail
cd "$(dirname "$0")/.."
CUDNN_VERSION=${CUDNN_VERSION:-9.19.1.2}
FRONTEND_VERSION=${FRONTEND_VERSION:-1.32.0}
dest=.deps/cudnn
if [ -f "$dest/.complete-$CUDNN_VERSION-$FRONTEND_VERSION" ]; then exit 0; fi
rm -rf "$dest" .deps/wheels
mkdir -p "$dest" .deps/wheels
echo "install-cudnn: downloading nvidia-cudnn-cu13==$CUDNN_VERSION and nvidia-cudnn-frontend==$FRONTEND_VERSION" >&2
python3 -m pip download -q --no-deps -d .deps/wheels "nvidia-cudnn-cu13==$CUDNN_VERSION" \
  "nvidia-cudnn-frontend==$FRONTEND_VERSION"
for w in .deps/wheels/*.whl; do python3 -m zipfile -e "$w" .deps/wheels/unpacked; done
mv .deps/wheels/unpacked/nvidia/cudnn/include "$dest/include"
mv .deps/wheels/unpacked/nvidia/cudnn/lib "$dest/lib"
# The libraries ship only as .so.9; the linker wants the unversioned name.
ln -sf libcudnn.so.9 "$dest/lib/libcudnn.so"
mkdir -p "$dest/frontend"
mv .deps/wheels/unpacked/include "$dest/frontend/include"
rm -rf .deps/wheels
touch "$dest/.complete-$CUDNN_VERSION-$FRONTEND_VERSION"
echo "install-cudnn: done ($dest)" >&2
