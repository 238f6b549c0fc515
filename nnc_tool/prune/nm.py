"""N:M (k-out-of-n) semi-structured pruning.

`config.nm = (k, n)`: along the input dimension of every output neuron, of every n consecutive
inputs exactly the k largest-magnitude weights are kept and n-k are zeroed (2:4 is the pattern
sparse tensor cores accelerate). `config.sparsity` plays no part: the sparsity is 1 - k/n.

Which tensors: every float WEIGHT tensor with a known layout (`nnc_tool.graph.layout`) that has
an input axis. Tensors without a known layout are left alone and listed in `report.skipped`,
as are tensors whose input dimension is 1 (depthwise convolutions: a group of one input keeps it).

Groups:
  * ``nm_granularity="weight"`` (default): for convolutions a group runs along the input-channel
    axis for each (output channel, kernel position) - i.e. W[o, c:c+n, y, x] - which is the
    layout of NVIDIA's 2:4 sparsity for convolutions (the input channel is the reduction
    dimension of the implicit GEMM). For matrices, along the input axis of each output row.
    Every other axis (MatMul batch axes) simply enumerates more groups.
  * ``nm_granularity="kernel"``: of every n consecutive input channels of a filter, the k whole
    kernels (the kh*kw... slices) with the largest L1 norm are kept and the others zeroed. For
    weights without kernel axes (Gemm, MatMul, Linear) a kernel is a single weight, so this is
    the same as weight granularity.
  * When the input dimension is not a multiple of n, the last, partial group of length r keeps
    ``ceil(k * r / n)`` weights (never fewer than the full groups' ratio).
  * Ties are broken by position: of equal magnitudes the lower input index is kept.
"""
from __future__ import annotations

import math

import numpy as np

from ..graph.layout import WeightLayout
from ..model import Model, TensorRole
from .config import LayerChange, PruneConfig, PruneReport
from .unstructured import apply_keep_mask, magnitude, make_report, replace_arrays

__all__ = ["nm_keep_mask", "prune_nm"]


def prune_nm(model: Model, config: PruneConfig, layouts: dict[str, WeightLayout]) -> tuple[Model, PruneReport]:
    """Keep k of every n consecutive weights (or kernels) along each output neuron's inputs."""
    k, n = config.nm
    replaced: dict[int, np.ndarray] = {}
    changes: list[LayerChange] = []
    skipped: list[str] = []
    kernel_mode = config.nm_granularity == "kernel"
    for index, tensor in enumerate(model.tensors):
        if tensor.role != TensorRole.WEIGHT or not tensor.is_float:
            continue
        layout = layouts.get(tensor.name)
        if layout is None or layout.in_axis is None:
            skipped.append(f"{tensor.name}: layout unknown (no input axis to group along)")
            continue
        if tensor.array.shape[layout.in_axis] <= 1:
            skipped.append(f"{tensor.name}: input dimension is {tensor.array.shape[layout.in_axis]} (depthwise?)")
            continue
        keep = nm_keep_mask(tensor.array, layout, k, n, kernel_mode)
        out = apply_keep_mask(tensor.array, keep)
        replaced[index] = out
        changes.append(LayerChange(tensor.name, int(np.count_nonzero(tensor.array)), int(np.count_nonzero(out))))

    notes = [
        f"{k}:{n} pattern ({'whole kernels' if kernel_mode else 'single weights'}) on {len(changes)} tensors;"
        f" the sparsity setting is ignored (N:M implies {100.0 * (1 - k / n):.1f} %)"
    ]
    pruned = replace_arrays(model, replaced)
    return pruned, make_report("nm", model, pruned, changes, skipped, notes)


def nm_keep_mask(array: np.ndarray, layout: WeightLayout, k: int, n: int, kernel_mode: bool = False) -> np.ndarray:
    """Boolean mask (array's shape) of the weights a k:n pattern keeps."""
    ndim = array.ndim
    in_axis = layout.in_axis % ndim
    kernel = tuple(a % ndim for a in layout.kernel_axes if a % ndim != in_axis)
    rest = tuple(a for a in range(ndim) if a != in_axis and a not in kernel)
    mag = magnitude(array)
    if kernel_mode and kernel:
        # [rest..., in, kernel...]: score each kernel by its L1 norm, choose along `in`.
        order = rest + (in_axis,) + kernel
        moved = np.transpose(mag, order)
        channels = moved.shape[len(rest)]
        scores = moved.reshape(-1, channels, math.prod(moved.shape[len(rest) + 1 :])).sum(axis=-1, dtype=np.float64)
        keep2d = _group_keep(scores, k, n)
        head = moved.shape[: len(rest) + 1]
        keep_moved = np.broadcast_to(keep2d.reshape(head + (1,) * len(kernel)), moved.shape)
    else:
        # [rest..., kernel..., in]: one group row per (output neuron, kernel position).
        order = rest + kernel + (in_axis,)
        moved = np.transpose(mag, order)
        keep_moved = _group_keep(moved.reshape(-1, moved.shape[-1]), k, n).reshape(moved.shape)
    return np.transpose(keep_moved, np.argsort(order))


def _group_keep(scores: np.ndarray, k: int, n: int) -> np.ndarray:
    """For 2-D scores [rows, C]: keep the k largest of every n consecutive columns per row."""
    rows, columns = scores.shape
    keep = np.zeros((rows, columns), dtype=bool)
    full = columns - columns % n
    tail = columns - full
    # Full groups keep k of n; a last partial group of `tail` keeps ceil(k * tail / n).
    for start, stop, group, kept in ((0, full, n, k), (full, columns, tail, -(-k * tail // n))):
        if stop <= start:
            continue
        block = scores[:, start:stop].reshape(rows, -1, group)
        best = np.argsort(-block, axis=-1, kind="stable")[..., :kept]  # stable: lower index wins ties
        mask = np.zeros(block.shape, dtype=bool)
        np.put_along_axis(mask, best, True, axis=-1)
        keep[:, start:stop] = mask.reshape(rows, stop - start)
    return keep
