"""Size, ratio, accuracy and coding time of every bundled sample model in every format.

    python benchmarks/sample_models.py [--qp -38] [--runs 30] [--json out.json]

Accuracy is top-1 on sample_models/digits_test.npz, measured on the original file and on the
model rebuilt from the bitstream (onnxruntime for ONNX, torch for TorchScript and .pt2).
State dicts and safetensors have no graph, so only their size and weight SNR are reported.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import nnc_tool
from nnc_tool.bench import bench

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
MODELS = ("mlp", "lenet", "resnet", "mobilenet")
FILES = {"onnx": "{}.onnx", "torchscript": "{}_script.pt", "torch-export": "{}.pt2", "state_dict": "{}_state_dict.pt"}


def measure(path: Path, options: nnc_tool.EncodeOptions, runs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        bitstream = Path(tmp) / "model.nnc"
        encode = nnc_tool.encode(path, bitstream, options)
        started = time.perf_counter()
        nnc_tool.decode(bitstream, Path(tmp) / f"rebuilt{path.suffix}")
        decode_seconds = time.perf_counter() - started
        report = bench(path, nnc_path=bitstream, data_path=SAMPLES / "digits_test.npz", runs=runs, warmup=3)
    row = {
        "file": path.name,
        "format": encode.format,
        "original_bytes": encode.original_bytes,
        "bitstream_bytes": encode.bitstream_bytes,
        "topology_bytes": encode.topology_bytes,
        "ratio": encode.ratio,
        "encode_s": encode.seconds,
        "decode_s": decode_seconds,
        "weight_snr_db": report.weight_snr_db,
    }
    if report.quality is not None:
        row["acc_original"] = report.quality.accuracy_original
        row["acc_rebuilt"] = report.quality.accuracy_rebuilt
        row["latency_original_ms"] = report.latency_original.median_ms
        row["latency_rebuilt_ms"] = report.latency_rebuilt.median_ms
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qp", type=int, default=-38)
    parser.add_argument("--lossless", action="store_true")
    parser.add_argument("--runs", type=int, default=30, help="latency runs per model")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    options = nnc_tool.EncodeOptions(qp=args.qp, lossless=args.lossless)

    rows = []
    header = f"{'file':<24} {'format':<16} {'original':>10} {'bitstream':>10} {'ratio':>7} {'acc orig':>9} {'acc nnc':>8} {'Δ':>6} {'enc s':>6} {'dec s':>6}"
    print(f"QP {args.qp}{' (lossless)' if args.lossless else ''}")
    print(header)
    print("-" * len(header))
    for name in MODELS:
        for pattern in FILES.values():
            path = SAMPLES / pattern.format(name)
            row = measure(path, options, args.runs)
            rows.append(row)
            acc_o, acc_r = row.get("acc_original"), row.get("acc_rebuilt")
            accuracy = (
                f"{acc_o:>8.2f}% {acc_r:>7.2f}% {acc_r - acc_o:>+6.2f}"
                if acc_o is not None
                else f"{'-':>9} {'-':>8} {'-':>6}"
            )
            print(
                f"{row['file']:<24} {row['format']:<16} {row['original_bytes']:>10} {row['bitstream_bytes']:>10} "
                f"{row['ratio']:>6.2f}x {accuracy} {row['encode_s']:>6.3f} {row['decode_s']:>6.3f}"
            )
    drops = [r["acc_original"] - r["acc_rebuilt"] for r in rows if r.get("acc_original") is not None]
    print(f"\nlargest accuracy drop: {max(drops):.2f} points; mean ratio {np.mean([r['ratio'] for r in rows]):.2f}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
