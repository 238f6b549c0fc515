"""Per-tensor step allocation: a QP for every tensor so that bits go where they buy output fidelity.

Uniform QP everywhere spends bits where they buy little output fidelity. At high rate a tensor i
with n_i values quantized with step d_i adds output distortion D_i ~ s_i * d_i^2 / 12 (s_i: the
output MSE per unit of noise variance added to every value of the tensor) and costs
R_i ~ n_i * (h_i - log2 d_i) bits. Minimising sum D_i at fixed sum R_i gives

    d_i^2 ~ n_i / s_i      (equal distortion-rate slope in every tensor),

i.e. QP_i = 2 * log2(n_i / s_i) + const on the QP grid (step 2^(QP/4)). The constant makes the
size-weighted mean QP of the WEIGHT tensors equal to `settings.qp`, so the rate stays about that
of a uniform `settings.qp` and a QP sweep still sweeps rate. QPs stay within qp +- MAX_QP_OFFSET.

Where s_i comes from:
- calibration data: measured (quantize/sensitivity.py): uniform noise of 1 % of the tensor's RMS
  added to tensor i alone, the output MSE on a few inputs (the single-probe estimate is noisy, up
  to 2-6x per tensor on ResNet-18, but the optimum is flat: its allocation keeps 7.04 of the 7.15
  dB an 8x-averaged estimate predicts). NONWEIGHT tensors (biases, norm parameters) are allocated
  the same way. Tensors that do not reach the output on the calibration data (s_i = 0, e.g.
  mobilenet's dead squeeze-excitation branches) get the coarsest QP.
- no data (the default): a proxy. Noise of relative size r = step / RMS(w) in a layer gives
  the layer's output relative noise ~ r whatever its fan-in, so s_i ~ 1 / RMS_i^2 per tensor.
  On the measured sensitivities of the sample models and ResNet-18, steps ~ scale_i * n_i^0.75
  (scale_i: median channel RMS, robust to the huge dead channels of folded BatchNorms) recover
  90-98 % of the optimal allocation gain in dB (ResNet-18 folded: 7.0 of 7.15 dB; mlp 4.5 of
  4.7; lenet 1.4 of 1.6; mobilenet 1.4 of 10.8, whose optimum is dead branches no proxy sees);
  exponent 0.5 recovers 45-95 %; plain RMS (equal relative noise) is worse than uniform QP.
  NONWEIGHT tensors use `qp - NONWEIGHT_QP_OFFSET` (their RMS says nothing about their effect).
Layers whose bias absorbs the mean shift of their rounding error (bias correction, see
quantize/bias_correction.py) lose that share r of their output error: their s_i becomes
s_i * (1 - r), so they take slightly coarser steps (ResNet-18 digits, data-free: BD-rate -1 %
against the same allocation without the credit); error feedback's predicted gain scales s_i the
same way. An explicit `settings.nonweight_qp` always wins over both.

BatchNorm folding rescales a weight's rows: the allocation works on the QPs the unfolded weight
would have had (`fold_qp_shift`), and a folded weight's rows keep their unfolded steps
(`fold_row_offsets`).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..fileio import release_pages
from ..inputs import ModelInputs
from ..model import Model, TensorRole
from .sensitivity import RunModel, measure_sensitivities
from .uniform import QP_RANGE, QuantSettings, effective_nonweight_qp, quantizable, row_slices

# Allocated QPs stay within settings.qp +- this (a step 16x finer or coarser).
MAX_QP_OFFSET = 16

# Bound of a folded weight's per-row offsets (2^16 either way: beyond, a row is dead or exploding).
MAX_ROW_OFFSET = 64

# Data-free proxy: step_i ~ scale_i * n_i^DATA_FREE_SIZE_EXPONENT (see the module docstring).
DATA_FREE_SIZE_EXPONENT = 0.75


def _typical_scale(array: np.ndarray) -> float:
    """Median over output channels (first axis) of the channel RMS.

    Robust where the plain RMS is not: with BatchNorm folded in, a dead channel (variance ~ 0)
    carries weights 100x larger than the others but no signal, and would set a tensor's RMS.
    Computed a block of rows at a time (float64 sums), so a huge tensor needs no float64 copy.
    """
    rows = array.reshape(array.shape[0], -1) if array.ndim >= 2 else array.reshape(1, -1)
    means = np.empty(rows.shape[0], dtype=np.float64)
    for block in row_slices(rows):
        part = rows[block].astype(np.float64)
        means[block] = np.einsum("ij,ij->i", part, part) / max(rows.shape[1], 1)
    release_pages(array)  # a file-mapped tensor is read again only when it is coded
    return float(np.median(np.sqrt(means)))


def allocate_qps(
    model: Model,
    settings: QuantSettings,
    calibration: ModelInputs | np.ndarray | None = None,
    run_model: RunModel | None = None,
    *,
    sensitivities: dict[str, float] | None = None,
    gains: dict[str, float] | None = None,
    fold_shifts: dict[str, float] | None = None,
) -> dict[str, int]:
    """A QP for every quantizable WEIGHT and NONWEIGHT tensor, around `settings.qp`.

    With `calibration` (and `run_model`, or an ONNX model, which is run in onnxruntime) or
    precomputed `sensitivities`: the equal-slope rule on measured sensitivities. Otherwise the
    data-free proxy. `gains` (tensor -> factor <= 1) scale sensitivities for tensors whose
    rounding error will be shaped (GPTQ) or partly cancelled (bias correction), measured or proxy.
    `fold_shifts` (weight -> `fold_qp_shift`) move the allowed window of a weight that BatchNorm
    folding rescaled by that shift: the bound of +- MAX_QP_OFFSET holds for the QP the unfolded
    weight would have had. Deterministic.
    """
    tensors = [t for t in model.tensors if quantizable(t)]
    weights = [t for t in tensors if t.role == TensorRole.WEIGHT]
    if sensitivities is None and calibration is not None:
        if run_model is None and model.format != "onnx":
            raise ValueError("allocate_qps needs run_model to use calibration data with a non-ONNX model")
        sensitivities = measure_sensitivities(model, calibration, run_model)
    gains = gains or {}
    low, high = settings.qp - MAX_QP_OFFSET, settings.qp + MAX_QP_OFFSET

    if sensitivities is None:
        # Data-free: 4 * log2(scale * n^a), weights only; a gain g (s -> g s) moves the QP by -2 log2 g.
        raw = {
            t.name: 4.0 * (np.log2(max(_typical_scale(t.array), 1e-30)) + DATA_FREE_SIZE_EXPONENT * np.log2(t.array.size))
            - 2.0 * np.log2(max(float(gains.get(t.name, 1.0)), 1e-6))
            for t in weights
        }
    else:
        raw = {}
        for t in tensors:
            s = float(sensitivities.get(t.name, np.nan)) * float(gains.get(t.name, 1.0))
            if np.isnan(s):
                continue
            raw[t.name] = -np.inf if s == np.inf else (np.inf if s <= 0 else 2.0 * np.log2(t.array.size / s))

    # The allocation works on the unfolded-equivalent QPs (the rule's constant and the window of
    # +- MAX_QP_OFFSET hold for the weights as trained); folding's shift is added back at the end.
    fold_shifts = {name: shift for name, shift in (fold_shifts or {}).items() if name in raw}
    for name, shift in fold_shifts.items():
        raw[name] -= shift
    finite = [t for t in weights if np.isfinite(raw.get(t.name, np.nan))]
    if finite:
        sizes = np.array([t.array.size for t in finite], dtype=np.float64)
        offset = settings.qp - float(np.dot(sizes, [raw[t.name] for t in finite]) / sizes.sum())
    else:
        offset = 0.0

    fixed_nonweight = effective_nonweight_qp(settings)
    qps: dict[str, int] = {}
    for t in tensors:
        value = raw.get(t.name)
        if t.role == TensorRole.NONWEIGHT and (settings.nonweight_qp is not None or value is None):
            qps[t.name] = fixed_nonweight
            continue
        if value is None:
            qps[t.name] = settings.qp
            continue
        centre = settings.qp if t.role == TensorRole.WEIGHT else fixed_nonweight
        lo, hi = (low, high) if t.role == TensorRole.WEIGHT else (centre - MAX_QP_OFFSET, settings.qp + MAX_QP_OFFSET)
        qp = float(np.clip(value + offset, lo, hi)) if np.isfinite(value) else (hi if value > 0 else lo)
        qp += fold_shifts.get(t.name, 0.0)
        qps[t.name] = int(np.clip(np.rint(qp), *QP_RANGE))
    return qps


def fold_qp_shift(scales: np.ndarray) -> float:
    """How far (in QP) BatchNorm folding moved a weight's natural step: 4 log2 of the median |s|
    of its output channels (median: a few dead channels with huge s must not set it)."""
    scales = np.abs(np.asarray(scales, dtype=np.float64))
    scales = scales[scales > 0]
    return 4.0 * float(np.log2(np.median(scales))) if scales.size else 0.0


def fold_row_offsets(scales: np.ndarray) -> tuple[int, ...] | None:
    """QP offsets per row of a folded weight so that each row keeps the step its unfolded row
    had: 4 log2(s_r / median s) on the QP grid (dead rows, s = 0, take 0). None when every
    offset is 0 (one step serves)."""
    scales = np.abs(np.asarray(scales, dtype=np.float64))
    live = scales > 0
    if not live.any():
        return None
    centre = np.median(scales[live])
    offsets = np.zeros(scales.shape, dtype=np.int64)
    offsets[live] = np.rint(4.0 * np.log2(scales[live] / centre))
    offsets = np.clip(offsets, -MAX_ROW_OFFSET, MAX_ROW_OFFSET)
    return tuple(int(o) for o in offsets) if offsets.any() else None


def tensor_settings(model: Model, settings: QuantSettings, qps: dict[str, int]) -> dict[str, QuantSettings]:
    """Per-tensor settings carrying the allocated QPs (WEIGHT: qp, NONWEIGHT: nonweight_qp)."""
    out = {}
    for t in model.tensors:
        if t.name not in qps:
            continue
        if t.role == TensorRole.WEIGHT:
            out[t.name] = replace(settings, qp=qps[t.name])
        elif t.role == TensorRole.NONWEIGHT:
            out[t.name] = replace(settings, nonweight_qp=qps[t.name])
    return out
