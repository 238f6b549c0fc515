"""Deployment gates: thresholds a benchmark must meet, checked by pure functions.

`check_report` and `check_sweep` return the reasons a report fails (empty when it passes); the
CLI prints them as one `nnc: gate failed: ...` line and exits with 1. A sweep passes only
when every point passes: a sweep in CI is the set of settings a team ships or may switch
between, so each must be deployable.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError
from ..units import format_size
from .runner import BenchReport
from .sweep import SweepReport


@dataclass(frozen=True)
class Gates:
    """Thresholds; None = not checked.

    min_accuracy: top-1 accuracy of the rebuilt model in percent (needs labelled data).
    max_size: bitstream bytes.
    max_latency_ratio: rebuilt median latency / original median latency.
    """

    min_accuracy: float | None = None
    max_size: int | None = None
    max_latency_ratio: float | None = None

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.min_accuracy, self.max_size, self.max_latency_ratio))


def check_report(report: BenchReport, gates: Gates) -> list[str]:
    """Why `report` fails `gates` (empty list = passes).

    Raises UsageError when a gate asks for something the report could not measure (accuracy
    without labels, latency of a file with no runnable graph): a gate that cannot be checked
    must not pass silently.
    """
    failures = []
    if gates.min_accuracy is not None:
        accuracy = None if report.quality is None else report.quality.accuracy_rebuilt
        if accuracy is None:
            raise UsageError(report.model, "--fail-below-accuracy needs --data with labels 'y' and a runnable model")
        if accuracy < gates.min_accuracy:
            failures.append(f"accuracy {accuracy:.2f} % < {gates.min_accuracy:g} %")
    if gates.max_size is not None and report.bitstream_bytes > gates.max_size:
        failures.append(
            f"bitstream {report.bitstream_bytes} B ({format_size(report.bitstream_bytes)}) > "
            f"{gates.max_size} B ({format_size(gates.max_size)})"
        )
    if gates.max_latency_ratio is not None:
        original, rebuilt = report.latency_original, report.latency_rebuilt
        if original is None or rebuilt is None:
            raise UsageError(report.model, "--fail-above-latency-ratio needs a model that runs (ONNX, TorchScript or .pt2)")
        ratio = rebuilt.median_ms / original.median_ms if original.median_ms > 0 else float("inf")
        if ratio > gates.max_latency_ratio:
            failures.append(
                f"latency ratio {ratio:.2f} > {gates.max_latency_ratio:g} "
                f"(rebuilt {rebuilt.median_ms:.3f} ms / original {original.median_ms:.3f} ms)"
            )
    return failures


def check_sweep(report: SweepReport, gates: Gates) -> list[str]:
    """One reason per failing point of the sweep, prefixed with the point's settings."""
    failures = []
    for point in report.points:
        reasons = check_report(point.bench, gates)
        if reasons:
            label = f"qp {point.qp}" + (f" sparsity {point.sparsity:g}" if report.prune_method else "")
            failures.append(f"{label}: {', '.join(reasons)}")
    return failures


def summarize(failures: list[str], limit: int = 3) -> str:
    """One line for stderr: the first few reasons and how many more there are."""
    shown = "; ".join(failures[:limit])
    return shown + (f" (and {len(failures) - limit} more)" if len(failures) > limit else "")
