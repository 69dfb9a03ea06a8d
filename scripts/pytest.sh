#!/usr/bin/env bash
# The Python tests (tools/tests) against the built binary: a virtual environment with what they
# need (tools/requirements-test.txt, from PyPI; made once, reused), then pytest. pytest's exit code
# 5 (no tests collected) is not a failure.
# usage: scripts/pytest.sh [BUILD_DIR=build]
set -uo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
venv=${MOEFORGE_PY_VENV:-.venv-tools}
if ! "$venv/bin/python" -c "import pytest, tensorboard" 2>/dev/null; then
  echo "pytest.sh: making $venv (tools/requirements-test.txt)" >&2
  python3 -m venv "$venv" && "$venv/bin/pip" install -q --disable-pip-version-check -r tools/requirements-test.txt || exit 1
fi
MOEFORGE_BIN=${MOEFORGE_BIN:-$build/moeforge} "$venv/bin/python" -m pytest -q tools/tests
rc=$?
if [ $rc -eq 5 ]; then
  echo "pytest.sh: no Python tests collected" >&2
  rc=0
fi
exit $rc
