"""Rate-quality sweeps: encode, decode and measure a model at many QPs and sparsities.

    axis = parse_sweep("qp=-44:-14:3")          # -44, -41, ..., -14
    report = sweep("model.onnx", axis.values, sparsities=(0.0, 0.3), pruning=PruneConfig("structured"),
                   data_path="eval.npz")
    json.dumps(report.to_dict())

The original model is read, timed and run once (runner.prepare_reference); every point is one
`api.encode` + `api.decode` measured against it, so points differ only by their settings.
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import UsageError
from ..units import parse_sparsities  # noqa: F401 - where sweeps take them from
from ..inputs import ModelInputs
from ..quantize.uniform import QuantSettings
from .runner import BenchReport, LatencyStats, bench, compare_outputs, prepare_reference

SWEEP_AXES = ("qp",)
QP_RANGE = (-256, 255)
_NUMBER = r"[+-]?\d+"


@dataclass(frozen=True)
class SweepAxis:
    name: str
    values: tuple[int, ...]


def parse_sweep(text: str) -> SweepAxis:
    """`qp=START:STOP:STEP` (STOP included when a step lands on it) or `qp=A,B,C`.

    Raises UsageError with what was wrong and what is accepted.
    """
    name, sep, spec = text.partition("=")
    name = name.strip().lower()
    if not sep or not spec.strip():
        raise UsageError(None, f"--sweep expects AXIS=VALUES such as qp=-44:-14:3 or qp=-40,-36,-30, got {text!r}")
    if name not in SWEEP_AXES:
        hint = " (sparsities go in --sparsity 0,0.3,0.5)" if name == "sparsity" else ""
        raise UsageError(None, f"--sweep can vary {', '.join(SWEEP_AXES)}, not {name!r}{hint}")
    spec = spec.strip()
    if ":" in spec:
        parts = spec.split(":")
        if len(parts) != 3 or not all(re.fullmatch(_NUMBER, p.strip()) for p in parts):
            raise UsageError(None, f"--sweep {name}=START:STOP:STEP takes three integers, got {spec!r}")
        start, stop, step = (int(p) for p in parts)
        if step == 0:
            raise UsageError(None, f"--sweep {text!r}: STEP must not be 0")
        if (stop - start) * step < 0:
            raise UsageError(None, f"--sweep {text!r}: a step of {step} never goes from {start} to {stop}")
        values = tuple(range(start, stop + (1 if step > 0 else -1), step))
    else:
        items = [p.strip() for p in spec.split(",")]
        if not all(re.fullmatch(_NUMBER, p) for p in items):
            raise UsageError(None, f"--sweep {name}=A,B,C takes integers, got {spec!r}")
        values = tuple(dict.fromkeys(int(p) for p in items))  # drop repeats, keep the order given
    low, high = QP_RANGE
    outside = [v for v in values if not low <= v <= high]
    if outside:
        raise UsageError(None, f"--sweep {name} values must lie in [{low}, {high}], got {outside[0]}")
    return SweepAxis(name, values)


@dataclass
class SweepPoint:
    qp: int
    sparsity: float
    bench: BenchReport

    @property
    def latency_ratio(self) -> float | None:
        original, rebuilt = self.bench.latency_original, self.bench.latency_rebuilt
        if original is None or rebuilt is None or original.median_ms <= 0:
            return None
        return rebuilt.median_ms / original.median_ms

    @property
    def accuracy(self) -> float | None:
        return None if self.bench.quality is None else self.bench.quality.accuracy_rebuilt

    def to_dict(self) -> dict:
        b, q, lat = self.bench, self.bench.quality, self.bench.latency_rebuilt
        return {
            "qp": self.qp,
            "sparsity": self.sparsity,
            "bitstream_bytes": b.bitstream_bytes,
            "ratio": b.ratio,
            "encode_seconds": b.encode_seconds,
            "decode_seconds": b.decode_seconds,
            "latency_median_ms": None if lat is None else lat.median_ms,
            "latency_p10_ms": None if lat is None else lat.p10_ms,
            "latency_p90_ms": None if lat is None else lat.p90_ms,
            "latency_ratio": self.latency_ratio,
            "accuracy": None if q is None else q.accuracy_rebuilt,
            "top1_agreement": None if q is None else q.top1_agreement,
            "output_snr_db": None if q is None else q.output_snr_db,
            "weight_snr_db": b.weight_snr_db,
            "notes": list(b.notes),
        }


@dataclass
class SweepReport:
    model: str
    format: str
    original_bytes: int
    prune_method: str | None
    latency_original: LatencyStats | None
    accuracy_original: float | None  # percent; None without labels
    samples: int | None
    data: str | None = None  # evaluation data; None = probe inputs (no accuracy)
    points: list[SweepPoint] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        return self.accuracy_original is not None

    @property
    def sparsities(self) -> list[float]:
        return list(dict.fromkeys(p.sparsity for p in self.points))

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "format": self.format,
            "original_bytes": self.original_bytes,
            "prune": self.prune_method,
            "samples": self.samples,
            "data": self.data,
            "accuracy_original": self.accuracy_original,
            "latency_original": None if self.latency_original is None else dataclasses.asdict(self.latency_original),
            "points": [p.to_dict() for p in self.points],
            "notes": list(self.notes),
        }


def sweep(
    model_path: str | os.PathLike,
    qps: Sequence[int],
    sparsities: Sequence[float] = (0.0,),
    options: QuantSettings | None = None,
    pruning=None,
    data_path: str | os.PathLike | None = None,
    runs: int = 50,
    warmup: int = 5,
    batch_size: int = 1,
    threads: int = 1,
    fold_batchnorm: bool = True,
    calibration: ModelInputs | np.ndarray | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_point: Callable[[SweepPoint], None] | None = None,
) -> SweepReport:
    """Measure every (sparsity, qp) of the cross product against one measurement of the original.

    `options` supplies everything but the QP; `pruning` (a PruneConfig) supplies the pruning
    method and its settings, its sparsity replaced by each of `sparsities` (0 = no pruning).
    `progress(done, total)` is called after each point, `on_point(point)` with each result.
    """
    if not qps:
        raise UsageError(None, "a sweep needs at least one QP")
    if any(s > 0 for s in sparsities) and pruning is None:
        raise UsageError(None, "sweeping sparsities needs a pruning method (--prune)")
    options = options or QuantSettings()
    if options.bits is not None or options.lossless:
        raise UsageError(None, f"sweeping the QP does nothing with {'--bits' if options.bits is not None else '--lossless'}")
    reference = prepare_reference(model_path, data_path, runs, warmup, batch_size, threads)
    accuracy_original = None
    if reference.outputs is not None and reference.labels is not None:
        accuracy_original = compare_outputs(reference.outputs, reference.outputs, reference.labels).accuracy_original
    report = SweepReport(
        model=str(reference.path),
        format=reference.format,
        original_bytes=reference.original_bytes,
        prune_method=None if pruning is None else pruning.method,
        latency_original=reference.latency,
        accuracy_original=accuracy_original,
        samples=None if reference.inputs is None else len(reference.inputs),
        data=None if data_path is None else str(data_path),
        notes=list(reference.notes),
    )
    total = len(qps) * len(sparsities)
    for sparsity in sparsities:
        point_pruning = dataclasses.replace(pruning, sparsity=sparsity) if sparsity > 0 else None
        for qp in qps:
            result = bench(reference.path, options=dataclasses.replace(options, qp=qp), pruning=point_pruning,
                           fold_batchnorm=fold_batchnorm, calibration=calibration, reference=reference)
            # The reference's notes are the sweep's, not every point's.
            result.notes = [n for n in result.notes if n not in reference.notes]
            point = SweepPoint(qp=qp, sparsity=sparsity, bench=result)
            report.points.append(point)
            if on_point is not None:
                on_point(point)
            if progress is not None:
                progress(len(report.points), total)
    return report
