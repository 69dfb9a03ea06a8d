#!/usr/bin/env bash
# On the development machine: downloads the pure-Python (and manylinux) wheels the GPU machine's
# torch venv may lack for the LoRA baseline (PEFT and what it imports) and the Python package's
# tests (pytest) into .gpu_check/wheels; the
# GPU machine cannot reach PyPI, so run.sh unpacks the missing ones onto PYTHONPATH there.
# usage: tools/gpu/fetch_wheels.sh [PIP=python3 -m pip]
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .gpu_check/wheels
${PIP:-python3 -m pip} download --no-deps -d .gpu_check/wheels peft==0.21.2 accelerate==1.16.0 psutil pyyaml pytest pluggy iniconfig \
  --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64
ls -la .gpu_check/wheels
