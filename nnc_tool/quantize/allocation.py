"""Per-tensor step allocation and calibrated (output-aware) quantization.

Uniform QP everywhere spends bits where they buy little output fidelity. At high rate a tensor i
with n_i values quantized with step d_i adds output distortion D_i ~ s_i * d_i^2 / 12 (s_i: the
output MSE per unit of noise variance added to every value of the tensor) and costs
R_i ~ n_i * (h_i - log2 d_i) bits. Minimising sum D_i at fixed sum R_i gives

    d_i^2 ~ n_i / s_i      (equal distortion-rate slope in every tensor),

i.e. QP_i = 2 * log2(n_i / s_i) + const on the QP grid (step 2^(QP/4)). The constant makes the
size-weighted mean QP of the WEIGHT tensors equal to `settings.qp`, so the rate stays about that
of a uniform `settings.qp` and a QP sweep still sweeps rate. QPs stay within qp +- MAX_QP_OFFSET.

Where s_i comes from:
- calibration data: s_i is measured by adding uniform noise (1 % of the tensor's RMS) to tensor i
  alone and measuring the output MSE on SENSITIVITY_SAMPLES inputs, fewer for models of over a
  million parameters or whose runs cost more than SENSITIVITY_MACS together (one run per tensor;
  the single-probe estimate is noisy, up to 2-6x per tensor on ResNet-18, but the optimum is
  flat: its allocation keeps 7.04 of the 7.15 dB an 8x-averaged estimate predicts). NONWEIGHT tensors (biases, norm parameters) are allocated the
  same way. Tensors that do not reach the output on the calibration data (s_i = 0, e.g.
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
against the same allocation without the credit).
An explicit `settings.nonweight_qp` always wins over both.

Calibrated ONNX models additionally get error feedback (GPTQ, quantize/rdo.py): the levels of every
Conv / Gemm / MatMul weight are chosen column by column so that the layer's output on the
calibration inputs moves as little as possible, and the allocation uses s_i times GPTQ's
predicted error reduction for that layer (`gptq_gain`). `plan_quantization` does all of it and
returns a model whose compensated weights lie exactly on their quantization grid plus per-tensor
settings; coding that model with those settings reproduces the chosen levels (decoders need
nothing new).

That full calibration costs one sensitivity run per tensor plus every layer's Hessian and its
factorisation (digits ResNet-18: 4-5 s). Past FULL_CALIBRATION_PARAMETERS (or with
calibration_mode "fast") the calibration data only feeds one onnxruntime pass that measures each
layer's input channel moments (graph/measured_stats.py); they replace the BatchNorm estimate of
the data-free plan (Kronecker error feedback, bias correction) and the allocation stays data-free.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from ..defaults import FULL_CALIBRATION_PARAMETERS
from ..fileio import release_pages
from ..graph.activation_stats import ChannelMoments, conv_input_second_moments, layer_inputs
from ..graph.cost import multiply_accumulates
from ..graph.measured_stats import measure_channel_moments
from ..graph.onnx_util import attributes, cpu_session, name_uses
from ..inputs import ModelInputs, ReplaceableSession, as_model_inputs, calibration_inputs, run_session
from ..model import Model, Tensor, TensorRole
from .bias_correction import correct_biases
from .rdo import (
    EXACT_LEVELS, MAX_KERNEL_TAPS, GptqFactor, KroneckerFactor, block_layout, gptq_factor, gptq_gain, gptq_round, kronecker_factor,
    kronecker_gptq_round, kronecker_tap_gain,
)
from .uniform import (
    QP_RANGE, Quantized, QuantSettings, choose_steps, dequantize, effective_nonweight_qp, quantize, row_slices, step_for_qp,
    uses_dependent,
)

# A non-ONNX model's runner: (model, the calibration's one array or its ModelInputs) -> first output.
RunModel = Callable[[Model, "np.ndarray | ModelInputs"], np.ndarray]

# Allocated QPs stay within settings.qp +- this (a step 16x finer or coarser).
MAX_QP_OFFSET = 16
# Bound of a folded weight's per-row offsets (2^16 either way: beyond, a row is dead or exploding).
MAX_ROW_OFFSET = 64
# Data-free proxy: step_i ~ scale_i * n_i^DATA_FREE_SIZE_EXPONENT (see the module docstring).
DATA_FREE_SIZE_EXPONENT = 0.75
# Probe noise of the sensitivity measurement, relative to the tensor's RMS (small enough to stay
# in the linear regime, large enough to dominate float32 round-off).
PROBE_NOISE = 0.01
# Calibration samples used for the sensitivity runs and for the layer Hessians.
SENSITIVITY_SAMPLES = 32
HESSIAN_SAMPLES = 256
# One probe run per tensor costs about samples x parameters: past this many parameter-samples
# per run the sensitivity runs use fewer inputs, down to MIN_SENSITIVITY_SAMPLES. Calibrated
# ResNet-18 (11.2 M parameters, 4 inputs instead of 32): BD-rate vs NNCodec -32.2 % instead of
# -32.4 %, sensitivities in 1.5 s instead of 8.3 s; mobilenet with 4 inputs: -39.7 % vs -40.2 %.
SENSITIVITY_BUDGET = 32 << 20
MIN_SENSITIVITY_SAMPLES = 4
# And by cost: past this many multiply-accumulates for all the runs together (graph/cost.py; a
# count, not a timing, so the bytes do not depend on the machine) they use fewer inputs, down to
# MIN_SENSITIVITY_SAMPLES. About 50 s of onnxruntime on this 2-core machine (~20 G/s): the layout
# detector (486 tensors, 3.3 G per 800 x 608 page) took 632 s on 16 pages, now 4; the PP-OCR
# detector (123 tensors x 1.1 G) 88 s on 12 inputs, now 7. One input is too few: the detector at
# QP -32 fell from 51.1 to 22.3 dB (4 inputs: 50.9 dB; the recognizer at -38: 49.2 dB with 16,
# 43.7 with 4, 47.2 with 2 - the estimate is noisy, not biased).
SENSITIVITY_MACS = 1e12
# Patch rows per Hessian column beyond which a convolution's output positions are subsampled.
HESSIAN_ROWS_PER_COLUMN = 32
# plan_quantization's cache entry for fast calibration's measured moments (api.prepare_model
# fills it in while BatchNorm is folded).
MEASURED_MOMENTS = "measured_moments"
# Plan-cache keys of BatchNorm folding's per-channel weight scales and of the weights whose rows
# they scale (quantize/fold.py FoldResult.scales / .row_scaled).
FOLD_SCALES = "fold_scales"
FOLD_ROWS = "fold_rows"

_QUANTIZABLE = (TensorRole.WEIGHT, TensorRole.NONWEIGHT)
_FLOATS = ("float32", "float16", "bfloat16", "float64")


def _quantizable(tensor: Tensor) -> bool:
    return tensor.role in _QUANTIZABLE and tensor.dtype in _FLOATS and tensor.array.size > 0


def _rms(array: np.ndarray) -> float:
    a = np.asarray(array, dtype=np.float64)
    return float(np.sqrt(np.mean(np.square(a)))) if a.size else 0.0


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


# --------------------------------------------------------------------------------------------
# Sensitivities
# --------------------------------------------------------------------------------------------


def sensitivity_samples(model: Model) -> int:
    """Calibration inputs per sensitivity run: SENSITIVITY_SAMPLES, fewer for large models."""
    parameters = sum(t.array.size for t in model.tensors if _quantizable(t))
    return int(np.clip(SENSITIVITY_BUDGET // max(parameters, 1), MIN_SENSITIVITY_SAMPLES, SENSITIVITY_SAMPLES))


def affordable_samples(model: Model, calibration: ModelInputs) -> int:
    """Inputs per sensitivity run that keep all the runs within SENSITIVITY_MACS (at least
    MIN_SENSITIVITY_SAMPLES); SENSITIVITY_SAMPLES when the model's cost cannot be counted."""
    if model.format != "onnx" or not len(calibration):
        return SENSITIVITY_SAMPLES
    per_input = multiply_accumulates(model, calibration.feeds(0, 1))
    runs = sum(1 for t in model.tensors if _quantizable(t))
    if not per_input or not runs:
        return SENSITIVITY_SAMPLES
    return int(min(SENSITIVITY_SAMPLES, max(MIN_SENSITIVITY_SAMPLES, SENSITIVITY_MACS / (per_input * runs))))


def measure_sensitivities(
    model: Model,
    calibration: ModelInputs | np.ndarray,
    run_model: RunModel | None = None,
    *,
    noise: float = PROBE_NOISE,
    samples: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """s_i for every quantizable tensor: output MSE per unit noise variance added to all its values.

    One run of the model per tensor on the first `samples` calibration inputs (`run_model`,
    default onnxruntime for ONNX models; default the fewer of `sensitivity_samples(model)` and
    `affordable_samples`); the output error
    is taken over every float output of the graph. Non-negative tensors
    (variances) get reflected noise so they stay non-negative; a run whose output is not finite is
    repeated with 10x smaller noise (twice), and a tensor that still breaks the model gets +inf.
    Deterministic for a given seed.
    """
    x = calibration_inputs(calibration, model)
    if samples is None:
        samples = min(sensitivity_samples(model), affordable_samples(model, x))
    x = x.head(samples)
    probe = _callback_runner(run_model) if run_model is not None else _float_outputs
    # One session whose tensors are replaced run by run: a probe costs a run, not a session build.
    overridable = ReplaceableSession(model, _threads()) if run_model is None and model.format == "onnx" else None
    if overridable is not None and overridable.names:
        reference = np.asarray(_joined_outputs(overridable.run(x)), dtype=np.float64)
    else:
        overridable = None
        reference = np.asarray(probe(model, x), dtype=np.float64)
    out: dict[str, float] = {}
    for index, tensor in enumerate(model.tensors):
        if not _quantizable(tensor):
            continue
        values = tensor.array.astype(np.float64)
        rms = _rms(values)
        if rms == 0.0:
            out[tensor.name] = 0.0
            continue
        rng = np.random.default_rng([seed, index])
        unit = rng.uniform(-np.sqrt(3.0), np.sqrt(3.0), values.shape)  # unit variance
        nonnegative = bool((values >= 0).all())
        sensitivity = float("inf")
        for scale in (noise, noise / 10, noise / 100):
            sigma = scale * rms
            noisy = values + sigma * unit
            if nonnegative:
                noisy = np.abs(noisy)
            if overridable is not None and tensor.name in overridable.names:
                output = np.asarray(_joined_outputs(overridable.run(x, {tensor.name: noisy.astype(tensor.array.dtype)})), dtype=np.float64)
            else:
                tensors = list(model.tensors)
                tensors[index] = Tensor(tensor.name, noisy.astype(tensor.array.dtype), tensor.role)
                output = np.asarray(probe(replace(model, tensors=tensors), x), dtype=np.float64)
            if np.isfinite(output).all():
                added = float(np.mean(np.square(noisy.astype(tensor.array.dtype).astype(np.float64) - values)))
                sensitivity = float(np.mean(np.square(output - reference))) / added if added > 0 else 0.0
                break
        out[tensor.name] = sensitivity
    return out


# --------------------------------------------------------------------------------------------
# Allocation
# --------------------------------------------------------------------------------------------


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
    tensors = [t for t in model.tensors if _quantizable(t)]
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


# --------------------------------------------------------------------------------------------
# The whole plan
# --------------------------------------------------------------------------------------------


@dataclass
class QuantPlan:
    """What to code: `model` (weights possibly replaced by on-grid compensated values) and the
    settings of each tensor (`settings[name]`, falling back to the global settings)."""

    model: Model
    settings: dict[str, QuantSettings]
    qps: dict[str, int] = field(default_factory=dict)
    compensated: list[str] = field(default_factory=list)  # tensors quantized with error feedback
    corrected: list[str] = field(default_factory=list)  # biases corrected for their weight's rounding
    # Levels already chosen while planning (bias correction needs the reconstruction): the coder
    # reuses them instead of running the (trellis) quantization of those tensors again.
    quantized: dict[str, Quantized] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # e.g. why calibration data went unused
    calibration_mode: str | None = None  # "full" or "fast": how calibration data was used; None: not at all

    def settings_for(self, tensor: Tensor, default: QuantSettings) -> QuantSettings:
        return self.settings.get(tensor.name, default)


def fast_calibration(model: Model, settings: QuantSettings) -> bool:
    """Whether calibration data goes to one pass of measured channel moments (graph/measured_stats.py)
    instead of sensitivity runs and layer Hessians: `settings.calibration_mode` "fast", or "auto"
    for ONNX models of over FULL_CALIBRATION_PARAMETERS weight parameters (counted in WEIGHT
    tensors, so the answer is the same before and after BatchNorm folding)."""
    if model.format != "onnx" or settings.lossless or settings.bits is not None:
        return False
    if settings.calibration_mode == "auto":
        weights = sum(t.array.size for t in model.tensors if t.role == TensorRole.WEIGHT and _quantizable(t))
        return weights > FULL_CALIBRATION_PARAMETERS
    return settings.calibration_mode == "fast"


def plan_quantization(
    model: Model,
    settings: QuantSettings,
    calibration: ModelInputs | np.ndarray | None = None,
    run_model: RunModel | None = None,
    *,
    allocate: bool | None = None,
    error_feedback: bool | None = None,
    sensitivities: dict[str, float] | None = None,
    cache: dict | None = None,
    moments: dict[str, ChannelMoments] | None = None,
    refinements: Mapping[str, int | None] | None = None,
) -> QuantPlan:
    """Per-tensor QPs (allocate) and, for ONNX models with calibration data, GPTQ error feedback.

    `refinements` (the encoder's self-check, nnc_tool/verify.py) code named tensors that many QP
    finer than the plan would, or exactly (None); error feedback and bias correction then work
    with those steps.

    `allocate` / `error_feedback` default to the settings' fields. `calibration`: ModelInputs (or
    a bare array for a one-input model, see nnc_tool.inputs). `run_model(model, x)` returns the
    first output for a batch of a non-ONNX model (only used with calibration data; ONNX models
    run in onnxruntime on all their inputs and outputs). Returns the model unchanged and no
    per-tensor settings when there is nothing to do (lossless, `bits` mode, allocate=False without calibration). `cache` (a dict the
    caller keeps) holds what depends on the model and calibration data but not on the QP
    (sensitivities, layer Hessians), so repeated plans at other QPs (rate control) skip them.
    `moments` (graph.activation_stats.channel_moments of the model before BatchNorm folding)
    enable bias correction (`settings.bias_correction`) of the layers whose mean input they tell,
    and Kronecker error feedback of the convolutions whose input covariance they tell. With
    `fast_calibration`, the calibration data only measures such moments (kept in `cache` under
    MEASURED_MOMENTS; a caller may fill that in beforehand) and the plan is otherwise data-free.
    """
    allocate = settings.allocate if allocate is None else allocate
    error_feedback = settings.error_feedback if error_feedback is None else error_feedback
    if settings.lossless or settings.bits is not None:
        return QuantPlan(model, {})
    refinements = dict(refinements or {})
    exact = {name for name, finer in refinements.items() if finer is None}
    if exact:
        model = replace(model, tensors=[Tensor(t.name, t.array, TensorRole.EXACT) if t.name in exact else t for t in model.tensors])
    calibration = calibration_inputs(calibration, model)
    calibrated = calibration is not None
    notes: list[str] = []
    if calibrated and run_model is None and model.format != "onnx":
        notes.append(f"calibration data unused: measuring a {model.format} model needs a run_model callback")
        calibrated = False
    hessians: dict[str, _LayerHessian] = {}
    cache = {} if cache is None else cache
    calibration_mode = None
    if calibrated and fast_calibration(model, settings):
        if MEASURED_MOMENTS not in cache:
            cache[MEASURED_MOMENTS] = measure_channel_moments(model, calibration)
        # Measured moments stand in for the BatchNorm estimate where both exist.
        moments = {**(moments or {}), **cache[MEASURED_MOMENTS]}
        calibrated, calibration_mode = False, "fast"
    elif calibrated:
        calibration_mode = "full"
    # Per-channel steps are re-derived from each row's peak when coding, which error feedback
    # moves: only per-tensor steps keep compensated values exactly on their grid.
    feedback = calibrated and error_feedback and model.format == "onnx" and not settings.per_channel
    measured = allocate and calibrated and sensitivities is None
    with ThreadPoolExecutor(max_workers=1) as pool:
        probes = None
        if measured and "sensitivities" not in cache and feedback and "hessians" not in cache and run_model is None:
            # onnxruntime releases the GIL: the sensitivity runs (one core) overlap the Hessians
            # and their factors (ResNet-18: 1.2 s of 5.5 s). Neither result depends on the other.
            probes = pool.submit(measure_sensitivities, model, calibration)
        if feedback:
            if "hessians" not in cache:
                cache["hessians"] = layer_hessians(model, calibration.head(HESSIAN_SAMPLES))
                for layer in cache["hessians"].values():
                    layer.factors()
            hessians = cache["hessians"]
        if measured:
            if "sensitivities" not in cache:
                cache["sensitivities"] = probes.result() if probes else measure_sensitivities(model, calibration, run_model)
            sensitivities = cache["sensitivities"]
    qps: dict[str, int] = {}
    tensor_names = {t.name for t in model.tensors if t.role == TensorRole.WEIGHT and _quantizable(t)}
    fold_shifts = {
        name: fold_qp_shift(scales) for name, scales in cache.get(FOLD_SCALES, {}).items() if name in tensor_names
    }
    estimated = {} if feedback or not error_feedback else _estimated_feedback(model, settings, moments)
    inputs = layer_inputs(model, moments) if settings.bias_correction and moments else {}
    # Error feedback already cancels the mean shift as the calibration data has it; the BatchNorm
    # estimate would only add its own error there (sample resnet, QP -42/-34/-26: -2.1/-1.3/-2.6 dB).
    # Estimated feedback's second moments include the BatchNorm means as well.
    inputs = {name: layer for name, layer in inputs.items() if name not in hessians and name not in estimated and name not in exact}
    if allocate:
        # Error feedback shapes a layer's error (GPTQ's predicted gain); otherwise bias correction
        # removes its mean-shift share. Either makes the tensor less sensitive per unit of noise.
        # Not for dependent quantization: its error hardly shifts the mean (the trellis alternates
        # its signs), so correction removes far less of it (ResNet-18: the credit cost 0.9 dB).
        sizes = {t.name: t.array.size for t in model.tensors}
        gains = {
            name: 1.0 - layer.removable for name, layer in inputs.items()
            if layer.removable > 0 and not uses_dependent(sizes.get(name, 0), TensorRole.WEIGHT, settings)
        }
        gains.update({name: lh.gain() for name, lh in hessians.items()})  # disjoint from `inputs`
        gains.update({
            name: factor.channel_gain * kronecker_tap_gain(kernel, settings.kernel_correlation)
            for name, (factor, kernel) in estimated.items()
        })
        qps = allocate_qps(
            model, settings, calibration if calibrated else None, run_model, sensitivities=sensitivities, gains=gains,
            fold_shifts=fold_shifts,
        )
    else:
        # One QP for every weight means one QP for the weights as the model was trained, before
        # folding rescaled some of them.
        qps = {name: int(np.clip(np.rint(settings.qp + shift), *QP_RANGE)) for name, shift in fold_shifts.items()}
    for t in model.tensors:
        finer = refinements.get(t.name)
        if finer and _quantizable(t):
            base = settings.qp if t.role == TensorRole.WEIGHT else effective_nonweight_qp(settings)
            qps[t.name] = int(np.clip(qps.get(t.name, base) - finer, *QP_RANGE))
    per_tensor = tensor_settings(model, settings, qps)
    if not settings.per_channel:
        for name in cache.get(FOLD_ROWS, ()):
            if name in fold_shifts:
                offsets = fold_row_offsets(cache[FOLD_SCALES][name])
                if offsets is not None:
                    per_tensor[name] = replace(per_tensor.get(name, settings), row_qp_offsets=offsets)
    tensors, compensated = [], []
    for t in model.tensors:
        lh = hessians.get(t.name)
        if lh is None or t.role == TensorRole.EXACT:
            tensors.append(t)
            continue
        own = per_tensor.get(t.name, settings)
        steps, _ = choose_steps(t.array.astype(np.float32), t.role, own)
        reconstruction = lh.quantize(t.array, steps)
        if reconstruction is None:
            tensors.append(t)
            continue
        tensors.append(Tensor(t.name, reconstruction, t.role))
        per_tensor[t.name] = _on_grid(own)
        compensated.append(t.name)
    chosen: dict[str, Quantized] = {}  # levels already chosen here, for the coder
    if estimated:
        tensors, rounded = _round_estimated(tensors, estimated, per_tensor, settings, chosen)
        for name in rounded:
            per_tensor[name] = _on_grid(per_tensor.get(name, settings))
        compensated.extend(rounded)
    if compensated:
        model = replace(model, tensors=tensors)
    # No layer left to bias correction has error feedback: the coder quantizes its weights itself.
    model, corrected = correct_biases(model, inputs, lambda t: _reconstruction(t, per_tensor.get(t.name, settings), chosen))
    return QuantPlan(
        model, per_tensor, qps, compensated, corrected, quantized=chosen, notes=notes, calibration_mode=calibration_mode
    )


def _on_grid(settings: QuantSettings) -> QuantSettings:
    """Settings of a compensated tensor: its values already lie on the grid, so the coder codes
    them as they are (no rate-aware, dependent or kernel-feedback rounding on top)."""
    return replace(settings, rdo=0.0, dependent=False, kernel_correlation=0.0)


def _estimated_feedback(
    model: Model, settings: QuantSettings, moments: dict[str, ChannelMoments] | None
) -> dict[str, tuple[KroneckerFactor, tuple[int, ...]]]:
    """Error feedback across input channels without layer Hessians: for every convolution whose
    input's channel covariance `moments` give (estimated from BatchNorm statistics,
    graph/activation_stats.py, or measured by fast calibration, graph/measured_stats.py), the
    Kronecker factor of its estimated input Hessian E[x x^T] (channels) x S (taps: kernel
    feedback's prior, the identity at kernel_correlation 0), with the kernel shape. Only where
    the rounding is otherwise plain uniform rounding of one step per tensor.

    Data-free BD-rate vs NNCodec at equal output SNR (benchmarks/rd_vs_nncodec.py --data-free),
    kernel feedback alone -> with this: digits ResNet-18 -19.2 -> -21.2 %, sample resnet -24.0 ->
    -25.3 %, mobilenet -25.4 -> -27.2 %. The estimated covariances are crude (they correlate with
    measured ones at 0.1-0.3), yet better than none: estimating them from a quarter of each
    filter's weights gave -19.9 %."""
    if (
        not moments or settings.bits is not None or settings.lossless or settings.rdo or settings.dependent
        or settings.per_channel
    ):
        return {}
    tensors = model.tensor_map()
    out = {}
    for name, second in conv_input_second_moments(model, moments).items():
        tensor = tensors[name]
        kernel = tuple(int(k) for k in tensor.array.shape[2:])
        if tensor.role != TensorRole.WEIGHT or tensor.dtype != "float32" or int(np.prod(kernel)) > MAX_KERNEL_TAPS or tensor.array.size == 0:
            continue
        try:
            out[name] = (kronecker_factor(second), kernel)
        except np.linalg.LinAlgError:  # not positive definite even when damped: kernel feedback alone
            continue
    return out


def _round_estimated(
    tensors: list[Tensor],
    estimated: dict[str, tuple[KroneckerFactor, tuple[int, ...]]],
    per_tensor: dict[str, QuantSettings],
    settings: QuantSettings,
    chosen: dict[str, Quantized],
) -> tuple[list[Tensor], list[str]]:
    """Round the `estimated` convolutions with Kronecker GPTQ (all layers of one kernel shape
    side by side); returns the tensors with those weights on their grid, and their names. Their
    levels go to `chosen` for the coder."""
    by_kernel: dict[tuple[int, ...], list[tuple[int, np.ndarray, KroneckerFactor]]] = {}
    for position, tensor in enumerate(tensors):
        if tensor.name in estimated and np.isfinite(tensor.array).all():
            factor, kernel = estimated[tensor.name]
            own = per_tensor.get(tensor.name, settings)
            _, qps = choose_steps(tensor.array, tensor.role, own)  # one QP, or one per row of a folded weight
            by_kernel.setdefault(kernel, []).append((position, qps, factor))
    out, rounded = list(tensors), []
    for kernel, layers in by_kernel.items():
        steps = [step_for_qp(qps) for _, qps, _ in layers]
        # Rows are rounded independently: a row with its own step is the same problem on the row
        # divided by that step with step 1.
        levels = kronecker_gptq_round(
            [(_scaled_rows(tensors[position].array, step), 1.0 if step.size > 1 else float(step[0]), factor)
             for (position, _, factor), step in zip(layers, steps)],
            kernel, settings.kernel_correlation,
        )
        for (position, qps, _), step, level in zip(layers, steps, levels):
            tensor = tensors[position]
            if np.abs(level).max(initial=0) >= EXACT_LEVELS:  # float32 could not hold level * step exactly
                continue
            level = level.reshape(tensor.array.shape)
            chosen[tensor.name] = Quantized(level, step, qps)
            out[position] = Tensor(tensor.name, dequantize(level, step), tensor.role)  # as the decoder rebuilds them
            rounded.append(tensor.name)
    return out, rounded


def _scaled_rows(array: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """A convolution weight as [rows, channels, taps], each row divided by its own step when it has one."""
    rows = array.reshape(*array.shape[:2], -1)
    if steps.size == 1:
        return rows
    return (rows / steps.astype(np.float32)[:, None, None]).astype(np.float32)


def _reconstruction(tensor: Tensor, settings: QuantSettings, chosen: dict[str, Quantized]) -> np.ndarray | None:
    """The values the decoder will rebuild for `tensor` coded with `settings` (None: coded
    exactly); the levels are kept in `chosen` for the coder."""
    quantized = quantize(tensor.array, tensor.role, settings)
    if quantized is None:
        return None
    chosen[tensor.name] = quantized
    return dequantize(quantized.levels, quantized.steps, quantized.chain)


# --------------------------------------------------------------------------------------------
# ONNX: running the model, layer inputs and their Hessians
# --------------------------------------------------------------------------------------------


def run_onnx(model: Model, x: ModelInputs | np.ndarray) -> np.ndarray:
    """First output of an ONNX `Model` on calibration inputs (onnxruntime, one thread): all samples
    in one run where they batch (see nnc_tool.inputs); `x` may be a bare array for a one-input model."""
    return _onnx_outputs(model, x)[0]


def _onnx_outputs(model: Model, x: ModelInputs | np.ndarray) -> list[np.ndarray]:
    from ..formats.onnx_format import to_proto

    inputs = as_model_inputs(x, model)
    session = cpu_session(to_proto(model), _threads())
    return [np.asarray(o) for o in run_session(session, inputs)]


def _float_outputs(model: Model, x: ModelInputs) -> np.ndarray:
    return _joined_outputs(_onnx_outputs(model, x))


def _joined_outputs(outputs: list[np.ndarray]) -> np.ndarray:
    """The float outputs of a run as one array whose mean square error is the output error: the
    output itself for a one-output model, else every float output flattened and concatenated."""
    floats = [np.asarray(o) for o in outputs if np.issubdtype(np.asarray(o).dtype, np.floating)]
    if len(floats) == 1:
        return floats[0]
    return np.concatenate([o.reshape(-1) for o in floats]) if floats else np.zeros(0)


def _callback_runner(run_model: RunModel) -> Callable[[Model, ModelInputs], np.ndarray]:
    def run(model: Model, x: ModelInputs) -> np.ndarray:
        return run_model(model, x.single if x.single is not None else x)

    return run


def _threads() -> int:
    return int(os.environ.get("NNC_CALIBRATION_THREADS", "1"))


@dataclass
class _LayerHessian:
    """Input Hessians of one weight tensor: W viewed as [rows, cols] blocks (y = W x per group),
    each group's Hessian as its [count, width, width] diagonal column blocks (rdo.GPTQ_BLOCK)."""

    shape: tuple[int, ...]
    transpose: bool  # Gemm(transB=0) / MatMul: the stored tensor is [cols, rows]
    groups: list[tuple[slice, np.ndarray]]  # (row slice, H blocks)
    _factors: list[GptqFactor] | None = None

    @property
    def cols(self) -> int:
        if self.transpose:
            return self.shape[0]
        return int(np.prod(self.shape[1:]))

    def factors(self) -> list[GptqFactor]:
        if self._factors is None:
            self._factors = [gptq_factor(h, cols=self.cols) for _, h in self.groups]
        return self._factors

    def gain(self) -> float:
        total = weighted = 0.0
        for (rows, h), factor in zip(self.groups, self.factors()):
            energy = float(np.trace(h, axis1=1, axis2=2).sum()) * (rows.stop - rows.start)
            weighted += gptq_gain(h, factor=factor) * energy
            total += energy
        return weighted / total if total > 0 else 1.0

    def quantize(self, array: np.ndarray, steps: np.ndarray) -> np.ndarray | None:
        """float32 reconstruction (levels * step) of the tensor with error feedback, or None."""
        if array.dtype != np.float32 or not np.isfinite(array).all():
            return None
        matrix = array.T if self.transpose else array.reshape(array.shape[0], -1)
        matrix = np.asarray(matrix, dtype=np.float64)
        if self.transpose and steps.size > 1:
            return None  # per-channel steps follow the stored first axis, not y's rows
        row_steps = np.broadcast_to(steps.astype(np.float64), (matrix.shape[0],)) if steps.size > 1 else np.full(matrix.shape[0], float(steps[0]))
        levels = np.empty(matrix.shape, dtype=np.int64)
        for (rows, _), factor in zip(self.groups, self.factors()):
            levels[rows] = gptq_round(matrix[rows], None, row_steps[rows], factor=factor)
        if np.abs(levels).max(initial=0) >= EXACT_LEVELS:  # float32 could not hold level * step exactly
            return None
        values = (levels.astype(np.float64) * row_steps[:, None]).astype(np.float32)
        if self.transpose:
            values = values.T
        return np.ascontiguousarray(values.reshape(self.shape))


def layer_hessians(model: Model, calibration: ModelInputs | np.ndarray) -> dict[str, _LayerHessian]:
    """H = sum of x x^T over the calibration inputs of every Conv (1-D/2-D), Gemm and MatMul weight,
    as its diagonal column blocks (only those feed error feedback, see rdo.GPTQ_BLOCK).

    Only WEIGHT tensors in float32 used by exactly one such node of the main graph qualify; the
    layer inputs come from one onnxruntime run of the original model with them as extra outputs.
    """
    from onnx import helper

    from ..formats.onnx_format import to_proto

    proto = to_proto(model)
    by_name = {t.name: t for t in model.tensors}
    uses = name_uses(proto.graph)  # subgraph reads count too: GPTQ sees the main graph's inputs only

    wanted = {}
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        name = node.input[1]
        tensor = by_name.get(name)
        if tensor is None or tensor.role != TensorRole.WEIGHT or tensor.dtype != "float32" or uses.get(name) != 1:
            continue
        attrs = attributes(node)
        if node.op_type == "Conv" and (tensor.array.ndim not in (3, 4) or any(d != 1 for d in attrs.get("dilations", [1]))):
            continue
        if node.op_type == "Gemm" and (attrs.get("transA", 0) or tensor.array.ndim != 2):
            continue
        if node.op_type == "MatMul" and tensor.array.ndim != 2:
            continue
        wanted[name] = node
    if not wanted:
        return {}

    inputs = as_model_inputs(calibration, model)
    graph_inputs = inputs.names
    existing = {o.name for o in proto.graph.output}
    extra = sorted({n.input[0] for n in wanted.values()} - existing - set(graph_inputs) - set(by_name))
    for name in extra:
        proto.graph.output.append(helper.make_empty_tensor_value_info(name))
    session = cpu_session(proto, _threads())
    # Layer inputs of samples run one at a time join along their batch axis, as batched ones do.
    parts, fed = [], []
    for start, stop in inputs.ranges():
        feeds = inputs.feeds(start, stop)
        parts.append(session.run(None, feeds))
        fed.append([feeds[name] for name in graph_inputs])
    joined = [_join_rows(p) for p in zip(*parts)]
    values = dict(zip((o.name for o in session.get_outputs()), joined))
    values.update({name: _join_rows(f) for name, f in zip(graph_inputs, zip(*fed))})

    out = {}
    for name, node in wanted.items():
        act = values.get(node.input[0])
        if act is None:
            continue
        shape = by_name[name].array.shape
        try:
            if node.op_type == "Conv":
                groups = _conv_hessians(act, shape, attributes(node))
                out[name] = _LayerHessian(shape, False, groups)
            else:
                transpose = node.op_type == "MatMul" or not attributes(node).get("transB", 0)
                cols = shape[0] if transpose else shape[1]
                rows = shape[1] if transpose else shape[0]
                if act.shape[-1] != cols:
                    continue
                h = _gram(act.reshape(-1, cols))
                out[name] = _LayerHessian(shape, transpose, [(slice(0, rows), h)])
        except ValueError:
            continue
    return out


def _join_rows(arrays: tuple[np.ndarray, ...]) -> np.ndarray:
    if len(arrays) == 1 or any(np.ndim(a) == 0 for a in arrays):
        return np.asarray(arrays[0])
    return np.concatenate(arrays)


class _BlockGram:
    """Accumulates the diagonal [width, width] blocks of sum x_r x_r^T over patch rows x_r:
    float32 products per chunk of rows, summed in float64."""

    def __init__(self, cols: int) -> None:
        self.cols = cols
        self.count, self.width = block_layout(cols)
        self.blocks = np.zeros((self.count, self.width, self.width), dtype=np.float64)

    def add(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        # Column slices of a C-ordered matrix go to BLAS as they are (no copy); the last block's
        # padding columns stay zero.
        for k in range(self.count):
            start = k * self.width
            part = rows[:, start : min(start + self.width, self.cols)]
            self.blocks[k, : part.shape[1], : part.shape[1]] += part.T @ part


def _gram(x: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Diagonal blocks of sum of x_r x_r^T over the rows (see _BlockGram)."""
    gram = _BlockGram(x.shape[1])
    for start in range(0, x.shape[0], chunk):
        gram.add(x[start : start + chunk])
    return gram.blocks


def _conv_hessians(act: np.ndarray, shape: tuple[int, ...], attrs: dict) -> list[tuple[slice, np.ndarray]]:
    """Per group: (output-channel slice, diagonal blocks of the Hessian of the im2col patches),
    columns in W's layout."""
    spatial = len(shape) - 2
    if act.ndim != spatial + 2:
        raise ValueError("activation rank does not match the kernel")
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ValueError("auto_pad is not supported")
    group = int(attrs.get("group", 1))
    kernel = tuple(shape[2:])
    strides = tuple(attrs.get("strides", [1] * spatial))
    pads = list(attrs.get("pads", [0] * (2 * spatial)))
    padding = [(0, 0), (0, 0)] + [(pads[d], pads[d + spatial]) for d in range(spatial)]
    x = np.pad(act, padding)
    windows = np.lib.stride_tricks.sliding_window_view(x, kernel, axis=tuple(range(2, 2 + spatial)))
    index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)
    windows = windows[index]  # N, C, out..., k...
    channels = act.shape[1]
    if channels != shape[1] * group or shape[0] % group:
        raise ValueError("kernel does not match the input channels")
    per_in, per_out = channels // group, shape[0] // group
    cols = per_in * int(np.prod(kernel))
    # Move C next to the kernel axes: N, out..., C, k...
    axes = (0,) + tuple(range(2, 2 + spatial)) + (1,) + tuple(range(2 + spatial, 2 + 2 * spatial))
    # Wide early layers have far more patch rows than a [cols, cols] Hessian needs (ResNet-18's
    # first stage: 65 536 rows for 576 columns): keep every k-th output position along each
    # spatial axis so that about HESSIAN_ROWS_PER_COLUMN rows per column remain.
    total = act.shape[0] * int(np.prod(windows.shape[2 : 2 + spatial]))
    keep = max(1, int((total / (HESSIAN_ROWS_PER_COLUMN * cols)) ** (1.0 / spatial))) if spatial else 1
    if keep > 1:
        windows = windows[(slice(None), slice(None)) + (slice(None, None, keep),) * spatial]
    positions = int(np.prod(windows.shape[2 : 2 + spatial]))
    per_chunk = max(1, 4096 // max(positions, 1))  # samples per im2col chunk (~4096 patch rows)
    groups = []
    for g in range(group):
        part = windows[:, g * per_in : (g + 1) * per_in].transpose(axes)
        gram = _BlockGram(cols)
        for start in range(0, part.shape[0], per_chunk):
            gram.add(part[start : start + per_chunk].reshape(-1, cols))
        groups.append((slice(g * per_out, (g + 1) * per_out), gram.blocks))
    return groups
