"""Peak memory of `nnc encode` / `nnc decode` on a large ONNX model with external data.

    python benchmarks/memory.py [--params 100] [--qp -38] [--keep]

Builds (once, cached in benchmarks/.cache/) a decoder-only-transformer-shaped ONNX model with
about `--params` million float32 parameters stored in an external data file: a 32 000 x 1 024
embedding table (Gather), then blocks of LayerNorm + two MatMuls (1 024 -> 4 096 -> 1 024) with
biases and a residual Add, then a final LayerNorm and a 1 024 x 32 000 output projection when
the budget allows. Weights are Student-t (5 degrees of freedom) scaled like trained transformer
weights, so they are heavy-tailed like real ones rather than Gaussian.

Runs `nnc encode` and `nnc decode` as separate processes under `/usr/bin/time -v` and reports
their wall time and maximum resident set size against the fp32 weight bytes. The issue's target:
peak RSS of encode under 1.5x the weight bytes.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"
VOCAB, WIDTH, HIDDEN = 32000, 1024, 4096


def _external(name: str, array: np.ndarray, data_file, location: str) -> onnx.TensorProto:
    """An initializer whose bytes go straight to the open data file (no 400 MB proto in memory)."""
    offset = data_file.tell()
    data_file.write(np.ascontiguousarray(array, dtype="<f4").tobytes())
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(array.shape))
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(array.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def build_model(path: Path, million_params: int, seed: int = 0) -> int:
    """Write the model and its `.data` file; returns the parameter count."""
    rng = np.random.default_rng(seed)

    def weight(*shape: int, fan_in: int) -> np.ndarray:
        return (rng.standard_t(5, size=shape) * (0.6 / np.sqrt(fan_in))).astype(np.float32)

    def small(n: int, centre: float, spread: float) -> np.ndarray:
        return (centre + spread * rng.standard_normal(n)).astype(np.float32)

    budget = million_params * 1_000_000
    block_params = 2 * WIDTH * HIDDEN + HIDDEN + WIDTH + 2 * WIDTH
    head_params = WIDTH * VOCAB
    embed_params = VOCAB * WIDTH
    blocks = max(1, (budget - embed_params - head_params) // block_params)
    with_head = embed_params + blocks * block_params + head_params <= budget * 1.05
    if not with_head:
        blocks = max(1, (budget - embed_params) // block_params)

    location = path.name + ".data"
    initializers, nodes = [], []
    count = 0
    with open(path.with_name(location), "wb") as data_file:
        def add(name: str, array: np.ndarray) -> str:
            nonlocal count
            initializers.append(_external(name, array, data_file, location))
            count += array.size
            return name

        add("embed.weight", weight(VOCAB, WIDTH, fan_in=WIDTH))
        nodes.append(helper.make_node("Gather", ["embed.weight", "tokens"], ["h0"], axis=0))
        current = "h0"
        for b in range(blocks):
            p = f"blocks.{b}"
            add(f"{p}.ln.weight", small(WIDTH, 1.0, 0.1))
            add(f"{p}.ln.bias", small(WIDTH, 0.0, 0.02))
            add(f"{p}.up.weight", weight(WIDTH, HIDDEN, fan_in=WIDTH))
            add(f"{p}.up.bias", small(HIDDEN, 0.0, 0.02))
            add(f"{p}.down.weight", weight(HIDDEN, WIDTH, fan_in=HIDDEN))
            add(f"{p}.down.bias", small(WIDTH, 0.0, 0.02))
            nodes += [
                helper.make_node("LayerNormalization", [current, f"{p}.ln.weight", f"{p}.ln.bias"], [f"{p}.n"], axis=-1),
                helper.make_node("MatMul", [f"{p}.n", f"{p}.up.weight"], [f"{p}.u"]),
                helper.make_node("Add", [f"{p}.u", f"{p}.up.bias"], [f"{p}.ub"]),
                helper.make_node("Relu", [f"{p}.ub"], [f"{p}.r"]),
                helper.make_node("MatMul", [f"{p}.r", f"{p}.down.weight"], [f"{p}.d"]),
                helper.make_node("Add", [f"{p}.d", f"{p}.down.bias"], [f"{p}.db"]),
                helper.make_node("Add", [current, f"{p}.db"], [f"{p}.out"]),
            ]
            current = f"{p}.out"
        if with_head:
            add("head.weight", weight(WIDTH, VOCAB, fan_in=WIDTH))
            nodes.append(helper.make_node("MatMul", [current, "head.weight"], ["logits"]))
            current = "logits"
    graph = helper.make_graph(
        nodes, "big", [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, None)], initializer=initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(proto, path)
    return count


def _measure(command: list[str]) -> tuple[float, int, str]:
    """Wall seconds, max RSS in bytes and stdout of one command under /usr/bin/time -v."""
    started = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return seconds, rss_kb * 1024, done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=100, help="millions of parameters")
    parser.add_argument("--qp", type=int, default=-38)
    parser.add_argument("--keep", action="store_true", help="keep the bitstream and decoded model in .cache")
    args = parser.parse_args()

    CACHE.mkdir(parents=True, exist_ok=True)
    model = CACHE / f"big{args.params}m.onnx"
    if not model.exists() or not model.with_name(model.name + ".data").exists():
        started = time.perf_counter()
        count = build_model(model, args.params)
        print(f"built {model} ({count / 1e6:.1f} M parameters) in {time.perf_counter() - started:.1f} s")
    weight_bytes = model.with_name(model.name + ".data").stat().st_size
    nnc = [sys.executable, "-m", "nnc_tool.cli"]
    with tempfile.TemporaryDirectory(prefix="nnc-memory-", dir=CACHE if args.keep else None) as tmp:
        out = Path(tmp) / "big.nnc"
        rebuilt = Path(tmp) / "big_rebuilt.onnx"
        baseline = _measure([sys.executable, "-c", "import nnc_tool.cli, onnx, onnxruntime"])
        enc = _measure([*nnc, "encode", str(model), "-o", str(out), "--qp", str(args.qp)])
        dec = _measure([*nnc, "decode", str(out), "-o", str(rebuilt)])
        print(enc[2])
        print(dec[2])
        mb = 1e6
        print(f"fp32 weights: {weight_bytes / mb:.1f} MB; interpreter + imports alone: {baseline[1] / mb:.0f} MB")
        print(f"encode: {enc[0]:.1f} s, peak RSS {enc[1] / mb:.0f} MB = {enc[1] / weight_bytes:.2f}x weights")
        print(f"decode: {dec[0]:.1f} s, peak RSS {dec[1] / mb:.0f} MB = {dec[1] / weight_bytes:.2f}x weights")
        print(f"bitstream {out.stat().st_size / mb:.1f} MB (ratio {weight_bytes / out.stat().st_size:.2f}x)")


if __name__ == "__main__":
    main()
