#!/usr/bin/env bash
# The Python tests: a virtual environment (.venv-tools) with pytest, safetensors and tensorboard
# from PyPI and the moeforge package itself installed from this checkout (`pip install .`, built
# in build-python/ for the CPU: the tests run there, and the folder is reused by the next run),
# then pytest over python/tests and tools/tests against the CLI in BUILD_DIR. pytest's exit code 5
# (no tests collected) is not a failure.
# usage: scripts/pytest.sh [BUILD_DIR=build]
set -uo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
venv=${MOEFORGE_PY_VENV:-.venv-tools}
if ! "$venv/bin/python" -c "import pytest, tensorboard, safetensors, numpy" 2>/dev/null; then
  echo "pytest.sh: making $venv" >&2
  python3 -m venv "$venv" && "$venv/bin/pip" install -q --disable-pip-version-check -r tools/requirements-test.txt || exit 1
fi
echo "pytest.sh: pip install . (build-python/)" >&2
CMAKE_GENERATOR="Unix Makefiles" CMAKE_BUILD_PARALLEL_LEVEL=${JOBS:-$(nproc)} \
  "$venv/bin/pip" install -q --disable-pip-version-check . -C build-dir=build-python -C cmake.define.MOEFORGE_CUDA=OFF \
  || { echo "pytest.sh: pip install . failed" >&2; exit 1; }
MOEFORGE_BIN=${MOEFORGE_BIN:-$build/moeforge} "$venv/bin/python" -m pytest -q python/tests tools/tests
rc=$?
if [ $rc -eq 5 ]; then
  echo "pytest.sh: no Python tests collected" >&2
  rc=0
fi
exit $rc
