"""Bjøntegaard delta rate (BD-rate) between two rate-quality curves, shared by the benchmarks
(rd_vs_nncodec.py on the sample models, zoo.py --nncodec on the real-model zoo)."""
from __future__ import annotations

import numpy as np


def _pchip_slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Fritsch-Carlson slopes of the monotone piecewise-cubic Hermite interpolant."""
    h = np.diff(x)
    delta = np.diff(y) / h
    d = np.zeros_like(y)
    if len(x) == 2:
        return np.full_like(y, delta[0])
    for k in range(1, len(x) - 1):
        if delta[k - 1] * delta[k] > 0:
            w1, w2 = 2 * h[k] + h[k - 1], h[k] + 2 * h[k - 1]
            d[k] = (w1 + w2) / (w1 / delta[k - 1] + w2 / delta[k])
    # One-sided three-point ends, as in scipy's PchipInterpolator.
    for end, (h0, h1, d0, d1) in ((0, (h[0], h[1], delta[0], delta[1])), (-1, (h[-1], h[-2], delta[-1], delta[-2]))):
        slope = ((2 * h0 + h1) * d0 - h0 * d1) / (h0 + h1)
        if np.sign(slope) != np.sign(d0):
            slope = 0.0
        elif np.sign(d0) != np.sign(d1) and abs(slope) > abs(3 * d0):
            slope = 3 * d0
        d[end] = slope
    return d


def _pchip_eval(x: np.ndarray, y: np.ndarray, xs: np.ndarray) -> np.ndarray:
    d = _pchip_slopes(x, y)
    k = np.clip(np.searchsorted(x, xs, side="right") - 1, 0, len(x) - 2)
    h = x[k + 1] - x[k]
    t = (xs - x[k]) / h
    h00, h10 = 2 * t**3 - 3 * t**2 + 1, t**3 - 2 * t**2 + t
    h01, h11 = -2 * t**3 + 3 * t**2, t**3 - t**2
    return h00 * y[k] + h10 * h * d[k] + h01 * y[k + 1] + h11 * h * d[k + 1]


def _curve(rates: list[float], qualities: list[float]) -> tuple[np.ndarray, np.ndarray] | None:
    """(quality, log-rate) of the Pareto-optimal points, sorted; None if fewer than four remain.

    A point whose quality is not above that of every cheaper point is dominated (no encoder
    would pick it) and is dropped, so the curve is strictly increasing as BD-rate requires.
    """
    front: list[tuple[float, float]] = []
    for r, q in sorted((r, q) for r, q in zip(rates, qualities) if r > 0 and np.isfinite(q)):
        if not front or q > front[-1][1]:
            if front and r == front[-1][0]:
                front.pop()
            front.append((r, q))
    if len(front) < 4:
        return None
    q = np.array([p[1] for p in front], dtype=np.float64)
    r = np.log(np.array([p[0] for p in front], dtype=np.float64))
    return q, r


def bd_rate(rates_a, quality_a, rates_b, quality_b, method: str = "pchip") -> float | None:
    """Bjøntegaard delta rate of A against B in percent (negative: A needs fewer bytes), or None.

    method "cubic": least-squares cubic polynomial of log-rate over quality (VCEG-M33);
    method "pchip": piecewise-cubic Hermite interpolation (VCEG-AL22 / JVET CTC practice).
    """
    a, b = _curve(rates_a, quality_a), _curve(rates_b, quality_b)
    if a is None or b is None:
        return None
    low, high = max(a[0][0], b[0][0]), min(a[0][-1], b[0][-1])
    if high <= low:
        return None
    if method == "cubic":
        integrals = []
        for q, r in (a, b):
            poly = np.polyint(np.polyfit(q, r, 3))
            integrals.append(np.polyval(poly, high) - np.polyval(poly, low))
        mean_diff = (integrals[0] - integrals[1]) / (high - low)
    else:
        grid = np.linspace(low, high, 2001)
        diff = _pchip_eval(*a, grid) - _pchip_eval(*b, grid)
        mean_diff = float(np.sum((diff[1:] + diff[:-1]) / 2 * np.diff(grid))) / (high - low)
    return float((np.exp(mean_diff) - 1.0) * 100.0)
