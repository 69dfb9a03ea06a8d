#!/usr/bin/env bash
# Fetches CUTLASS's C++ headers (cutlass/, cute/) from the nvidia-cutlass wheel on PyPI into
# .deps/cutlass/include, for building the Hopper grouped expert GEMMs (src/ops/cuda/cutlass/).
# Optional: without it, ragged experts go through cuBLAS's grouped call. Header-only: nothing is
# needed at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
CUTLASS_VERSION=${CUTLASS_VERSION:-4.2.0.0}
dest=.deps/cutlass
if [ -f "$dest/.complete-$CUTLASS_VERSION" ]; then exit 0; fi
rm -rf "$dest" .deps/cutlass-wheel
mkdir -p "$dest" .deps/cutlass-wheel
echo "install-cutlass: downloading nvidia-cutlass==$CUTLASS_VERSION" >&2
python3 -m pip download -q --no-deps -d .deps/cutlass-wheel "nvidia-cutlass==$CUTLASS_VERSION"
python3 - "$dest" .deps/cutlass-wheel/*.whl <<'PY'
import os, sys, zipfile
dest, wheel = sys.argv[1], sys.argv[2]
prefix = "cutlass_library/source/include/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = dest + "/include/" + name[len(prefix):]
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(name) as src, open(target, "wb") as out:
                out.write(src.read())
PY
rm -rf .deps/cutlass-wheel
touch "$dest/.complete-$CUTLASS_VERSION"
echo "install-cutlass: done ($dest/include)" >&2
