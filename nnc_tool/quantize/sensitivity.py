"""Measured output sensitivities: how much noise in each tensor moves the model's outputs.

s_i for the equal-slope allocation (quantize/allocation.py): one run of the model per tensor on
a few calibration inputs with noise added to that tensor alone, in onnxruntime (one session whose
tensors are replaced run by run) or through a caller's `run_model` for other formats. Also the
model-running helpers the calibrated passes share (quantize/hessians.py).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from ..graph.cost import multiply_accumulates
from ..graph.onnx_util import cpu_session
from ..inputs import ModelInputs, ReplaceableSession, as_model_inputs, calibration_inputs, run_session
from ..model import Model, Tensor
from .uniform import quantizable

# A non-ONNX model's runner: (model, the calibration's one array or its ModelInputs) -> first output.
RunModel = Callable[[Model, "np.ndarray | ModelInputs"], np.ndarray]

# Probe noise of the sensitivity measurement, relative to the tensor's RMS (small enough to stay
# in the linear regime, large enough to dominate float32 round-off).
PROBE_NOISE = 0.01

# Calibration samples used for the sensitivity runs (the layer Hessians use hessians.HESSIAN_SAMPLES).
SENSITIVITY_SAMPLES = 32

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


def _rms(array: np.ndarray) -> float:
    a = np.asarray(array, dtype=np.float64)
    return float(np.sqrt(np.mean(np.square(a)))) if a.size else 0.0


def sensitivity_samples(model: Model) -> int:
    """Calibration inputs per sensitivity run: SENSITIVITY_SAMPLES, fewer for large models."""
    parameters = sum(t.array.size for t in model.tensors if quantizable(t))
    return int(np.clip(SENSITIVITY_BUDGET // max(parameters, 1), MIN_SENSITIVITY_SAMPLES, SENSITIVITY_SAMPLES))


def affordable_samples(model: Model, calibration: ModelInputs) -> int:
    """Inputs per sensitivity run that keep all the runs within SENSITIVITY_MACS (at least
    MIN_SENSITIVITY_SAMPLES); SENSITIVITY_SAMPLES when the model's cost cannot be counted."""
    if model.format != "onnx" or not len(calibration):
        return SENSITIVITY_SAMPLES
    per_input = multiply_accumulates(model, calibration.feeds(0, 1))
    runs = sum(1 for t in model.tensors if quantizable(t))
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
    probe = _callback_runner(run_model) if run_model is not None else float_outputs
    # One session whose tensors are replaced run by run: a probe costs a run, not a session build.
    overridable = ReplaceableSession(model, calibration_threads()) if run_model is None and model.format == "onnx" else None
    if overridable is not None and overridable.names:
        reference = np.asarray(joined_outputs(overridable.run(x)), dtype=np.float64)
    else:
        overridable = None
        reference = np.asarray(probe(model, x), dtype=np.float64)
    out: dict[str, float] = {}
    for index, tensor in enumerate(model.tensors):
        if not quantizable(tensor):
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
                output = np.asarray(joined_outputs(overridable.run(x, {tensor.name: noisy.astype(tensor.array.dtype)})), dtype=np.float64)
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
# Running an ONNX model on calibration inputs
# --------------------------------------------------------------------------------------------


def run_onnx(model: Model, x: ModelInputs | np.ndarray) -> np.ndarray:
    """First output of an ONNX `Model` on calibration inputs (onnxruntime, one thread): all samples
    in one run where they batch (see nnc_tool.inputs); `x` may be a bare array for a one-input model."""
    return _onnx_outputs(model, x)[0]


def _onnx_outputs(model: Model, x: ModelInputs | np.ndarray) -> list[np.ndarray]:
    from ..formats.onnx_format import to_proto

    inputs = as_model_inputs(x, model)
    session = cpu_session(to_proto(model), calibration_threads())
    return [np.asarray(o) for o in run_session(session, inputs)]


def float_outputs(model: Model, x: ModelInputs) -> np.ndarray:
    return joined_outputs(_onnx_outputs(model, x))


def joined_outputs(outputs: list[np.ndarray]) -> np.ndarray:
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


def calibration_threads() -> int:
    return int(os.environ.get("NNC_CALIBRATION_THREADS", "1"))
