"""Compress and decompress raw weight bytes with ZipNN, timed, and say whether they came back exact.

Runs INSIDE the ZipNN virtual environment (benchmarks/setup_zipnn.sh); benchmarks/lossless.py
calls it as a subprocess.

    $ZIPNN_VENV/bin/python benchmarks/zipnn_worker.py IN.bin DTYPE [--threads 2] [--runs 3]

IN.bin holds the concatenated bytes of a model's tensors of one dtype (float32, float16 or
bfloat16), as a model file stores them. ZipNN is used as its README shows for weights:
ZipNN(input_format="byte", bytearray_dtype=DTYPE) with byte grouping and its automatic method
choice (its defaults), `threads` as given. Prints one JSON document: sizes, the fastest of `runs`
compress and decompress times, and how many bytes the round trip changed.
"""
from __future__ import annotations

import argparse
import json
import time
from importlib.metadata import version

import numpy as np
from zipnn import ZipNN


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("dtype", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    data = open(args.path, "rb").read()
    coder = ZipNN(input_format="byte", bytearray_dtype=args.dtype, threads=args.threads)
    compress_s, decompress_s = [], []
    for _ in range(args.runs):
        started = time.perf_counter()
        packed = coder.compress(data)
        compress_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        restored = coder.decompress(packed)
        decompress_s.append(time.perf_counter() - started)
    original = np.frombuffer(data, np.uint8)
    back = np.frombuffer(bytes(restored), np.uint8)
    changed = int((original != back).sum()) if back.size == original.size else original.size
    print(json.dumps({"zipnn_version": version("zipnn"), "bytes": len(data), "compressed": len(packed),
                      "compress_s": min(compress_s), "decompress_s": min(decompress_s), "changed_bytes": changed}))


if __name__ == "__main__":
    main()
