#!/usr/bin/env bash
# On the development machine: builds the Python extension (_moeforge, CUDA backend) for the GPU
# machine's Python 3.12 into build-py312/, for tools/gpu/pack.sh and `run.sh python`. The GPU machine
# has no PyPI and this machine no Python 3.12, so the extension is built here against that Python's
# headers, brought back from the GPU machine once (a Linux extension module needs nothing else of
# its Python): a folder holding python3.12/ (Ubuntu's /usr/include/python3.12) and
# x86_64-linux-gnu/python3.12/pyconfig.h (the multiarch header the first one includes).
# usage: tools/gpu/build_python_ext.sh PY312_INCLUDE_ROOT [PYTHON_WITH_NANOBIND=python3]
set -euo pipefail
cd "$(dirname "$0")/../.."
root=${1:?usage: build_python_ext.sh PY312_INCLUDE_ROOT [PYTHON_WITH_NANOBIND]}
py=${2:-python3}
[ -f "$root/python3.12/Python.h" ] || { echo "build_python_ext: $root/python3.12/Python.h not found" >&2; exit 1; }
root=$(cd "$root" && pwd)  # absolute: the compiler runs inside build-py312
"$py" -m nanobind --cmake_dir > /dev/null || { echo "build_python_ext: $py has no nanobind (pip install nanobind)" >&2; exit 1; }
cmake -S . -B build-py312 -DCMAKE_BUILD_TYPE=Release -DMOEFORGE_PYTHON=ON -DMOEFORGE_TESTS=OFF \
  -DPython_EXECUTABLE="$(command -v "$py")" -DMOEFORGE_PYTHON_INCLUDE_DIR="$root/python3.12" \
  -DCMAKE_CXX_FLAGS="-isystem $root"
cmake --build build-py312 -j"$(nproc)" --target _moeforge
ls -la build-py312/_moeforge*.so
