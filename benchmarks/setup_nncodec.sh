#!/usr/bin/env bash
# Set up a separate virtual environment with NNCodec 2.1.3 (Fraunhofer HHI's MPEG NNC reference
# software) for benchmarks/rd_vs_nncodec.py. Idempotent: re-running only fills in what is missing.
#
#     bash benchmarks/setup_nncodec.sh            # venv at ${NNCODEC_VENV:-/tmp/nncodec-venv}
#     NNCODEC_VENV=~/venvs/nncodec bash benchmarks/setup_nncodec.sh
#
# Why a separate venv: nncodec requires numpy<2, our package runs on numpy 2. The benchmark talks to
# it only through a subprocess (benchmarks/nncodec_worker.py); nncodec is never imported here.
#
# What gets installed and why:
#   - numpy<2, torch==2.13.0 (pinned: a bare `torch` may resolve to a multi-GB CUDA build; the
#     2.13.0 CPU wheel is served from this machine's local index), and the packages nncodec's
#     coding path imports at import time: h5py, scikit-learn, tqdm, pandas.
#   - nncodec==2.1.3 with --no-deps: it is an sdist that compiles its DeepCABAC C++ extension
#     (needs g++; pybind11 comes from the build isolation). Its declared deps also pull
#     opencv-python (needs numpy>=2 in recent releases), torchvision, ptflops, torchmetrics and
#     Click, none of which the coding API (nncodec.nn.encode / decode) uses.
#   - Two stub packages, torchvision and cv2, written into the venv's site-packages. They are
#     needed: `import nncodec.nn` -> nncodec.nnc.compression -> nncodec.framework.use_case_init
#     -> nncodec.framework.applications.{datasets,utils}, which at import time do
#     `from torchvision import datasets, transforms`, subclass `datasets.ImageFolder` and build
#     `transforms.Compose([transforms.Resize(256), ...])`, and `import cv2` (cv2 is used only
#     inside data-loading functions). Nothing in the coding path calls them. The stubs return a
#     dummy class for any attribute, so those module-level statements succeed; any real use
#     raises. Set NNCODEC_REAL_TORCHVISION=1 to install the real torchvision 0.28.0 (local wheel
#     matching torch 2.13.0) instead of the torchvision stub.
set -euo pipefail

VENV="${NNCODEC_VENV:-/tmp/nncodec-venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --quiet)

if ! "$PY" -c "import numpy, torch, h5py, sklearn, tqdm, pandas; assert numpy.__version__ < '2'; assert torch.__version__.startswith('2.13.0')" 2>/dev/null; then
    "${PIP[@]}" "numpy<2" "torch==2.13.0" h5py scikit-learn tqdm pandas
fi

if ! "$PY" -c "import importlib.metadata as m; assert m.version('nncodec') == '2.1.3'" 2>/dev/null; then
    # Compiling DeepCABAC takes a minute or two; keep it at low priority on a shared machine.
    MAX_JOBS=1 nice -n 10 "${PIP[@]}" --no-deps "nncodec==2.1.3"
fi

SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

write_stub() {  # write_stub PACKAGE SUBMODULE...
    local pkg="$1"; shift
    # Never overwrite a real installation.
    if [ -e "$SITE/$pkg" ] && [ ! -e "$SITE/$pkg/NNCODEC_BENCHMARK_STUB" ]; then
        return 0
    fi
    mkdir -p "$SITE/$pkg"
    touch "$SITE/$pkg/NNCODEC_BENCHMARK_STUB"
    local body
    body='"""Stub written by nnc benchmarks/setup_nncodec.sh so that nncodec imports; not the real package."""


class _Stub:
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{__name__} is a stub: only nncodec'"'"'s coding API is supported here")


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return type(name, (_Stub,), {})
'
    printf '%s' "$body" > "$SITE/$pkg/__init__.py"
    for sub in "$@"; do
        printf '%s' "$body" > "$SITE/$pkg/$sub.py"
        # Bind the submodule as an attribute, or `from pkg import sub` would get __getattr__'s dummy.
        # (`from . import sub` would not do: it finds the attribute via __getattr__ and stops.)
        printf '\n%s = __import__("importlib").import_module(__name__ + ".%s")\n' "$sub" "$sub" >> "$SITE/$pkg/__init__.py"
    done
}

if [ "${NNCODEC_REAL_TORCHVISION:-0}" = "1" ]; then
    if [ -e "$SITE/torchvision/NNCODEC_BENCHMARK_STUB" ]; then rm -r "$SITE/torchvision"; fi
    "$PY" -c "import torchvision" 2>/dev/null || "${PIP[@]}" --no-deps "torchvision==0.28.0"
else
    write_stub torchvision datasets transforms
fi
write_stub cv2

"$PY" - <<'EOF'
import tempfile
import numpy as np
from nncodec import nn as nncodec_nn
params = {"w": np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8), "b": np.zeros(8, np.float32)}
bs = nncodec_nn.encode(params, args={"qp": -32, "verbose": False, "results": tempfile.mkdtemp()})
rec = nncodec_nn.decode(bytearray(bs), args={"verbose": False})
assert set(rec) == set(params), rec.keys()
print(f"nncodec OK: smoke test coded {len(bs)} bytes", flush=True)
EOF
echo "$VENV"
