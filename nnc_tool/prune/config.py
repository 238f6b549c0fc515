"""What the user asked the pruning stage to do, and what it did."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..defaults import ALLOCATIONS, IMPORTANCES, METHODS, NM_GRANULARITIES, SCOPES  # noqa: F401 - re-exported
NEEDS_CALIBRATION = frozenset({"activation", "shapley"})


@dataclass(frozen=True)
class PruneConfig:
    """Settings of the pruning stage.

    method: unstructured (single weights), nm (k of every n weights or kernels), structured
        (whole channels, physically removed from ONNX graphs), depth (whole residual branches).
    sparsity: fraction of weights (unstructured), channels (structured) or branches (depth) removed.
    scope: unstructured only - the same fraction in every layer, or one global threshold.
    nm: (k, n) - keep k of every n consecutive weights along each output neuron's input dimension.
    nm_granularity: "weight", or "kernel" to keep k of every n whole kernels of a filter.
    importance: how units are ranked; activation and shapley need `calibration`.
    allocation: how much each layer loses (structured): uniform, global ranking, or by measured
        sensitivity (needs `calibration`).
    calibration: model inputs (a few hundred samples) for data-driven ranking and refitting:
        ModelInputs named after the model's inputs, or a bare array for a one-input model.
    refit: with calibration data, refit the layer after each pruned one by least squares.
    shapley_permutations: budget of the Shapley estimator (permutations per layer).
    seed: seed of every random choice (random importance, Shapley permutations).
    channel_multiple: structured pruning keeps a multiple of this many channels in every layer
        that has at least that many (1 = exact counts). Runtimes' convolution kernels work on
        blocks of channels: on the samples, onnxruntime ran a 30 %-pruned resnet 1.8x SLOWER than
        the original with 11/22/34 channels, and 2x faster with 8/24/32.
    """

    method: str = "unstructured"
    sparsity: float = 0.5
    scope: str = "layer"
    nm: tuple[int, int] = (2, 4)
    nm_granularity: str = "weight"
    importance: str = "l1"
    allocation: str = "uniform"
    # ModelInputs (nnc_tool.inputs), or a bare array for a one-input model; `prune` binds it to the model.
    calibration: object | None = field(default=None, compare=False, repr=False)
    refit: bool = True
    shapley_permutations: int = 16
    seed: int = 0
    channel_multiple: int = 8

    def __post_init__(self) -> None:
        checks = [
            (self.method in METHODS, f"method must be one of {', '.join(METHODS)}"),
            (0.0 <= self.sparsity < 1.0, "sparsity must lie in [0, 1)"),
            (self.scope in SCOPES, f"scope must be one of {', '.join(SCOPES)}"),
            (self.nm_granularity in NM_GRANULARITIES, f"nm granularity must be one of {', '.join(NM_GRANULARITIES)}"),
            (0 < self.nm[0] < self.nm[1] <= 64, "N:M needs 0 < N < M <= 64"),
            (self.importance in IMPORTANCES, f"importance must be one of {', '.join(IMPORTANCES)}"),
            (self.allocation in ALLOCATIONS, f"allocation must be one of {', '.join(ALLOCATIONS)}"),
            (self.shapley_permutations >= 1, "shapley permutations must be at least 1"),
            (1 <= self.channel_multiple <= 1024, "channel multiple must lie in [1, 1024]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        needs_data = self.importance in NEEDS_CALIBRATION or self.allocation == "sensitivity" or self.method == "depth"
        if needs_data and self.calibration is None:
            raise ValueError(
                f"{'depth pruning' if self.method == 'depth' else self.importance if self.importance in NEEDS_CALIBRATION else 'sensitivity allocation'}"
                " needs calibration data (--calib)"
            )


def calibration_rows(calibration) -> dict[str, np.ndarray] | np.ndarray:
    """Calibration inputs as rows along the batch axis by input name (ModelInputs), or the bare
    array as given; the data-driven pruners stack and slice samples along that axis."""
    from ..errors import UsageError
    from ..inputs import ModelInputs

    if not isinstance(calibration, ModelInputs):
        return np.asarray(calibration)
    if not calibration.in_rows:
        stacked = ", ".join(n for n in calibration.names if calibration.stacked(n))
        raise UsageError(calibration.source, "data-driven pruning needs every input's samples as rows along the"
                         f" model's batch axis; {stacked} has them on an extra first axis")
    return dict(calibration.arrays)


@dataclass
class LayerChange:
    """What pruning did to one layer (or channel group, or branch)."""

    name: str
    before: int  # weights, channels or branches before
    after: int  # ... and after


@dataclass
class PruneReport:
    method: str
    parameters_before: int  # weight parameters (roles weight + non-weight)
    parameters_after: int  # parameters that remain in the model (removed ones are gone)
    zeros_after: int  # of parameters_after, how many are zero
    layers: list[LayerChange] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # units left alone, each with its reason
    notes: list[str] = field(default_factory=list)
