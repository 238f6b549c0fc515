"""Unstructured magnitude pruning: zero the individually smallest weights.

Which tensors: every float tensor with role WEIGHT and at least `MIN_ELEMENTS` (16) values.
NONWEIGHT (biases, norm parameters) and EXACT tensors are never touched; tiny weight tensors
are left alone (listed in `report.skipped`) because they cost nothing to code and every single
weight of them matters. Shapes never change; the pruned model shares the arrays of untouched
tensors with the input and gets fresh arrays for pruned ones (the input is never modified).
The dtype of every tensor is kept (float16/bfloat16 included).

Counts and ties:
  * ``scope="layer"``: each eligible tensor of n values gets exactly
    ``floor(sparsity * n + 0.5)`` zeros (round half up) - the k smallest magnitudes. Weights that
    are already zero count as pruned first. Ties at the threshold are broken by position: the
    lower flat (C-order) index is pruned first, so the result is deterministic.
  * ``scope="global"``: weights are ranked across all eligible tensors by their magnitude
    normalised per tensor, ``|w| / RMS(w)``, so layers with small weights are not wiped out just
    because of their scale. Exactly ``floor(sparsity * N + 0.5)`` of the N eligible weights are
    zeroed, with no tensor losing more than ``GLOBAL_LAYER_CAP`` (95 %) of its weights (and
    always at least one weight kept). The cap is met by water-filling: tensors that would exceed
    it are fixed at the cap and the threshold is recomputed over the others, so the overall
    count stays exact. Ties are broken by tensor order, then flat index. If the cap makes the
    target unreachable (sparsity > 0.95), every tensor is pruned to the cap and a note says so.
  Non-finite magnitudes (NaN) rank as the largest, so they are never pruned silently.
Overall sparsity is measured over the eligible weight tensors.
"""
from __future__ import annotations

import numpy as np

from ..model import Model, Tensor, TensorRole
from .config import LayerChange, PruneConfig, PruneReport

MIN_ELEMENTS = 16
GLOBAL_LAYER_CAP = 0.95

__all__ = ["GLOBAL_LAYER_CAP", "MIN_ELEMENTS", "prune_unstructured"]


def prune_unstructured(model: Model, config: PruneConfig, layouts: dict | None = None) -> tuple[Model, PruneReport]:
    """Magnitude-prune the WEIGHT tensors of `model` (layouts are not needed and ignored)."""
    eligible: list[int] = []
    skipped: list[str] = []
    for index, tensor in enumerate(model.tensors):
        if tensor.role != TensorRole.WEIGHT or not tensor.is_float:
            continue
        if tensor.array.size < MIN_ELEMENTS:
            skipped.append(f"{tensor.name}: only {tensor.array.size} weights (< {MIN_ELEMENTS})")
            continue
        eligible.append(index)

    notes: list[str] = []
    mags = [magnitude(model.tensors[i].array).ravel() for i in eligible]
    if config.scope == "global":
        selections = _global_selection(mags, config.sparsity, notes)
    else:
        selections = [smallest_indices(m, int(np.floor(config.sparsity * m.size + 0.5))) for m in mags]

    replaced: dict[int, np.ndarray] = {}
    changes: list[LayerChange] = []
    for index, chosen in zip(eligible, selections):
        tensor = model.tensors[index]
        before = int(np.count_nonzero(tensor.array))
        out = zero_flat(tensor.array, chosen)
        replaced[index] = out
        changes.append(LayerChange(tensor.name, before, int(np.count_nonzero(out))))

    pruned = replace_arrays(model, replaced)
    total = sum(m.size for m in mags)
    zeros = total - sum(ch.after for ch in changes)
    if total:
        notes.append(
            f"{config.scope} scope: {zeros} of {total} weights in {len(eligible)} tensors are zero"
            f" ({100.0 * zeros / total:.2f} %, target {100.0 * config.sparsity:.2f} %)"
        )
    return pruned, make_report("unstructured", model, pruned, changes, skipped, notes)


def _global_selection(mags: list[np.ndarray], sparsity: float, notes: list[str]) -> list[np.ndarray]:
    """Flat indices to zero per tensor for one global threshold on RMS-normalised magnitudes."""
    scores: list[np.ndarray] = []
    for m in mags:
        finite = m[np.isfinite(m)]
        rms = float(np.sqrt(np.mean(np.square(finite, dtype=np.float64)))) if finite.size else 0.0
        scores.append(m / np.float32(rms) if rms > 0 else m.copy())  # an all-zero tensor scores all zero
    sizes = [s.size for s in scores]
    caps = [min(int(np.floor(GLOBAL_LAYER_CAP * n)), n - 1) for n in sizes]
    target = int(np.floor(sparsity * sum(sizes) + 0.5))
    if target > sum(caps):
        notes.append(
            f"global scope: the {100 * GLOBAL_LAYER_CAP:.0f} % per-layer cap allows only {sum(caps)} of the"
            f" {target} requested zeros"
        )
        target = sum(caps)

    fixed: dict[int, int] = {}  # tensor -> count, for tensors held at their cap
    active = list(range(len(scores)))
    remaining = target
    threshold = -np.inf
    while active and remaining > 0:
        pool = np.concatenate([scores[i] for i in active])
        threshold = np.partition(pool, remaining - 1)[remaining - 1]
        over = [i for i in active if np.count_nonzero(scores[i] <= threshold) > caps[i]]
        if not over:
            break
        for i in over:
            fixed[i] = caps[i]
            remaining -= caps[i]
        active = [i for i in active if i not in fixed]
    if remaining <= 0:
        threshold = -np.inf

    result: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(scores)
    for i, count in fixed.items():
        result[i] = smallest_indices(scores[i], count)
    less = {i: np.flatnonzero(scores[i] < threshold) for i in active}
    needed = max(remaining, 0) - sum(v.size for v in less.values())
    for i in active:  # ties at the threshold: earlier tensors, then lower indices, first
        ties = np.flatnonzero(scores[i] == threshold)[: max(needed, 0)]
        needed -= ties.size
        result[i] = np.concatenate([less[i], ties])
    return result


# ---- helpers shared by the pruning methods -------------------------------------------------


def magnitude(array: np.ndarray) -> np.ndarray:
    """|array| as float32 (float64 for float64 input), NaN mapped to +inf (ranks largest)."""
    work = np.float64 if array.dtype == np.float64 else np.float32
    mag = np.abs(array.astype(work, copy=False))
    return np.where(np.isnan(mag), np.inf, mag) if np.isnan(mag).any() else mag


def smallest_indices(values: np.ndarray, count: int) -> np.ndarray:
    """Flat indices of the `count` smallest of 1-D `values`; ties go to the lower index."""
    n = values.size
    if count <= 0:
        return np.empty(0, dtype=np.int64)
    if count >= n:
        return np.arange(n, dtype=np.int64)
    threshold = np.partition(values, count - 1)[count - 1]
    less = np.flatnonzero(values < threshold)
    ties = np.flatnonzero(values == threshold)[: count - less.size]
    return np.concatenate([less, ties])


def zero_flat(array: np.ndarray, flat_indices: np.ndarray) -> np.ndarray:
    """A copy of `array` (same dtype and shape) with the given flat positions set to zero."""
    out = np.array(array, copy=True, order="C")
    out.reshape(-1)[flat_indices] = 0
    return out


def apply_keep_mask(array: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """A copy of `array` with every position where `keep` is False set to zero."""
    out = np.array(array, copy=True, order="C")
    out[~keep] = 0
    return out


def replace_arrays(model: Model, replaced: dict[int, np.ndarray]) -> Model:
    """A new Model with tensor i's array replaced by replaced[i] (others shared, never copied)."""
    tensors = [
        Tensor(t.name, replaced[i], t.role) if i in replaced else Tensor(t.name, t.array, t.role)
        for i, t in enumerate(model.tensors)
    ]
    return Model(model.format, model.topology, tensors, dict(model.metadata))


def _learned_counts(model: Model) -> tuple[int, int]:
    learned = [t.array for t in model.tensors if t.role in (TensorRole.WEIGHT, TensorRole.NONWEIGHT)]
    size = sum(a.size for a in learned)
    return int(size), int(size - sum(np.count_nonzero(a) for a in learned))


def make_report(
    method: str, before: Model, after: Model, layers: list[LayerChange], skipped: list[str], notes: list[str]
) -> PruneReport:
    """A PruneReport counting WEIGHT + NONWEIGHT parameters before and after."""
    parameters_before, _ = _learned_counts(before)
    parameters_after, zeros_after = _learned_counts(after)
    return PruneReport(method, parameters_before, parameters_after, zeros_after, layers, skipped, notes)
