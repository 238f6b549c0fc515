"""Pruning benchmark: what each kind of pruning buys on the bundled ONNX sample models.

    python benchmarks/pruning.py [--models resnet mobilenet] [--sparsities 0.3 0.5 0.7] [--quick] [--json out.json]

For every model, kind and sparsity (and, for structured pruning, every importance criterion,
with and without --calib refitting) it prints the parameter count, the bitstream size at the
default QP, onnxruntime latency (median, 1 thread, batch 1 and batch 32) and test accuracy of the
model decoded from the bitstream. Targets it checks (printed, not asserted):
  - structured 50 % on resnet: latency at batch 32 <= 0.45x the original;
  - structured 50 % on resnet with --calib refit: accuracy drop <= 2 points;
  - shapley at least as accurate as l1 at equal sparsity.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import nnc_tool
from nnc_tool.bench.runner import load_eval_data, make_runner, measure_latency, predict
from nnc_tool.prune import PruneConfig, prune

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"


@dataclass
class Row:
    model: str
    kind: str
    sparsity: float
    importance: str
    refit: bool
    parameters: int
    bitstream_bytes: int
    latency_b1_ms: float
    latency_b32_ms: float
    accuracy: float
    prune_seconds: float


def evaluate(model: nnc_tool.Model, x: np.ndarray, y: np.ndarray, runs: int) -> tuple[int, float, float, float]:
    """Bitstream size, latency at batch 1 and 32, and accuracy of the model decoded from the bitstream."""
    data, _ = nnc_tool.compress_model(model)
    rebuilt = nnc_tool.decompress_model(data)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        nnc_tool.write_model(rebuilt, path)
        run = make_runner(path, "onnx", threads=1)
        b1 = measure_latency(run, x[:1], runs, warmup=10).median_ms
        b32 = measure_latency(run, x[:32], runs, warmup=10).median_ms
        accuracy = 100.0 * float((predict(run, x).argmax(1) == y).mean())
    return len(data), b1, b32, accuracy


def weight_parameters(model: nnc_tool.Model) -> int:
    return int(sum(t.array.size for t in model.tensors if t.role != nnc_tool.TensorRole.EXACT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet", "resnet", "mobilenet"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--runs", type=int, default=100, help="latency runs per measurement")
    parser.add_argument("--quick", action="store_true", help="fewer criteria and runs (smoke test)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    x, y = load_eval_data(SAMPLES / "digits_test.npz")
    calibration = load_eval_data(SAMPLES / "digits_calib.npz")[0]
    runs = 20 if args.quick else args.runs
    importances = ["l1", "shapley"] if args.quick else ["l1", "l2", "bn", "random", "activation", "shapley"]

    rows: list[Row] = []
    header = f"{'model':<10} {'kind':<13} {'sparsity':>8} {'importance':<10} {'refit':<5} {'params':>8} {'bytes':>8} {'b1 ms':>7} {'b32 ms':>7} {'acc %':>6} {'prune s':>7}"
    print(header)
    print("-" * len(header))

    def record(name: str, kind: str, sparsity: float, importance: str, refit: bool, model: nnc_tool.Model, seconds: float) -> Row:
        size, b1, b32, acc = evaluate(model, x, y, runs)
        row = Row(name, kind, sparsity, importance, refit, weight_parameters(model), size, b1, b32, acc, seconds)
        rows.append(row)
        print(
            f"{name:<10} {kind:<13} {sparsity:>8.2f} {importance:<10} {str(refit):<5} {row.parameters:>8} {size:>8} "
            f"{b1:>7.3f} {b32:>7.3f} {acc:>6.2f} {seconds:>7.2f}",
            flush=True,
        )
        return row

    for name in args.models:
        original = nnc_tool.read_model(SAMPLES / f"{name}.onnx")
        record(name, "none", 0.0, "-", False, original, 0.0)
        configs: list[tuple[str, PruneConfig]] = []
        for sparsity in args.sparsities:
            configs.append(("unstructured", PruneConfig(method="unstructured", sparsity=sparsity)))
            configs.append(("unstr-global", PruneConfig(method="unstructured", sparsity=sparsity, scope="global")))
            for importance in importances:
                needs_data = importance in ("activation", "shapley")
                for refit in (False, True):
                    configs.append((
                        "structured",
                        PruneConfig(method="structured", sparsity=sparsity, importance=importance,
                                    calibration=calibration if (refit or needs_data) else None, refit=refit),
                    ))
        configs.append(("nm 2:4", PruneConfig(method="nm", nm=(2, 4))))
        configs.append(("nm 2:4 kernel", PruneConfig(method="nm", nm=(2, 4), nm_granularity="kernel")))
        for sparsity in (0.34, 0.67):
            configs.append(("depth", PruneConfig(method="depth", sparsity=sparsity, calibration=calibration)))
        for kind, config in configs:
            started = time.perf_counter()
            try:
                pruned, _ = prune(original, config)
            except nnc_tool.NncError as err:
                print(f"{name:<10} {kind:<13} {config.sparsity:>8.2f} skipped: {err}")
                continue
            record(name, kind, config.sparsity, config.importance if kind == "structured" else "-",
                   config.refit and config.calibration is not None, pruned, time.perf_counter() - started)

    print()
    _check_targets(rows)
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=2))
    return 0


def _check_targets(rows: list[Row]) -> None:
    def find(**match) -> Row | None:
        return next((r for r in rows if all(getattr(r, k) == v for k, v in match.items())), None)

    base = find(model="resnet", kind="none")
    l1_refit = find(model="resnet", kind="structured", sparsity=0.5, importance="l1", refit=True)
    if base and l1_refit:
        print(f"resnet structured 50 % (l1, refit): latency b32 {l1_refit.latency_b32_ms / base.latency_b32_ms:.2f}x "
              f"(target <= 0.45x), accuracy drop {base.accuracy - l1_refit.accuracy:.2f} points (target <= 2)")
    for model in {r.model for r in rows}:
        for sparsity in sorted({r.sparsity for r in rows if r.kind == "structured"}):
            l1 = find(model=model, kind="structured", sparsity=sparsity, importance="l1", refit=False)
            shapley = find(model=model, kind="structured", sparsity=sparsity, importance="shapley", refit=False)
            if l1 and shapley:
                verdict = "ok" if shapley.accuracy >= l1.accuracy else "below l1"
                print(f"{model} structured {sparsity:.2f} no refit: shapley {shapley.accuracy:.2f} % vs l1 {l1.accuracy:.2f} % ({verdict})")


if __name__ == "__main__":
    sys.exit(main())
