"""The quantization plan: a step for every tensor, then the values each is rounded to.

`plan_quantization` runs the passes in order:

1. measure: with calibration data, the output sensitivity of every tensor
   (quantize/sensitivity.py) and every layer's input Hessian (quantize/hessians.py), or for
   large models ("fast" calibration) only the layers' input channel moments
   (graph/measured_stats.py), which replace the BatchNorm estimate;
2. allocate: a QP per tensor (quantize/allocation.py), credited for the error feedback or bias
   correction it will get, then the self-check's refinements and folded weights' row offsets;
3. round: GPTQ on measured Hessians (quantize/rdo.py) or, without them, Kronecker error feedback
   on estimated channel covariances (quantize/feedback.py) - the compensated weights lie exactly
   on their grid and their levels go to the coder;
4. correct: biases absorb the mean shift of their weight's rounding where the layer's mean input
   is known (quantize/bias_correction.py).

Everything else (nearest, rate-aware, dependent or kernel-feedback rounding) happens when the
coder quantizes a tensor with the settings the plan gives it (quantize/uniform.py).

Calibrated ONNX models get error feedback (GPTQ): the levels of every Conv / Gemm / MatMul weight
are chosen column by column so that the layer's output on the calibration inputs moves as little
as possible, and the allocation uses s_i times GPTQ's predicted error reduction for that layer
(`LayerHessian.gain`: `gptq_gain` on the calibration inputs, corrected for GPTQ having fitted
its compensation to them). Coding the plan's model with its settings reproduces the chosen levels (decoders
need nothing new).

That full calibration costs one sensitivity run per tensor plus every layer's Hessian and its
factorisation (digits ResNet-18: 4-5 s). Past FULL_CALIBRATION_PARAMETERS (or with
calibration_mode "fast") the calibration data only feeds one onnxruntime pass that measures each
layer's input channel moments (graph/measured_stats.py); they replace the BatchNorm estimate of
the data-free plan (Kronecker error feedback, bias correction) and the allocation stays data-free.
"""
from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from ..defaults import FULL_CALIBRATION_PARAMETERS
from ..graph.activation_stats import ChannelMoments, layer_inputs
from ..graph.cost import multiply_accumulates
from ..graph.measured_stats import measure_channel_moments
from ..inputs import ModelInputs, calibration_inputs
from ..model import Model, Tensor, TensorRole
from .allocation import allocate_qps, fold_qp_shift, fold_row_offsets, tensor_settings
from .bias_correction import correct_biases
from .feedback import estimated_feedback, on_grid, round_estimated
from .hessians import HESSIAN_SAMPLES, LayerHessian, layer_hessians
from .rdo import kronecker_tap_gain
from .sensitivity import MIN_SENSITIVITY_SAMPLES, SENSITIVITY_MACS, RunModel, measure_sensitivities
from .uniform import (
    QP_RANGE, Quantized, QuantSettings, choose_steps, dequantize, effective_nonweight_qp, quantizable, quantize, uses_dependent,
)

# plan_quantization's cache entry for fast calibration's measured moments (api.prepare_model
# fills it in while BatchNorm is folded).
MEASURED_MOMENTS = "measured_moments"

# Plan-cache keys of BatchNorm folding's per-channel weight scales and of the weights whose rows
# they scale (quantize/fold.py FoldResult.scales / .row_scaled).
FOLD_SCALES = "fold_scales"
FOLD_ROWS = "fold_rows"

# Plan-cache key of `fast_calibration`'s answers: it counts a run's multiply-accumulates (shape
# inference), which neither every QP of a rate search nor the plan after api.prepare_model's
# answer should redo.
FAST_CALIBRATION = "fast_calibration"


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


def fast_calibration(model: Model, settings: QuantSettings, calibration: ModelInputs | None = None) -> bool:
    """Whether calibration data goes to one pass of measured channel moments (graph/measured_stats.py)
    instead of sensitivity runs and layer Hessians: `settings.calibration_mode` "fast", or "auto"
    for ONNX models of over FULL_CALIBRATION_PARAMETERS weight parameters whose full calibration
    costs more than the sensitivity budget: given `calibration`, a larger model still calibrates
    "full" when one run per WEIGHT tensor on MIN_SENSITIVITY_SAMPLES inputs stays within
    SENSITIVITY_MACS. Both are counts (WEIGHT parameters and tensors, Conv/Gemm/MatMul
    multiply-accumulates), so the answer is the same on every machine and before and after
    BatchNorm folding.

    Full pays where the zoo measured it: the OCR recognizer (2.7 M) -37 % BD-rate against the
    data-free plan, fast -12 % (first encode 32 s against 1.3 s); MiniLM (22.6 M) -5 % with 16
    sentences and -9 % with 128, fast nothing (it has no convolutions to feed), 5 s."""
    if model.format != "onnx" or settings.lossless or settings.bits is not None:
        return False
    if settings.calibration_mode != "auto":
        return settings.calibration_mode == "fast"
    weights = [t.array.size for t in model.tensors if t.role == TensorRole.WEIGHT and quantizable(t)]
    if sum(weights) <= FULL_CALIBRATION_PARAMETERS:
        return False
    if calibration is None or not len(calibration):
        return True
    per_input = multiply_accumulates(model, calibration.feeds(0, 1))
    return per_input is None or per_input * len(weights) * MIN_SENSITIVITY_SAMPLES > SENSITIVITY_MACS


def cached_fast_calibration(model: Model, settings: QuantSettings, calibration: ModelInputs | None, cache: dict) -> bool:
    """`fast_calibration`, answered once per plan cache and settings (the answer is the same
    before and after BatchNorm folding, so api.prepare_model's serves the plans after it)."""
    answers = cache.setdefault(FAST_CALIBRATION, {})
    key = (settings.calibration_mode, settings.lossless, settings.bits)
    if key not in answers:
        answers[key] = fast_calibration(model, settings, calibration)
    return answers[key]


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
    cache = {} if cache is None else cache
    measured = _measure(model, settings, calibration, run_model, allocate, error_feedback, sensitivities, cache, moments)
    estimated = {} if measured.feedback or not error_feedback else estimated_feedback(model, settings, measured.moments)
    correctable = _correctable_layers(model, settings, measured, estimated, exact)
    weights = {t.name for t in model.tensors if t.role == TensorRole.WEIGHT and quantizable(t)}
    fold_shifts = {name: fold_qp_shift(scales) for name, scales in cache.get(FOLD_SCALES, {}).items() if name in weights}
    if allocate:
        qps = allocate_qps(
            model, settings, measured.calibration, run_model, sensitivities=measured.sensitivities,
            gains=_sensitivity_gains(model, settings, measured, estimated, correctable), fold_shifts=fold_shifts,
        )
    else:
        # One QP for every weight means one QP for the weights as the model was trained, before
        # folding rescaled some of them.
        qps = {name: int(np.clip(np.rint(settings.qp + shift), *QP_RANGE)) for name, shift in fold_shifts.items()}
    qps, per_tensor = _settings_per_tensor(model, settings, qps, refinements, cache, fold_shifts)
    model, compensated, chosen = _round(model, settings, per_tensor, measured.hessians, estimated)
    # No layer left to bias correction has error feedback: the coder quantizes its weights itself.
    model, corrected = correct_biases(model, correctable, lambda t: _reconstruction(t, per_tensor.get(t.name, settings), chosen))
    return QuantPlan(
        model, per_tensor, qps, compensated, corrected, quantized=chosen, notes=measured.notes,
        calibration_mode=measured.calibration_mode,
    )


@dataclass
class _Measured:
    """What the measure pass found: the calibration data the allocation may still use, the
    moments (BatchNorm estimate, overridden by measured ones), measured sensitivities and Hessians."""

    calibration: ModelInputs | None  # for a measured allocation; None when it is data-free
    moments: dict[str, ChannelMoments] | None
    sensitivities: dict[str, float] | None
    hessians: dict[str, LayerHessian]
    feedback: bool  # GPTQ on measured Hessians
    calibration_mode: str | None
    notes: list[str]


def _measure(
    model: Model,
    settings: QuantSettings,
    calibration: ModelInputs | np.ndarray | None,
    run_model: RunModel | None,
    allocate: bool,
    error_feedback: bool,
    sensitivities: dict[str, float] | None,
    cache: dict,
    moments: dict[str, ChannelMoments] | None,
) -> _Measured:
    """Pass 1: what calibration data says (all of it kept in `cache` for plans at other QPs)."""
    calibration = calibration_inputs(calibration, model)
    calibrated = calibration is not None
    notes: list[str] = []
    if calibrated and run_model is None and model.format != "onnx":
        notes.append(f"calibration data unused: measuring a {model.format} model needs a run_model callback")
        calibrated = False
    calibration_mode = None
    if calibrated and cached_fast_calibration(model, settings, calibration, cache):
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
    hessians: dict[str, LayerHessian] = {}
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
    return _Measured(calibration if calibrated else None, moments, sensitivities, hessians, feedback, calibration_mode, notes)


def _correctable_layers(model: Model, settings: QuantSettings, measured: _Measured, estimated: dict, exact: set[str]) -> dict:
    """The layers whose bias will absorb their rounding's mean shift (layer name -> LayerInput)."""
    inputs = layer_inputs(model, measured.moments) if settings.bias_correction and measured.moments else {}
    # Error feedback already cancels the mean shift as the calibration data has it; the BatchNorm
    # estimate would only add its own error there (sample resnet, QP -42/-34/-26: -2.1/-1.3/-2.6 dB).
    # Estimated feedback's second moments include the BatchNorm means as well.
    return {name: layer for name, layer in inputs.items() if name not in measured.hessians and name not in estimated and name not in exact}


def _sensitivity_gains(model: Model, settings: QuantSettings, measured: _Measured, estimated: dict, correctable: dict) -> dict[str, float]:
    """Pass 2's credit: how much less sensitive per unit of noise each tensor's rounding will make it.

    Error feedback shapes a layer's error (GPTQ's predicted gain); otherwise bias correction
    removes its mean-shift share. Not for dependent quantization: its error hardly shifts the mean
    (the trellis alternates its signs), so correction removes far less of it (ResNet-18: the
    credit cost 0.9 dB)."""
    sizes = {t.name: t.array.size for t in model.tensors}
    gains = {
        name: 1.0 - layer.removable for name, layer in correctable.items()
        if layer.removable > 0 and not uses_dependent(sizes.get(name, 0), TensorRole.WEIGHT, settings)
    }
    gains.update({name: lh.gain() for name, lh in measured.hessians.items()})  # disjoint from `correctable`
    gains.update({
        name: factor.channel_gain * kronecker_tap_gain(kernel, settings.kernel_correlation)
        for name, (factor, kernel) in estimated.items()
    })
    return gains


def _settings_per_tensor(
    model: Model, settings: QuantSettings, qps: dict[str, int], refinements: dict[str, int | None], cache: dict,
    fold_shifts: dict[str, float],
) -> tuple[dict[str, int], dict[str, QuantSettings]]:
    """The allocated QPs with the self-check's refinements, and as settings with folded weights'
    row offsets."""
    qps = dict(qps)
    for t in model.tensors:
        finer = refinements.get(t.name)
        if finer and quantizable(t):
            base = settings.qp if t.role == TensorRole.WEIGHT else effective_nonweight_qp(settings)
            qps[t.name] = int(np.clip(qps.get(t.name, base) - finer, *QP_RANGE))
    per_tensor = tensor_settings(model, settings, qps)
    if not settings.per_channel:
        for name in cache.get(FOLD_ROWS, ()):
            if name in fold_shifts:
                offsets = fold_row_offsets(cache[FOLD_SCALES][name])
                if offsets is not None:
                    per_tensor[name] = replace(per_tensor.get(name, settings), row_qp_offsets=offsets)
    return qps, per_tensor


def _round(
    model: Model, settings: QuantSettings, per_tensor: dict[str, QuantSettings], hessians: dict[str, LayerHessian],
    estimated: dict,
) -> tuple[Model, list[str], dict[str, Quantized]]:
    """Pass 3: GPTQ on measured Hessians, else Kronecker feedback on estimated covariances. The
    compensated weights replace the model's (on their grid: `per_tensor` is updated so the coder
    codes them as they are); returns the model, their names and the levels already chosen."""
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
        per_tensor[t.name] = on_grid(own)
        compensated.append(t.name)
    chosen: dict[str, Quantized] = {}
    if estimated:
        tensors, rounded = round_estimated(tensors, estimated, per_tensor, settings, chosen)
        for name in rounded:
            per_tensor[name] = on_grid(per_tensor.get(name, settings))
        compensated.extend(rounded)
    if compensated:
        model = replace(model, tensors=tensors)
    return model, compensated, chosen


def _reconstruction(tensor: Tensor, settings: QuantSettings, chosen: dict[str, Quantized]) -> np.ndarray | None:
    """The values the decoder will rebuild for `tensor` coded with `settings` (None: coded
    exactly); the levels are kept in `chosen` for the coder."""
    quantized = quantize(tensor.array, tensor.role, settings)
    if quantized is None:
        return None
    chosen[tensor.name] = quantized
    return dequantize(quantized.levels, quantized.steps, quantized.chain)
