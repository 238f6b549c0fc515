"""Benchmarking: size, latency and quality of a compressed model against its original."""
from .runner import BenchReport, LatencyStats, QualityStats, bench, load_eval_data

__all__ = ["BenchReport", "LatencyStats", "QualityStats", "bench", "load_eval_data"]
