#!/usr/bin/env bash
# A separate virtual environment with ZipNN 0.5.4 (IBM's lossless coder for model weights) for
# benchmarks/lossless.py. Idempotent.
#
#     bash benchmarks/setup_zipnn.sh            # venv at ${ZIPNN_VENV:-/tmp/zipnn-venv}
#
# Why a separate venv: zipnn is an sdist that compiles its C extension (needs gcc) and pulls its
# own torch; the benchmark talks to it only through benchmarks/zipnn_worker.py in a subprocess, so
# nothing of it is imported into nnc's environment. torch is pinned (a bare `torch` may resolve to
# a multi-GB CUDA build; the 2.13.0 CPU wheel comes from this machine's local index).
set -euo pipefail

VENV="${ZIPNN_VENV:-/tmp/zipnn-venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import zipnn" 2>/dev/null; then
    "$VENV/bin/pip" install -q "torch==2.13.0" numpy "zipnn==0.5.4"
fi
"$VENV/bin/python" -c "import zipnn, numpy; print('zipnn ready in $VENV')"
