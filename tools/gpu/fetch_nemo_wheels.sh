#!/usr/bin/env bash
# On the development machine: the wheels NeMo AutoModel 0.7.0 (bench/nemo_baseline.py) needs beyond
# the GPU machine's torch venv, for Python 3.12, into .gpu_nemo/wheels (git-ignored), with a slim
# pack of moeforge beside them (the device tool carries 64 MiB with the repository's ~18 MB: these
# are ~22 MB). The list is nemo-automodel's dependency closure minus what the GPU machine has (its
# package list: /work/.library/device/KINDS.md), resolved 2026-12-05, less what the Qwen3-MoE, DeepSeek-V3
# and GPT-OSS models with torch backends never import (checked 2026-12-06: the three model classes import without them): quack-kernels
# and the CUTLASS DSL (its "quack" linear/norm backends; 92 MB with the CUDA library), TVM FFI,
# mistral-common and pycountry (Mistral's tokenizers; 15 MB). Then: run(command="bash tools/gpu/run.sh nemo qwen3-30b-a3b --layers 4", carry=[".gpu_nemo"])
# with PACK_DIR=.gpu_nemo in the command's environment.
# usage: tools/gpu/fetch_nemo_wheels.sh [BUILD_DIR=build]
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .gpu_nemo/wheels && mkdir -p .gpu_nemo/wheels
python3 -m pip download -q --no-deps -d .gpu_nemo/wheels --python-version 3.12 --only-binary=:all: \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  nemo-automodel==0.7.0 transformers==5.18.0 megatron-fsdp==0.5.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
  pydantic==2.14.4 pydantic-core==2.50.5 pydantic-extra-types==2.11.1 \
  annotated-types==0.8.0 typing-inspection==0.4.5 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 \
  referencing==0.37.0 rpds-py==2026.9.1 torchao==0.18.0 torchdata==0.11.0 flashoptim==0.1.4 cuda-python==13.4.4
PACK_BINS=moeforge PACK_DIR=.gpu_nemo bash tools/gpu/pack.sh "${1:-build}"
du -sh .gpu_nemo
