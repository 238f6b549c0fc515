"""Kronecker GPTQ (quantize/rdo.py): the same levels as dense GPTQ on kron(C, S)."""
import numpy as np
import pytest

from nnc_tool.quantize import rdo


def _tap_correlation(k: int, rho: float) -> np.ndarray:
    taps = np.stack([x.ravel() for x in np.meshgrid(np.arange(k), np.arange(k), indexing="ij")], 1)
    return rho ** np.abs(taps[:, None] - taps[None]).sum(2)


@pytest.mark.parametrize(
    "rows, channels, k, rho, block, prune, dead",
    [(6, 12, 3, 0.3, 4, False, False), (7, 24, 3, 0.5, 8, True, False), (7, 21, 3, 0.5, 7, False, True),
     (5, 40, 3, 0.3, 40, False, False), (5, 30, 1, 0.3, 10, False, False)],
)
def test_kronecker_round_equals_dense_gptq(rows, channels, k, rho, block, prune, dead):
    rng = np.random.default_rng(channels)
    mix = rng.normal(size=(channels, 3 * channels))
    moments = mix @ mix.T / (3 * channels) + 0.5
    if dead:
        moments[2, :] = 0.0
        moments[:, 2] = 0.0
    weights = rng.normal(size=(rows, channels, k, k)).astype(np.float32)
    if prune:
        weights[rng.random(weights.shape) < 0.3] = 0.0
    step = 0.3
    factor = rdo.kronecker_factor(moments, block, damping=1e-9)
    levels = rdo.kronecker_gptq_round([(weights.reshape(rows, channels, -1), step, factor)], (k, k), rho)[0]
    hessian = np.kron(moments, _tap_correlation(k, rho))
    dense = rdo.gptq_round(weights.reshape(rows, -1).astype(np.float64), rdo.diagonal_blocks(hessian, block * k * k), np.full(rows, step), damping=1e-9)
    np.testing.assert_array_equal(levels.reshape(rows, -1), dense)
    if prune:
        assert np.all(levels[weights.reshape(rows, channels, -1) == 0] == 0)


def test_layers_side_by_side_equal_one_by_one():
    rng = np.random.default_rng(1)
    layers = []
    for rows, channels in ((8, 16), (12, 40), (5, 64)):
        mix = rng.normal(size=(channels, channels))
        layers.append((rng.normal(size=(rows, channels, 9)).astype(np.float32) * 3, 0.5, rdo.kronecker_factor(mix @ mix.T / channels + np.eye(channels), 16)))
    together = rdo.kronecker_gptq_round(layers, (3, 3))
    for layer, levels in zip(layers, together):
        np.testing.assert_array_equal(levels, rdo.kronecker_gptq_round([layer], (3, 3))[0])
