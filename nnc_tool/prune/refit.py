"""Repairing a channel-pruned ONNX model with calibration data, without fine-tuning.

For every layer that reads pruned channels (Conv, Gemm, MatMul with a constant weight), in
topological order, the weights (and bias) are refit by ridge-regularised least squares so that
the layer's pre-activation output on the calibration data matches the *unpruned* model's output
for the output channels it keeps. Convolutions are unfolded into patch matrices (im2col) so one
solve with one right-hand side per output channel refits the whole layer (grouped and depthwise
convolutions: one small solve per conv group). The inputs of each layer are taken from the pruned
model with every earlier refit already applied, so later layers also absorb the error left by
earlier ones; layers further downstream whose input changed that way (e.g. depthwise convs after a
refit pointwise conv) are refit the same way. The ridge penalty pulls towards the current weights,
not towards zero, so a layer with little evidence stays close to what it was.

A layer without a bias gets the intercept folded into the BatchNorm that alone reads its output
(running mean - c), or a new bias input. After all refits, each BatchNormalization downstream of
a change may get its running statistics moment-matched: mean and variance chosen so that the BN
output on the calibration data has the same per-channel mean and spread as in the original
model.

Validation: a quarter of the calibration samples (a seeded random choice) is held out. Each
layer's ridge strength is the one of `RIDGES` whose fit on the other samples best predicts the
layer's held-out target; every change (refit or BN statistics) is kept only if it lowers the
error of the model outputs against the original model on the held-out samples, and a kept change
is then recomputed from all samples.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from numpy.lib.stride_tricks import sliding_window_view
from onnx import helper, numpy_helper

from ..graph.onnx_channels import node_labels
from ..graph.onnx_util import cpu_session

__all__ = ["refit_pruned", "im2col", "Runner"]

try:  # small dense solves: BLAS threads only add overhead, and hurt badly on a busy machine
    from threadpoolctl import threadpool_limits as _threadpool_limits
except ImportError:  # pragma: no cover - optional
    _threadpool_limits = None

HOLDOUT = 0.25  # share of the calibration samples held out to judge every change
RIDGES = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # candidate ridge strengths (relative)

_ROWS_PER_CHUNK = 1 << 16  # im2col rows per accumulation step (bounds memory on big layers)


class Runner:
    """Runs a model on calibration data and returns chosen intermediate values (and the outputs)."""

    def __init__(self, calibration: dict[str, np.ndarray], batch: int = 256):
        self.calibration = calibration
        self.batch = batch
        self.types: dict[str, int] = {}  # element types of values (pruning never changes them)

    def run(self, proto: onnx.ModelProto, values: list[str]) -> dict[str, np.ndarray]:
        work = onnx.ModelProto()
        work.CopyFrom(proto)
        graph = work.graph
        outputs = {o.name for o in graph.output}
        if any(name not in self.types for name in values):
            self.types.update(_elem_types(proto))
        types = self.types
        for name in values:
            if name not in outputs:
                graph.output.append(helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None))
                outputs.add(name)
        session = cpu_session(work, 1, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
        feed = session.get_inputs()[0]
        fixed = feed.shape[0] if feed.shape and isinstance(feed.shape[0], int) and feed.shape[0] > 0 else None
        batch = fixed or self.batch
        count = len(next(iter(self.calibration.values())))
        stop = count - (count % fixed if fixed else 0)
        names = [o.name for o in session.get_outputs()]
        parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for start in range(0, stop, batch):
            results = session.run(names, {n: rows[start : start + batch] for n, rows in self.calibration.items()})
            for name, value in zip(names, results):
                parts[name].append(value)
        return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def _elem_types(proto: onnx.ModelProto) -> dict[str, int]:
    types: dict[str, int] = {}
    try:
        proto = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - fall back to the declared types
        pass
    graph = proto.graph
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    return types


# ---- im2col and the solve ---------------------------------------------------------------------------
def _conv_geometry(node: onnx.NodeProto, spatial_in: tuple[int, ...], kernel: tuple[int, ...]):
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    nd = len(kernel)
    strides = list(attrs.get("strides", [1] * nd))
    dilations = list(attrs.get("dilations", [1] * nd))
    pads = list(attrs.get("pads", [0] * (2 * nd)))
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * nd)
        for i in range(nd):
            out = math.ceil(spatial_in[i] / strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - spatial_in[i], 0)
            small, large = total // 2, total - total // 2
            pads[i], pads[i + nd] = (small, large) if auto_pad == "SAME_UPPER" else (large, small)
    elif auto_pad == "VALID":
        pads = [0] * (2 * nd)
    return strides, dilations, pads


def im2col(
    x: np.ndarray, kernel: tuple[int, ...], strides: list[int], pads: list[int], dilations: list[int]
) -> np.ndarray:
    """Patches of `x` [N, C, *spatial] as rows [N * prod(out spatial), C * prod(kernel)].

    Columns are ordered (C, k1, k2, ...) like a flattened Conv weight [O, C, k1, k2, ...], rows
    (N, o1, o2, ...) like a Conv output transposed to channels-last.
    """
    nd = len(kernel)
    n, c = x.shape[:2]
    padded = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    extent = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilations))
    windows = sliding_window_view(padded, extent, axis=tuple(range(2, 2 + nd)))
    picks = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)
    picks += tuple(slice(None, None, d) for d in dilations)
    windows = windows[picks]
    out_spatial = windows.shape[2 : 2 + nd]
    order = (0,) + tuple(range(2, 2 + nd)) + (1,) + tuple(range(2 + nd, 2 + 2 * nd))
    return windows.transpose(order).reshape(n * math.prod(out_spatial), c * math.prod(kernel))


def _channels_last(y: np.ndarray) -> np.ndarray:
    """[N, C, *spatial] -> [N * prod(spatial), C]."""
    return np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])


def _ridge_solve(gram: np.ndarray, cross: np.ndarray, prior: np.ndarray, ridge: float, intercept: bool) -> np.ndarray:
    """argmin ||X W - Y||^2 + lam ||W - prior||^2 per group, from X^T X [G, d, d] and X^T Y [G, d, o].

    The intercept row (last, if `intercept`) is not shrunk. lam = ridge * mean diagonal of the
    group's X^T X, so `ridge` does not depend on the data's scale or amount.
    """
    d = gram.shape[-1]
    penalised = d - 1 if intercept else d
    diagonal = np.einsum("gii->gi", gram)[:, :penalised]
    scale = diagonal.mean(axis=1) if penalised else np.zeros(gram.shape[0])
    lam = np.where(scale > 0, ridge * scale, ridge)  # [G]
    reg = np.repeat(lam[:, None], d, axis=1)
    if intercept:
        reg[:, -1] = 0.0
    lhs = gram + reg[:, :, None] * np.eye(d)[None]
    rhs = cross + reg[:, :, None] * prior
    try:
        return np.linalg.solve(lhs, rhs)
    except np.linalg.LinAlgError:
        return np.stack([np.linalg.lstsq(lhs[g], rhs[g], rcond=None)[0] for g in range(lhs.shape[0])])


# ---- the graph edits ------------------------------------------------------------------------------
class _Edit:
    """Read and write constants of a model in place."""

    def __init__(self, proto: onnx.ModelProto):
        self.proto = proto
        self.graph = proto.graph
        self.holders: dict[str, onnx.TensorProto] = {t.name: t for t in self.graph.initializer}
        for node in self.graph.node:
            if node.op_type == "Constant" and node.output:
                for attr in node.attribute:
                    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                        self.holders[node.output[0]] = attr.t
        self.uses: dict[str, int] = {}
        for node in self.graph.node:
            for name in node.input:
                self.uses[name] = self.uses.get(name, 0) + 1
        for out in self.graph.output:
            self.uses[out.name] = self.uses.get(out.name, 0) + 1
        self.inputs = {v.name for v in self.graph.input}

    def get(self, name: str) -> np.ndarray | None:
        holder = self.holders.get(name)
        return None if holder is None else numpy_helper.to_array(holder)

    def private(self, name: str) -> bool:
        """A constant this model uses exactly once (safe to change)."""
        return name in self.holders and self.uses.get(name, 0) == 1 and name not in self.inputs

    def set(self, name: str, array: np.ndarray) -> None:
        holder = self.holders[name]
        dtype = numpy_helper.to_array(holder).dtype
        holder.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array).astype(dtype), name))

    def add(self, base: str, array: np.ndarray) -> str:
        taken = set(self.holders) | {o for n in self.graph.node for o in n.output} | self.inputs
        name, k = base, 2
        while name in taken:
            name, k = f"{base}#{k}", k + 1
        tensor = numpy_helper.from_array(np.ascontiguousarray(array), name)
        self.graph.initializer.append(tensor)
        self.holders[name] = self.graph.initializer[-1]
        self.uses[name] = 1
        return name

    def sole_consumer(self, value: str) -> onnx.NodeProto | None:
        if any(o.name == value for o in self.graph.output):
            return None
        readers = [n for n in self.graph.node if value in n.input]
        return readers[0] if len(readers) == 1 else None

    def snapshot(self, names: list[str]) -> dict[str, onnx.TensorProto]:
        saved = {}
        for name in names:
            copy = onnx.TensorProto()
            copy.CopyFrom(self.holders[name])
            saved[name] = copy
        return saved

    def restore(self, saved: dict[str, onnx.TensorProto]) -> None:
        for name, tensor in saved.items():
            self.holders[name].CopyFrom(tensor)


def _bias_target(edit: _Edit, node: onnx.NodeProto) -> tuple[str, str] | None:
    """Where a refit layer's intercept can go: ("input", name), ("bn", bn mean name) or None (add one)."""
    if len(node.input) > 2 and node.input[2]:
        return ("input", node.input[2]) if edit.private(node.input[2]) else ("none", "")
    consumer = edit.sole_consumer(node.output[0])
    if node.op_type == "Conv" and consumer is not None and consumer.op_type == "BatchNormalization":
        mean = consumer.input[3]
        if edit.private(mean):
            return ("bn", mean)
    if node.op_type == "MatMul" and consumer is not None and consumer.op_type == "Add":
        other = consumer.input[1] if consumer.input[0] == node.output[0] else consumer.input[0]
        array = edit.get(other)
        if array is not None and edit.private(other) and array.ndim == 1:
            return ("input", other)
        return ("none", "")
    if node.op_type == "MatMul":
        return ("none", "")
    return None


@dataclass
class _Problem:
    """One layer's least-squares problem: output = design @ W (+ intercept), per conv group."""

    node: onnx.NodeProto
    label: str
    weight: np.ndarray
    groups: int
    width: int  # design columns per group, without the intercept
    out_per: int  # outputs per group
    bias_place: tuple[str, str] | None
    intercept: bool
    prior: np.ndarray  # [groups, width (+1), out_per]
    gram_fit: np.ndarray  # [groups, d, d] over the fitting samples
    cross_fit: np.ndarray  # [groups, d, out_per]
    gram_held: np.ndarray | None  # ... over the held-out samples
    cross_held: np.ndarray | None


def _grams(
    rows_of, y: np.ndarray, start: int, stop: int, per_sample: int, shape: tuple[int, int, int], intercept: bool
) -> tuple[np.ndarray, np.ndarray]:
    """X^T X and X^T Y of samples [start, stop), per conv group, accumulated in chunks of rows.

    `rows_of(a, b)` gives the design rows of samples [a, b), `per_sample` rows each; `shape` is
    (groups, design columns per group, outputs per group).
    """
    groups, width, out_per = shape
    d = width + intercept
    gram = np.zeros((groups, d, d))
    cross = np.zeros((groups, d, out_per))
    step = max(1, _ROWS_PER_CHUNK // per_sample)
    for first in range(start, stop, step):
        last = min(stop, first + step)
        rows = rows_of(first, last).astype(np.float64).reshape(-1, groups, width)
        if intercept:
            rows = np.concatenate([rows, np.ones(rows.shape[:2] + (1,))], axis=2)
        target = y[first * per_sample : last * per_sample].astype(np.float64).reshape(-1, groups, out_per)
        if groups == 1:
            gram[0] += rows[:, 0].T @ rows[:, 0]
            cross[0] += rows[:, 0].T @ target[:, 0]
        else:
            gram += np.einsum("rgi,rgj->gij", rows, rows)
            cross += np.einsum("rgi,rgo->gio", rows, target)
    return gram, cross


def _problem(
    edit: _Edit, node: onnx.NodeProto, label: str, x: np.ndarray, target: np.ndarray, split: int
) -> _Problem | None:
    """The refit problem of `node` from its (pruned) input `x` and wanted output `target`.

    Samples [0, split) are for fitting, [split, N) for choosing the ridge strength. None if the
    layer cannot be refit (computed or shared weight, unsupported attributes).
    """
    weight = edit.get(node.input[1]) if len(node.input) > 1 else None
    if weight is None or not edit.private(node.input[1]):
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    count = x.shape[0]
    groups = 1
    if node.op_type == "Conv":
        groups = int(attrs.get("group", 1))
        if x.ndim != weight.ndim or x.shape[1] != weight.shape[1] * groups or weight.shape[0] % groups:
            return None
        kernel = tuple(int(k) for k in weight.shape[2:])
        strides, dilations, pads = _conv_geometry(node, tuple(x.shape[2:]), kernel)
        y = _channels_last(target)
        rows_of = lambda a, b: im2col(x[a:b], kernel, strides, pads, dilations)  # noqa: E731
        prior = weight.reshape(groups, weight.shape[0] // groups, -1).transpose(0, 2, 1)
    elif node.op_type == "Gemm":
        if attrs.get("transA", 0) or x.ndim != 2:
            return None
        effective = (weight.T if attrs.get("transB", 0) else weight) * float(attrs.get("alpha", 1.0))
        y, rows_of, prior = target, (lambda a, b: x[a:b]), effective[None]
    elif node.op_type == "MatMul":
        if x.ndim != 2 or weight.ndim != 2:
            return None
        y, rows_of, prior = target, (lambda a, b: x[a:b]), weight[None]
    else:
        return None
    if y.shape[0] % count:
        return None
    per_sample = y.shape[0] // count
    width, out_per = prior.shape[1], prior.shape[2]
    bias_place = _bias_target(edit, node)
    intercept = bias_place is None or bias_place[0] != "none"
    prior = prior.astype(np.float64)
    if intercept:
        # the intercept's prior: the layer's current bias as part of its output, else zero
        current = np.zeros(groups * out_per)
        if bias_place is not None and bias_place[0] == "input" and node.op_type != "MatMul":
            bias = edit.get(bias_place[1]).astype(np.float64).reshape(-1)
            if bias.size in (1, groups * out_per):
                current = np.broadcast_to(bias, (groups * out_per,)) * (
                    float(attrs.get("beta", 1.0)) if node.op_type == "Gemm" else 1.0
                )
        prior = np.concatenate([prior, current.reshape(groups, 1, out_per)], axis=1)
    shape = (groups, width, out_per)
    gram_fit, cross_fit = _grams(rows_of, y, 0, split, per_sample, shape, intercept)
    gram_held = cross_held = None
    if split < count:
        gram_held, cross_held = _grams(rows_of, y, split, count, per_sample, shape, intercept)
    return _Problem(
        node, label, weight, groups, width, out_per, bias_place, intercept, prior,
        gram_fit, cross_fit, gram_held, cross_held,
    )


def _solve(problem: _Problem, ridge: float, with_held: bool) -> np.ndarray:
    gram, cross = problem.gram_fit, problem.cross_fit
    if with_held and problem.gram_held is not None:
        gram, cross = gram + problem.gram_held, cross + problem.cross_held
    return _ridge_solve(gram, cross, problem.prior, ridge, problem.intercept)


def _choose_ridge(problem: _Problem, default: float) -> float:
    """The ridge strength of `RIDGES` whose fit on the fitting samples predicts the held-out ones best."""
    if problem.gram_held is None:
        return default
    best, best_error = default, math.inf
    for ridge in RIDGES:
        w = _solve(problem, ridge, with_held=False)
        # ||X_h W - Y_h||^2 up to the constant ||Y_h||^2
        fitted = np.einsum("gio,gij,gjo->", w, problem.gram_held, w, optimize=True)
        error = float(fitted - 2 * np.einsum("gio,gio->", w, problem.cross_held))
        if error < best_error:
            best, best_error = ridge, error
    return best


def _apply(edit: _Edit, problem: _Problem, solution: np.ndarray) -> dict[str, onnx.TensorProto]:
    """Write a solution into the model; returns copies of what it overwrote (a bias it adds is new)."""
    node, weight, width = problem.node, problem.weight, problem.width
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    place = problem.bias_place
    names = [node.input[1]] + ([place[1]] if place is not None and place[0] in ("input", "bn") else [])
    undo = edit.snapshot(names)
    matrix = solution[:, :width, :]  # [groups, width, out_per]
    if node.op_type == "Conv":
        edit.set(node.input[1], matrix.transpose(0, 2, 1).reshape(weight.shape))
    elif node.op_type == "Gemm":
        dense = matrix[0] / float(attrs.get("alpha", 1.0))
        edit.set(node.input[1], dense.T if attrs.get("transB", 0) else dense)
    else:
        edit.set(node.input[1], matrix[0])
    if not problem.intercept:
        return undo
    bias = solution[:, width, :].reshape(-1)
    beta = float(attrs.get("beta", 1.0))
    if place is None:  # the layer had no bias: give it one
        value = bias / beta if node.op_type == "Gemm" and beta not in (0.0, 1.0) else bias
        node.input.append(edit.add(f"{problem.label}.refit_bias", value.astype(weight.dtype)))
    elif place[0] == "input":
        if node.op_type == "MatMul":  # the target excluded the following Add's constant
            value = edit.get(place[1]).astype(np.float64) + bias
        else:
            value = bias / beta if node.op_type == "Gemm" and beta else bias
        edit.set(place[1], value.reshape(-1))
    else:  # fold the intercept into the following BatchNorm: BN(x + c) == BN with running mean - c
        edit.set(place[1], edit.get(place[1]).astype(np.float64) - bias)
    return undo


def _output_error(
    outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray], names: list[str], rows: slice = slice(None)
) -> float:
    """Sum over the outputs of MSE / variance of the reference, over the samples `rows`."""
    total = 0.0
    for name in names:
        ref = reference[name][rows].astype(np.float64)
        diff = outputs[name][rows].astype(np.float64) - ref
        total += float(np.mean(diff**2)) / max(float(np.var(ref)), 1e-12)
    return total


def _bn_moment_match(
    edit: _Edit, node: onnx.NodeProto, x_new: np.ndarray, x_ref: np.ndarray
) -> list[str] | None:
    """Running mean/var so that BN(x_new) has the per-channel mean and spread BN(x_ref) has."""
    names = node.input[1:5]
    if len(names) < 4 or not all(edit.private(n) for n in names[2:4]):
        return None
    mean = edit.get(names[2]).astype(np.float64)
    var = edit.get(names[3]).astype(np.float64)
    eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
    axes = (0,) + tuple(range(2, x_new.ndim))
    mu_ref, sd_ref = x_ref.mean(axis=axes), x_ref.std(axis=axes)
    mu_new, sd_new = x_new.mean(axis=axes), x_new.std(axis=axes)
    scale = np.sqrt(var + eps)
    ok = (sd_ref > 1e-6 * (1 + np.abs(mu_ref))) & (sd_new > 1e-6 * (1 + np.abs(mu_new)))
    new_scale = np.where(ok, scale * sd_new / np.where(ok, sd_ref, 1.0), scale)
    new_mean = np.where(ok, mu_new - new_scale * (mu_ref - mean) / scale, mean)
    new_var = new_scale**2 - eps
    ok &= new_var > 0
    new_mean = np.where(ok, new_mean, mean)
    new_var = np.where(ok, new_var, var)
    if not ok.any():
        return None
    edit.set(names[2], new_mean)
    edit.set(names[3], new_var)
    return [names[2], names[3]]


def refit_pruned(
    original: onnx.ModelProto,
    pruned: onnx.ModelProto,
    layers: list[str],
    kept: dict[tuple[str, int], np.ndarray],
    calibration: dict[str, np.ndarray] | np.ndarray,
    ridge: float = 1e-3,
    recompute_bn: bool = True,
    downstream: bool = True,
    holdout: float = HOLDOUT,
) -> tuple[onnx.ModelProto, list[str]]:
    """Refit `layers` (node labels) of `pruned` to reproduce `original` on `calibration`.

    `kept[(tensor, axis)]` gives the original indices still present along each sliced tensor axis
    (as returned by `structured.remove_channels`); the node order and names of both models are the
    same. Returns the repaired model (a copy) and notes for the report.

    ridge: strength used when no samples are held out (otherwise chosen per layer from `RIDGES`
    on the held-out samples); recompute_bn: try BatchNorm moment matching after the refits;
    downstream: also refit layers after the first refit one whose input changed; holdout: share
    of the samples that judges every change (and picks ridge strengths) before the final fit on all.
    """
    limits = _threadpool_limits(limits=1, user_api="blas") if _threadpool_limits else contextlib.nullcontext()
    with limits:
        return _refit(original, pruned, layers, kept, calibration, ridge, recompute_bn, downstream, holdout)


def _refit(
    original: onnx.ModelProto,
    pruned: onnx.ModelProto,
    layers: list[str],
    kept: dict[tuple[str, int], np.ndarray],
    calibration: dict[str, np.ndarray] | np.ndarray,
    ridge: float,
    recompute_bn: bool,
    downstream: bool,
    holdout: float,
) -> tuple[onnx.ModelProto, list[str]]:
    notes: list[str] = []
    original_inputs = [v for v in original.graph.input if v.name not in {t.name for t in original.graph.initializer}]
    if not isinstance(calibration, dict):
        if len(original_inputs) != 1:
            return pruned, ["refit skipped: a bare calibration array needs a model with exactly one input"]
        calibration = {original_inputs[0].name: calibration}
    types = {v.name: helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type) for v in original_inputs}
    if set(calibration) != set(types):
        return pruned, ["refit skipped: the calibration data does not name the model's inputs"]
    # a seeded shuffle, so the held-out samples are not e.g. the last classes of sorted data
    order = np.random.default_rng(0).permutation(len(next(iter(calibration.values()))))
    calibration = {name: np.asarray(rows).astype(types[name])[order] for name, rows in calibration.items()}
    model = onnx.ModelProto()
    model.CopyFrom(pruned)
    edit = _Edit(model)
    labels = node_labels(model.graph)
    index_of = {label: i for i, label in enumerate(labels)}
    runner = Runner(calibration)
    output_names = [o.name for o in model.graph.output]

    layer_set = {l for l in layers if l in index_of}
    if not layer_set:
        return model, notes
    first = min(index_of[l] for l in layer_set)
    steps: list[tuple[int, str]] = []
    # all layer refits first (topological order), then one pass over the BatchNorms after them:
    # matching BN statistics between refits only disturbs the inputs the next refit fits to
    for i, node in enumerate(model.graph.node):
        if node.op_type in ("Conv", "Gemm", "MatMul") and (labels[i] in layer_set or (downstream and i > first)):
            steps.append((i, "layer"))
    if recompute_bn:
        steps += [(i, "bn") for i, n in enumerate(model.graph.node) if n.op_type == "BatchNormalization" and i > first]

    wanted = set(output_names)
    for i, kind in steps:
        node = model.graph.node[i]
        wanted.update([node.output[0], node.input[0]] if kind == "layer" else [node.input[0]])
    try:
        reference = runner.run(original, sorted(wanted))
    except Exception as err:  # noqa: BLE001 - e.g. an op or dtype onnxruntime cannot run
        text = " ".join(str(err).split())[:200]
        return pruned, [f"refit skipped: onnxruntime cannot run the model ({text})"]

    def out_channels(node: onnx.NodeProto, original_len: int) -> np.ndarray:
        if node.op_type == "BatchNormalization":
            return kept.get((node.input[1], 0), np.arange(original_len))
        weight = node.input[1]
        if node.op_type == "Conv":
            return kept.get((weight, 0), np.arange(original_len))
        if node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            return kept.get((weight, 0 if trans_b else 1), np.arange(original_len))
        return kept.get((weight, 1), np.arange(original_len))

    # fit on the first part of the calibration data, judge every change on the rest
    count = len(next(iter(reference.values())))
    held = int(round(holdout * count)) if count >= 8 else 0
    fit, check = (slice(0, count - held), slice(count - held, count)) if held else (slice(None), slice(None))
    current = runner.run(model, output_names)
    error = _output_error(current, reference, output_names, check)
    start_error = _output_error(current, reference, output_names)
    refit_count = downstream_count = bn_kept = bn_tried = 0
    ridges: list[float] = []
    for i, kind in steps:
        node = model.graph.node[i]
        label = labels[i]
        value = node.input[0]
        x_new = runner.run(model, [value])[value]
        if kind == "layer":
            consumer = label in layer_set
            if not consumer and value in reference and reference[value].shape == x_new.shape:
                if np.allclose(reference[value], x_new, rtol=1e-5, atol=1e-6):
                    continue  # its input did not change: nothing to repair
            target_full = reference[node.output[0]]
            target = np.take(target_full, out_channels(node, target_full.shape[1]), axis=1)
            n_inputs = len(node.input)

            def undo_refit(undo: dict[str, onnx.TensorProto]) -> None:
                edit.restore(undo)
                while len(node.input) > n_inputs:  # drop a bias the refit added
                    added = node.input[-1]
                    del node.input[-1]
                    model.graph.initializer.remove(edit.holders.pop(added))

            problem = _problem(edit, node, label, x_new, target, fit.stop if held else count)
            if problem is None:
                if consumer:
                    notes.append(f"refit: {label} left as is (not a refittable layer)")
                continue
            strength = _choose_ridge(problem, ridge)
            undo = _apply(edit, problem, _solve(problem, strength, with_held=False))
            trial = runner.run(model, output_names)
            trial_error = _output_error(trial, reference, output_names, check)
            if trial_error <= error:
                if held:  # judged on held-out data: now fit on all of it
                    undo_refit(undo)
                    _apply(edit, problem, _solve(problem, strength, with_held=True))
                    trial_error = _output_error(runner.run(model, output_names), reference, output_names, check)
                error = trial_error
                refit_count += consumer
                downstream_count += not consumer
                ridges.append(strength)
                continue
            undo_refit(undo)
            if consumer:
                notes.append(f"refit: {label} kept unrefit (refit raised the output error)")
        else:
            ref_full = reference[node.input[0]]
            x_ref = np.take(ref_full, out_channels(node, ref_full.shape[1]), axis=1)
            if x_ref.shape != x_new.shape or np.allclose(x_ref, x_new, rtol=1e-4, atol=1e-5):
                continue
            if len(node.input) < 5 or not all(edit.private(n) for n in node.input[3:5]):
                continue
            bn_tried += 1
            undo = edit.snapshot(list(node.input[3:5]))
            if _bn_moment_match(edit, node, x_new[fit].astype(np.float64), x_ref[fit].astype(np.float64)) is None:
                continue
            trial = runner.run(model, output_names)
            trial_error = _output_error(trial, reference, output_names, check)
            if trial_error < error:
                if held:
                    edit.restore(undo)
                    _bn_moment_match(edit, node, x_new.astype(np.float64), x_ref.astype(np.float64))
                    trial_error = _output_error(runner.run(model, output_names), reference, output_names, check)
                error = trial_error
                bn_kept += 1
            else:
                edit.restore(undo)
    notes.append(
        f"refit: {refit_count} of {len(layer_set)} layer(s) reading pruned channels and {downstream_count} further"
        f" layer(s) downstream refit by least squares; BatchNorm statistics moment-matched for {bn_kept} of"
        f" {bn_tried} changed BN(s); relative output error on calibration data {start_error:.4f} ->"
        f" {_output_error(runner.run(model, output_names), reference, output_names):.4f}"
        + (f" (each change judged on a held-out {held} of {count} samples)" if held else "")
    )
    if ridges:
        notes.append("refit: ridge strengths " + ", ".join(f"{r:g}" for r in ridges))
    return model, notes
