"""Lossless coding of the zoo's weights: nnc beside ZipNN, on the same bytes, checked for exactness.

    bash benchmarks/setup_zipnn.sh             # once: ZipNN 0.5.4 in its own venv
    python benchmarks/lossless.py [--models minilm-safetensors,crepe-full] [--dtypes float32,bfloat16]
                                  [--runs 3] [--threads 2] [--zipnn PYTHON] [--json out.json]

For every zoo member (benchmarks/zoo/) and every dtype, the member's float tensors are taken as
nnc reads them and cast to the dtype (float32 as stored; float16 and bfloat16 cast here, as users
ship them). nnc codes the whole model in-process with `compress_model(..., lossless)` and decodes
it with `decompress_model`; ZipNN (its README's settings for weights: byte input with the dtype,
byte grouping, automatic method) compresses the concatenated tensor bytes in its own venv
(benchmarks/zipnn_worker.py). Both are timed without interpreter start-up or file I/O, fastest of
--runs, with --threads threads for ZipNN (nnc uses every core). Ratio = tensor bytes / coded
bytes (nnc's count includes the names, topology and headers of its self-contained bitstream).
Exact = every byte back as it was.

Targets (issue 17): nnc exact everywhere, ratio >= ZipNN's, encode and decode throughput >= 1/3
of ZipNN's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from zoo.base import ZooModel  # noqa: E402
from zoo.registry import members  # noqa: E402

import nnc_tool  # noqa: E402
from nnc_tool.model import Tensor  # noqa: E402

DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
WORKER = Path(__file__).resolve().parent / "zipnn_worker.py"


def cast_model(model: nnc_tool.Model, dtype: np.dtype) -> nnc_tool.Model:
    tensors = [Tensor(t.name, t.array.astype(dtype), t.role) if t.is_float else t for t in model.tensors]
    return replace(model, tensors=tensors)


def float_bytes(model: nnc_tool.Model) -> bytes:
    return b"".join(np.ascontiguousarray(t.array).tobytes() for t in model.tensors if t.is_float)


def ours(model: nnc_tool.Model, runs: int) -> dict:
    options = nnc_tool.EncodeOptions(lossless=True)
    encode_s, decode_s = [], []
    for _ in range(runs):
        started = time.perf_counter()
        stream, _ = nnc_tool.compress_model(model, options)
        encode_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        rebuilt = nnc_tool.decompress_model(stream)
        decode_s.append(time.perf_counter() - started)
    exact = all(a.array.dtype == b.array.dtype and a.array.shape == b.array.shape
                and np.ascontiguousarray(a.array).tobytes() == np.ascontiguousarray(b.array).tobytes()
                for a, b in zip(model.tensors, rebuilt.tensors)) and len(model.tensors) == len(rebuilt.tensors)
    return {"compressed": len(stream), "encode_s": min(encode_s), "decode_s": min(decode_s), "exact": exact}


def zipnn(python: str, data: bytes, dtype: str, runs: int, threads: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".bin") as handle:
        handle.write(data)
        handle.flush()
        done = subprocess.run([python, str(WORKER), handle.name, dtype, "--threads", str(threads), "--runs", str(runs)],
                              capture_output=True, text=True)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["exact"] = result["changed_bytes"] == 0
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=None, help="comma-separated zoo member names (default: all)")
    parser.add_argument("--dtypes", default="float32,float16,bfloat16")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="ZipNN's threads")
    parser.add_argument("--zipnn", default=os.environ.get("ZIPNN_VENV", "/tmp/zipnn-venv") + "/bin/python",
                        help="python of ZipNN's venv (bash benchmarks/setup_zipnn.sh); 'none' skips it")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    chosen: list[ZooModel] = members(args.models)
    use_zipnn = args.zipnn != "none" and Path(args.zipnn).exists()
    rows = []
    for member in chosen:
        model = nnc_tool.read_model(member.fetch())
        for name in args.dtypes.split(","):
            cast = cast_model(model, DTYPES[name])
            data = float_bytes(cast)
            row = {"model": member.name, "dtype": name, "bytes": len(data), "nnc": ours(cast, args.runs)}
            if use_zipnn:
                row["zipnn"] = zipnn(args.zipnn, data, name, args.runs, args.threads)
            rows.append(row)
            print(format_row(row), file=sys.stderr, flush=True)
    print(table(rows, use_zipnn))
    if args.json is not None:
        args.json.write_text(json.dumps({"threads": args.threads, "runs": args.runs, "rows": rows}, indent=2))


def rate(row: dict, side: dict, key: str) -> float:
    return row["bytes"] / side[key] / 1e6 if side.get(key) else float("nan")


def format_row(row: dict) -> str:
    parts = [f"{row['model']} {row['dtype']}"]
    for coder in ("nnc", "zipnn"):
        side = row.get(coder)
        if side is None:
            continue
        if "error" in side:
            parts.append(f"{coder}: {side['error']}")
            continue
        parts.append(f"{coder}: ratio {row['bytes'] / side['compressed']:.3f}, enc {rate(row, side, 'encode_s' if coder == 'nnc' else 'compress_s'):.0f} MB/s, "
                     f"dec {rate(row, side, 'decode_s' if coder == 'nnc' else 'decompress_s'):.0f} MB/s, {'exact' if side['exact'] else 'NOT EXACT'}")
    return "; ".join(parts)


def table(rows: list[dict], with_zipnn: bool) -> str:
    head = "| model | dtype | MB | nnc ratio | nnc enc MB/s | nnc dec MB/s | nnc exact |"
    rule = "|---|---|---|---|---|---|---|"
    if with_zipnn:
        head += " ZipNN ratio | ZipNN enc MB/s | ZipNN dec MB/s | ZipNN exact | ratio >= | enc >= 1/3 | dec >= 1/3 |"
        rule += "---|---|---|---|---|---|---|"
    lines = [head, rule]
    for row in rows:
        ours_, theirs = row["nnc"], row.get("zipnn", {})
        cells = [row["model"], row["dtype"], f"{row['bytes'] / 1e6:.1f}", f"{row['bytes'] / ours_['compressed']:.3f}",
                 f"{rate(row, ours_, 'encode_s'):.0f}", f"{rate(row, ours_, 'decode_s'):.0f}", "yes" if ours_["exact"] else "NO"]
        if with_zipnn:
            if "error" in theirs:
                cells += [theirs["error"]] + [""] * 6
            else:
                ratio = row["bytes"] / theirs["compressed"]
                enc, dec = rate(row, theirs, "compress_s"), rate(row, theirs, "decompress_s")
                cells += [f"{ratio:.3f}", f"{enc:.0f}", f"{dec:.0f}", "yes" if theirs["exact"] else
                          f"no ({theirs['changed_bytes']} B changed)",
                          "yes" if row["bytes"] / ours_["compressed"] >= ratio else "NO",
                          "yes" if rate(row, ours_, "encode_s") >= enc / 3 else "NO",
                          "yes" if rate(row, ours_, "decode_s") >= dec / 3 else "NO"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
