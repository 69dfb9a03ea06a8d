#!/usr/bin/env bash
# The Python tests: a virtual environment (.venv-tools) with pytest, safetensors and tensorboard
# from PyPI and the moeforge package itself built from this checkout (`pip wheel .` in build-python/
# for the CPU, reused by the next run) and installed from that wheel,
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
# `pip wheel .` then that wheel installed: what `pip install .` does, with the wheel checked too.
echo "pytest.sh: pip wheel . (build-python/), then pip install the wheel" >&2
rm -rf build-python/dist
CMAKE_GENERATOR="Unix Makefiles" CMAKE_BUILD_PARALLEL_LEVEL=${JOBS:-$(nproc)} \
  "$venv/bin/pip" wheel -q --disable-pip-version-check --no-deps . -w build-python/dist -C build-dir=build-python \
  -C cmake.define.MOEFORGE_CUDA=OFF || { echo "pytest.sh: pip wheel . failed" >&2; exit 1; }
"$venv/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps build-python/dist/moeforge-*.whl \
  || { echo "pytest.sh: installing the wheel failed" >&2; exit 1; }
MOEFORGE_CACHE_DIR=${MOEFORGE_CACHE_DIR:-$build/test-cache} MOEFORGE_BIN=${MOEFORGE_BIN:-$build/moeforge} "$venv/bin/python" -m pytest -q python/tests tools/tests
rc=$?
if [ $rc -eq 5 ]; then
  echo "pytest.sh: no Python tests collected" >&2
  rc=0
fi
exit $rc
