"""Mid-tread uniform quantization with NNC's step convention.

A quantization parameter QP gives the step 2^(QP/4), so four QP steps halve the step
size (NNCodec uses the same convention, which keeps our QP sweeps comparable with it).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..defaults import CALIBRATION_MODES, MAX_KERNEL_CORRELATION
from ..model import Tensor, TensorRole
from .rdo import (
    DEFAULT_KERNEL_CORRELATION, DEFAULT_LAMBDA, EXACT_LEVELS, MAX_KERNEL_TAPS, kernel_feedback_reach, kernel_feedback_round, rdo_round,
)
from .trellis import chain_length, grid_values, trellis_levels

# Rate-aware rounding only where the tensor's own histogram is a usable rate model: large WEIGHT
# tensors (a few dozen biases with near-unique levels say nothing about code lengths).
RDO_MIN_VALUES = 1024
# Dependent quantization only where a tensor fills a few chains (a bias gains nothing from it).
DEPENDENT_MIN_VALUES = 1024

# Beyond this many levels the tensor is not something uniform quantization serves well
# (or it holds huge outliers); it is coded losslessly instead.
MAX_LEVEL = 1 << 40
QP_RANGE = (-256, 255)


@dataclass(frozen=True)
class QuantSettings:
    """How weights are quantized.

    qp: QP of weight tensors (ndim >= 2); step = 2^(qp/4).
    nonweight_qp: QP of 1-D learned tensors (biases, norm parameters); None (default) means
        `qp - NONWEIGHT_QP_OFFSET`: finer than the weights because they are few and the output
        is sensitive to them, but tied to `qp` so coarse weights do not carry ~20-bit biases.
    bits: if set, derive each weight tensor's step from its range so that its largest
        magnitude maps to level 2^(bits-1)-1, instead of using `qp`.
    per_channel: give each output channel (first axis) its own step.
    lossless: code every tensor bit-exactly.
    rdo: lambda scale c of rate-aware rounding (quantize/rdo.py) of WEIGHT tensors: each value
        takes the level among its two nearest that minimises squared error + c * step^2 * code
        length (bits); 0 (or False, the default) rounds to nearest, True means
        rdo.DEFAULT_LAMBDA. Off by default: it lowers the weight-domain error at equal size but
        its bias towards zero costs output SNR at coarse steps (see rdo.py).
    allocate: give every tensor its own QP around `qp` (quantize/allocation.py): from measured
        output sensitivities when calibration data is given, else from a data-free proxy.
    error_feedback: with calibration data and an ONNX model, choose the levels of Conv / Gemm /
        MatMul weights with GPTQ error feedback (quantize/rdo.py). Without calibration data, the
        convolutions whose input covariance follows from BatchNorm statistics get GPTQ for that
        estimate (channels) times kernel feedback's prior (taps): Kronecker error feedback.
    bias_correction: subtract from each Conv / Gemm bias the mean output shift its weight's
        rounding causes, where BatchNorm statistics tell the layer's mean input
        (quantize/bias_correction.py); needs the BatchNorm-carrying model's moments.
    dependent: code WEIGHT tensors (of at least DEPENDENT_MIN_VALUES values, QP steps, no `rdo`)
        with dependent quantization (quantize/trellis.py): two interleaved quantizers of step
        2^(qp/4) on a grid of half that, the levels chosen by a trellis search. Off by default:
        it replaces kernel feedback, which gains as much on data-free ResNet-18 (digits; both
        -19.2 % BD-rate vs NNCodec) and encodes faster, and the small sample models gain nothing
        from it (mlp -1.1 %, lenet +1.5 %).
    kernel_correlation: rho of data-free kernel feedback (quantize/rdo.py): the taps of every
        convolution kernel (WEIGHT tensors of 3+ axes, the trailing ones spatial, 2 to
        MAX_KERNEL_TAPS taps) are rounded with GPTQ error feedback for an assumed input correlation
        rho^(distance); 0 rounds to nearest. Not with `rdo`, `dependent` or `bits`; calibrated
        error feedback replaces it where it applies.
    calibration_mode: what calibration data (`--calib`) is used for, ONNX models only. "full":
        measured sensitivities for the allocation and GPTQ on every layer's measured input
        Hessian (the smallest streams; ResNet-18: 4-5 s). "fast": one pass measuring each
        layer's input channel moments, used like the BatchNorm estimate (Kronecker error
        feedback, bias correction) with the data-free allocation (ResNet-18: about 0.1 s on top
        of the data-free encode). "auto" (default): "full" up to
        defaults.FULL_CALIBRATION_PARAMETERS parameters, "fast" beyond.
    Per-tensor choices (allocate, error_feedback) are made once per model by
    `plan.plan_quantization`; `quantize` itself only sees one tensor's settings.
    """

    qp: int = -38
    nonweight_qp: int | None = None
    bits: int | None = None
    per_channel: bool = False
    lossless: bool = False
    rdo: float = 0.0
    allocate: bool = True
    error_feedback: bool = True
    bias_correction: bool = True
    dependent: bool = False
    kernel_correlation: float = DEFAULT_KERNEL_CORRELATION
    calibration_mode: str = "auto"
    # Per output channel (first axis) QP offsets of one WEIGHT tensor, set by the plan for weights
    # whose rows BatchNorm folding scaled differently (allocation.fold_row_offsets); None: one step.
    row_qp_offsets: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.calibration_mode not in CALIBRATION_MODES:
            raise ValueError(f"calibration_mode must be one of {', '.join(CALIBRATION_MODES)}, got {self.calibration_mode!r}")
        if isinstance(self.rdo, bool):
            object.__setattr__(self, "rdo", DEFAULT_LAMBDA if self.rdo else 0.0)
        if not 0.0 <= float(self.rdo) <= 16.0:
            raise ValueError(f"rdo must lie in [0, 16], got {self.rdo}")
        if not 0.0 <= float(self.kernel_correlation) <= MAX_KERNEL_CORRELATION:
            raise ValueError(f"kernel_correlation must lie in [0, {MAX_KERNEL_CORRELATION}], got {self.kernel_correlation}")
        for name in ("qp", "nonweight_qp"):
            value = getattr(self, name)
            if value is None and name == "nonweight_qp":
                continue
            if not QP_RANGE[0] <= value <= QP_RANGE[1]:
                raise ValueError(f"{name} must lie in [{QP_RANGE[0]}, {QP_RANGE[1]}], got {value}")
        if self.bits is not None and not 2 <= self.bits <= 31:
            raise ValueError(f"bits must lie in [2, 31], got {self.bits}")


# The roles and dtypes a quantization plan works on (EXACT tensors and integer data are coded exactly).
_QUANTIZABLE = (TensorRole.WEIGHT, TensorRole.NONWEIGHT)
_FLOATS = ("float32", "float16", "bfloat16", "float64")


def quantizable(tensor: Tensor) -> bool:
    """Whether a plan gives `tensor` a step: a non-empty WEIGHT or NONWEIGHT float tensor."""
    return tensor.role in _QUANTIZABLE and tensor.dtype in _FLOATS and tensor.array.size > 0


# Default distance between the weight QP and the non-weight QP (16 QP = 16x finer step). Measured
# with the RD benchmark on the sample models (BD-rate vs NNCodec, output SNR): K = 8 / 12 / 16 / 24
# gave mobilenet -0.4 / -7.7 / -11.6 / -9.6 %, resnet -4.8 / -4.6 / -4.2 / -3.6 %, mlp and lenet
# within 0.7 points of each other; 16 is the robust choice (mobilenet's BN statistics need it).
NONWEIGHT_QP_OFFSET = 16


def effective_nonweight_qp(settings: QuantSettings) -> int:
    """The QP of NONWEIGHT tensors: the explicit `nonweight_qp`, else `qp - NONWEIGHT_QP_OFFSET`."""
    if settings.nonweight_qp is not None:
        return settings.nonweight_qp
    return max(QP_RANGE[0], settings.qp - NONWEIGHT_QP_OFFSET)


@dataclass
class Quantized:
    """Integer levels plus the steps that map them back (one step, or one per output channel)."""

    levels: np.ndarray  # int32 (int64 when a level needs it), the tensor's shape
    steps: np.ndarray  # float32, shape [1] or [shape[0]]
    qps: np.ndarray | None  # int16 QP per step when the steps come from QPs, else None
    chain: int = 0  # dependent quantization's chain length (quantize/trellis.py); 0: independent levels


# 2^(k/4) for k = 0..3; with an exact power of two (ldexp) these give 2^(qp/4) without
# relying on the platform's exp2, so every decoder computes bit-identical steps.
_QUARTER_POWERS = np.array([1.0, 1.189207115002721, 1.4142135623730951, 1.681792830507429])


def step_for_qp(qp: np.ndarray | int) -> np.ndarray:
    """The float32 step for each QP: 2^(qp/4)."""
    qp = np.asarray(qp, dtype=np.int64)
    return np.ldexp(_QUARTER_POWERS[qp % 4], (qp // 4).astype(np.int32)).astype(np.float32)


def _channel_view(values: np.ndarray) -> np.ndarray:
    return values.reshape(values.shape[0], -1) if values.ndim >= 1 and values.size else values.reshape(1, -1)


# Values per block when a tensor is processed a block of rows at a time: temporaries stay a few
# MB however large the tensor (a 32 M-value embedding table would otherwise need ~1 GB of them).
BLOCK_VALUES = 1 << 20


def row_slices(rows: np.ndarray) -> Iterator[slice]:
    """Consecutive slices of the first axis covering about BLOCK_VALUES values each."""
    count = max(1, BLOCK_VALUES // max(rows.shape[1], 1))
    for start in range(0, rows.shape[0], count):
        yield slice(start, start + count)


def _row_peaks(rows: np.ndarray) -> np.ndarray:
    """max |value| per row (NaN if a row holds NaN, inf if it holds inf)."""
    if not rows.size:
        return np.zeros(max(rows.shape[0], 1), dtype=np.float32)
    return np.concatenate([np.abs(rows[block]).max(axis=1) for block in row_slices(rows)])


def choose_steps(
    values: np.ndarray, role: TensorRole, settings: QuantSettings, row_peaks: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Pick the step(s) for a float32 tensor; returns (steps, qps or None).

    `row_peaks` (max |value| per first-axis row) may be passed when already known.
    """
    per_channel = settings.per_channel and role == TensorRole.WEIGHT and values.ndim >= 2
    base_qp = settings.qp if role == TensorRole.WEIGHT else effective_nonweight_qp(settings)
    rows = _channel_view(values)
    if row_peaks is None:
        row_peaks = _row_peaks(rows) if rows.size else np.zeros(1)
    peak = float(row_peaks.max()) if row_peaks.size else 0.0

    if settings.bits is not None and role == TensorRole.WEIGHT:
        top_level = float((1 << (settings.bits - 1)) - 1)
        peaks = row_peaks if per_channel else np.array([peak])
        steps = np.where(peaks > 0, peaks / top_level, 1.0).astype(np.float32)
        return steps, None

    if settings.row_qp_offsets is not None and role == TensorRole.WEIGHT and len(settings.row_qp_offsets) == rows.shape[0]:
        qps = np.clip(base_qp + np.asarray(settings.row_qp_offsets, dtype=np.int64), *QP_RANGE).astype(np.int16)
        return step_for_qp(qps), qps
    if not per_channel:
        qps = np.array([base_qp], dtype=np.int16)
        return step_for_qp(qps), qps
    # Keep the relative precision of every channel equal to what the tensor's peak channel gets.
    with np.errstate(divide="ignore"):
        offsets = np.where(row_peaks > 0, np.round(4.0 * np.log2(row_peaks / peak)), 0.0) if peak > 0 else 0.0
    qps = np.clip(base_qp + offsets, *QP_RANGE).astype(np.int16) * np.ones(rows.shape[0], dtype=np.int16)
    return step_for_qp(qps), qps


def quantize(values: np.ndarray, role: TensorRole, settings: QuantSettings) -> Quantized | None:
    """Quantize a float tensor; None when it must be coded losslessly instead (non-finite values or a range too wide).

    Levels are int32 unless some level needs more; the work runs a block of rows at a time, so
    a file-mapped tensor is read once and never copied whole.
    """
    values = np.asarray(values)
    if values.dtype != np.float32:
        values = values.astype(np.float32)
    rows = _channel_view(values)
    row_peaks = _row_peaks(rows) if rows.size else np.zeros(1, dtype=np.float32)
    if not np.isfinite(row_peaks).all():
        return None
    steps, qps = choose_steps(values, role, settings, row_peaks)
    row_steps = steps if steps.size > 1 else np.full(rows.shape[0], steps[0], dtype=np.float32)
    largest = float((row_peaks.astype(np.float64) / row_steps).max()) if rows.size else 0.0
    if largest >= MAX_LEVEL:
        return None
    if settings.rdo > 0 and role == TensorRole.WEIGHT and values.size >= RDO_MIN_VALUES:
        # Rate-aware rounding needs the whole tensor's histogram: it works on the tensor at once.
        scaled = rows / (steps[:, None] if steps.size > 1 else steps[0])
        return Quantized(levels=rdo_round(scaled, float(settings.rdo)).reshape(values.shape), steps=steps, qps=qps)
    # float32 feedback keeps levels exact below 2^22; the feedback may move a value `reach` steps.
    if uses_kernel_feedback(values.shape, role, settings) and largest + kernel_feedback_reach(values.shape[2:], settings.kernel_correlation) < EXACT_LEVELS:
        kernels = rows.reshape(-1, math.prod(values.shape[2:]))
        per_kernel = values.shape[1]
        levels = np.empty(kernels.shape, dtype=np.int32)
        kernel_steps = np.repeat(row_steps, per_kernel) if steps.size > 1 else None
        for block in row_slices(kernels):
            part = kernels[block] / (kernel_steps[block, None] if kernel_steps is not None else steps[0])
            levels[block] = kernel_feedback_round(part, values.shape[2:], settings.kernel_correlation)
        return Quantized(levels=levels.reshape(values.shape), steps=steps, qps=qps)
    if uses_dependent(values.size, role, settings) and largest < 1 << 21:
        chain = chain_length(values.size)
        levels = trellis_levels(rows, chain, steps * np.float32(0.5))
        return Quantized(levels=levels.reshape(values.shape), steps=steps, qps=qps, chain=chain)
    # +1: rounding may reach the next integer above the largest scaled value.
    levels = np.empty(rows.shape, dtype=np.int32 if largest + 1 < 2**31 - 1 else np.int64)
    for block in row_slices(rows):
        part = rows[block] / (row_steps[block, None] if steps.size > 1 else steps[0])
        np.rint(part, out=part)
        levels[block] = part
    return Quantized(levels=levels.reshape(values.shape), steps=steps, qps=qps)


def uses_kernel_feedback(shape: tuple[int, ...], role: TensorRole, settings: QuantSettings) -> bool:
    """Whether a tensor of `shape` is rounded with kernel feedback (see QuantSettings.kernel_correlation)."""
    return (
        settings.kernel_correlation > 0 and role == TensorRole.WEIGHT and len(shape) >= 3
        and 2 <= math.prod(shape[2:]) <= MAX_KERNEL_TAPS and math.prod(shape) > 0
        and settings.bits is None and not settings.rdo and not settings.dependent and not settings.lossless
    )


def uses_dependent(size: int, role: TensorRole, settings: QuantSettings) -> bool:
    """Whether a tensor of `size` values is quantized with dependent quantization (QP steps only)."""
    return (
        settings.dependent and role == TensorRole.WEIGHT and size >= DEPENDENT_MIN_VALUES
        and settings.bits is None and not settings.rdo and not settings.lossless
    )


def dequantize(levels: np.ndarray, steps: np.ndarray, chain: int = 0) -> np.ndarray:
    """float32 reconstruction level * step, with one step per first-axis row when several are given.

    With dependent quantization (`chain` > 0) the levels first become points of the half-step grid.
    """
    if chain:
        grid = grid_values(levels, chain)  # a fresh float32 array: scaled in place
        half = steps.astype(np.float32) * np.float32(0.5)
        if half.size > 1:
            _channel_view(grid)[...] *= half[:, None]
        else:
            grid *= half[0]
        return grid
    if steps.size > 1:
        rows = _channel_view(levels).astype(np.float32) * steps[:, None].astype(np.float32)
        return rows.reshape(levels.shape)
    return np.multiply(levels, np.float32(steps[0]), dtype=np.float32)
