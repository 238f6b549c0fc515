"""Benchmarking: size, latency and quality of a compressed model against its original; sweeps and gates."""
from .gates import Gates, check_report, check_sweep
from .runner import BenchReport, LatencyStats, QualityStats, bench, load_eval_data
from .sweep import SweepPoint, SweepReport, parse_sweep, sweep

__all__ = [
    "BenchReport",
    "Gates",
    "LatencyStats",
    "QualityStats",
    "SweepPoint",
    "SweepReport",
    "bench",
    "check_report",
    "check_sweep",
    "load_eval_data",
    "parse_sweep",
    "sweep",
]
