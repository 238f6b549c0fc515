"""Draw a sweep: rate-quality curves and latencies, written as PNG, SVG or PDF.

matplotlib is an optional extra (`pip install 'nnc-tool[plot]'`) imported only when a plot is
asked for. The figure is built with the object-oriented API (`matplotlib.figure.Figure`), never
pyplot: no GUI backend, no global state, so it works headless and inside other programs.
"""
from __future__ import annotations

import math
import os
import statistics
from pathlib import Path

from ..errors import UsageError
from ..fileio import atomic_output
from .sweep import SweepPoint, SweepReport

PLOT_FORMATS = ("png", "svg", "pdf")
INSTALL_HINT = "pip install 'nnc-tool[plot]'"


def plot_format(path: str | os.PathLike) -> str:
    """The image format named by `path`'s suffix; UsageError for anything else."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in PLOT_FORMATS:
        raise UsageError(path, f"--plot writes {', '.join('.' + f for f in PLOT_FORMATS)} files, not {suffix or 'no suffix'!r}")
    return suffix


def check_plot_target(path: str | os.PathLike) -> None:
    """Everything that would make writing the plot fail, checked before a long sweep starts."""
    plot_format(path)
    directory = Path(path).parent
    if not directory.is_dir():
        raise UsageError(path, f"directory {directory} does not exist")
    require_matplotlib()


def require_matplotlib() -> None:
    """Fail before any long work when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(None, f"--plot needs matplotlib: {INSTALL_HINT}") from None


def plot_sweep(report: SweepReport, path: str | os.PathLike) -> None:
    """Write a two-panel figure of `report` to `path` (atomically; format from the suffix).

    Left: bitstream size against accuracy (or output SNR without labels), one line per
    sparsity, each point labelled with its QP. Right: median latency of the original and the
    rebuilt models with p10-p90 whiskers, per sparsity (or per QP when only one sparsity).
    """
    fmt = plot_format(path)
    require_matplotlib()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 5.2), layout="constrained")
    rate_ax, latency_ax = fig.subplots(1, 2, width_ratios=[1.6, 1])
    colors = {s: f"C{i % 10}" for i, s in enumerate(report.sparsities)}
    _draw_rate_quality(rate_ax, report, colors)
    _draw_latency(latency_ax, report, colors)
    title = f"{Path(report.model).name} ({report.format}, {report.original_bytes / 1000:.1f} KB)"
    if report.prune_method:
        title += f", {report.prune_method} pruning"
    fig.suptitle(title, fontsize=13)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=130)


def _quality_metric(report: SweepReport) -> tuple[str, str]:
    """(how to read a point's quality, axis label): accuracy with labels, else output SNR, else weight SNR."""
    if report.labelled:
        return "accuracy", f"top-1 accuracy of the rebuilt model (%, {report.samples} samples)"
    if any(p.bench.quality is not None for p in report.points):
        inputs = f"{report.samples} samples" if report.data else f"{report.samples} random inputs"
        return "output_snr", f"output SNR against the original (dB, {inputs})"
    return "weight_snr", "weight SNR against the original (dB)"


def _quality(point: SweepPoint, metric: str) -> float | None:
    q = point.bench.quality
    value = {
        "accuracy": None if q is None else q.accuracy_rebuilt,
        "output_snr": None if q is None else q.output_snr_db,
        "weight_snr": point.bench.weight_snr_db,
    }[metric]
    return value if value is not None and math.isfinite(value) else None


def _sparsity_label(report: SweepReport, sparsity: float) -> str:
    if not report.prune_method:
        return "no pruning"
    return "no pruning" if sparsity == 0 else f"sparsity {sparsity:g}"


def _draw_rate_quality(ax, report: SweepReport, colors: dict[float, str]) -> None:
    metric, ylabel = _quality_metric(report)
    skipped = 0
    labels = []  # (x, y, qp, color, above)
    for number, sparsity in enumerate(report.sparsities):
        points = [p for p in report.points if p.sparsity == sparsity]
        xy = [(p.bench.bitstream_bytes / 1000, _quality(p, metric), p.qp) for p in points]
        skipped += sum(1 for _, y, _ in xy if y is None)
        xy = sorted((x, y, qp) for x, y, qp in xy if y is not None)
        if not xy:
            continue
        xs, ys, _ = zip(*xy)
        ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.5, color=colors[sparsity],
                label=_sparsity_label(report, sparsity))
        # Alternate sides so that lines lying on top of each other keep readable labels.
        labels += [(x, y, qp, colors[sparsity], number % 2 == 0) for x, y, qp in xy]
    if metric == "accuracy" and report.accuracy_original is not None:
        ax.axhline(report.accuracy_original, color="0.4", linestyle="--", linewidth=1,
                   label=f"original ({report.accuracy_original:.2f} %)")
    ax.set_xlabel("bitstream size (KB)")
    ax.set_ylabel(ylabel)
    ax.set_title("rate vs quality (each point labelled with its QP)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.06, y=0.12)
    _label_points(ax, labels)
    if skipped:
        ax.text(0.01, 0.01, f"{skipped} point(s) with infinite or no quality not shown", transform=ax.transAxes,
                fontsize=7, color="0.4")
    ax.legend(loc="best", fontsize=8)


def _label_points(ax, labels: list[tuple[float, float, int, str, bool]]) -> None:
    """Write QPs beside points, leaving out those that would overlap a label already placed.

    Each line's end points are placed first, so every line shows the range of QPs it covers.
    """
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    width, height = (x1 - x0) or 1.0, (y1 - y0) or 1.0
    # Label extent in axes fractions at 7 pt on this figure size: about 3 characters wide, one line high.
    min_dx, min_dy, lift = 0.035, 0.045, 0.03

    def place(item):
        x, y, _, _, above = item
        return (x - x0) / width, (y - y0) / height + (lift if above else -lift)

    ends = {}
    for item in labels:
        ends.setdefault(item[3], []).append(item)
    ordered = [i for line in ends.values() for i in (line[0], line[-1])]
    ordered += [i for i in labels if i not in ordered]
    placed: list[tuple[float, float]] = []
    for item in ordered:
        fx, fy = place(item)
        if any(abs(fx - px) < min_dx and abs(fy - py) < min_dy for px, py in placed):
            continue
        placed.append((fx, fy))
        x, y, qp, color, above = item
        ax.annotate(f"{qp}", (x, y), textcoords="offset points", xytext=(0, 5 if above else -5), ha="center",
                    va="bottom" if above else "top", fontsize=7, color=color)


def _draw_latency(ax, report: SweepReport, colors: dict[float, str]) -> None:
    original = report.latency_original
    timed = [p for p in report.points if p.bench.latency_rebuilt is not None]
    if original is None or not timed:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no latency: this format holds no runnable graph", ha="center", va="center",
                transform=ax.transAxes)
        return
    # One bar per sparsity (latency hardly depends on the QP: weights are decoded to floats);
    # one per QP when only the QP was swept.
    labels, medians, lows, highs, bar_colors = ["original"], [original.median_ms], [original.p10_ms], [original.p90_ms], ["0.55"]
    by_qp = len(report.sparsities) == 1
    groups = [[p] for p in timed] if by_qp else [[p for p in timed if p.sparsity == s] for s in report.sparsities]
    for group in groups:
        if not group:
            continue
        first = group[0]
        labels.append(f"qp {first.qp}" if by_qp else _sparsity_label(report, first.sparsity).replace("sparsity ", "sparsity\n"))
        medians.append(statistics.median(p.bench.latency_rebuilt.median_ms for p in group))
        lows.append(statistics.median(p.bench.latency_rebuilt.p10_ms for p in group))
        highs.append(statistics.median(p.bench.latency_rebuilt.p90_ms for p in group))
        bar_colors.append(colors[first.sparsity])
    positions = range(len(labels))
    errors = [[m - lo for m, lo in zip(medians, lows)], [hi - m for m, hi in zip(medians, highs)]]
    bars = ax.bar(positions, medians, color=bar_colors, yerr=errors, capsize=4, ecolor="0.2", width=0.6)
    for bar, median, high in zip(bars[1:], medians[1:], highs[1:]):
        ax.annotate(f"{median / medians[0]:.2f}x", (bar.get_x() + bar.get_width() / 2, max(high, median)),
                    textcoords="offset points", xytext=(0, 3), ha="center", va="bottom", fontsize=8)
    ax.margins(y=0.1)
    ax.set_xticks(list(positions), labels, fontsize=8, rotation=45 if len(labels) > 6 else 0,
                  ha="right" if len(labels) > 6 else "center")
    ax.set_ylabel(f"latency (ms), batch {original.batch_size}")
    per = "per QP" if by_qp else "per sparsity (median over its QPs)"
    ax.set_title(f"latency {per}\nmedian of {original.runs} runs, whiskers p10-p90, label: rebuilt / original",
                 fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
