"""What each layer multiplies on average, known without data from BatchNormalization statistics.

A BatchNormalization in inference mode stores the running mean and variance of its input, so its
output has per-channel mean ``beta`` and variance ``gamma^2 * var / (var + eps)``. Treating
each channel as Gaussian, those moments can be carried forward through the ops that follow:

* ``Relu``: the rectified Gaussian's mean and variance;
* ``Add`` / ``Sum`` of known activations: means add, variances add (inputs taken as independent);
* ``Identity``, ``Dropout``, ``Flatten(axis=1)``: unchanged;
* ``MaxPool``: taken as unchanged, which is exact when a window's values are equal and
  underestimates the mean otherwise; on smooth feature maps (an image network's stem) the
  windows' values are close, and an underestimated mean still removes most of the shift
  (ResNet-18 on digits: the 4 layers it adds lift the output SNR by a further 0.04-0.14 dB);
* ``GlobalAveragePool`` / ``AveragePool`` (no counted padding): the mean is kept, the variance
  becomes unknown (it depends on spatial correlation), so a ``Relu`` after one is not followed.

Anything else (``Sigmoid``, ``Mul``, other layers) ends the chain: its output is
unknown. `channel_moments` runs on the model *before* BatchNorm folding (afterwards the statistics
are gone); activation names survive folding, so `layer_inputs` can then use the moments on the
folded model.

`layer_inputs` turns the moments into, for every ``Conv`` and ``Gemm`` with a bias whose input
is known, the expected input value each weight multiplies, averaged over the output positions.
A kernel tap that falls on zero padding for some output positions sees the channel mean only in
the others; on small feature maps (ResNet-18's 2x2 last stage) this coverage matters as much as
the mean itself, so convolutions whose input size shape inference cannot give are skipped unless
their kernel never touches padding. quantize/bias_correction.py uses this to cancel the mean
output shift that weight quantization error causes (data-free bias correction, as in Nagel et
al., "Data-Free Quantization Through Weight Equalization and Bias Correction", 2019).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from ..model import Model
from .onnx_util import STANDARD_DOMAINS, attributes, name_uses, topology_proto

__all__ = ["ChannelMoments", "LayerInput", "channel_moments", "conv_input_second_moments", "layer_inputs"]

_PASS_THROUGH = frozenset({"Identity", "Dropout", "MaxPool"})
# Tensors up to this size are filled in for shape inference (shape constants, not weights).
_SHAPE_CONSTANT_ELEMENTS = 1 << 12


@dataclass(frozen=True)
class ChannelMoments:
    """Per-channel mean and per-element variance of an NC... activation (variance None: unknown).

    `covariance` ([C, C], None: unknown) is the covariance between channels at one position,
    estimated where the activation descends from a convolution (see `channel_moments`)."""

    mean: np.ndarray
    var: np.ndarray | None
    covariance: np.ndarray | None = None


@dataclass(frozen=True)
class LayerInput:
    """A layer whose average input is known.

    `expected` broadcasts against the weight's shape: a weight change dW shifts the layer's mean
    output (in units of its bias) by the sum of dW * expected over every axis but `out_axis`.
    """

    weight: str
    bias: str
    expected: np.ndarray
    out_axis: int  # the weight axis that enumerates the bias entries
    # Share of the output error energy of independent weight errors that is a mean shift (and
    # so removed by bias correction): sum of E[x]^2 / sum of E[x^2] over the taps; 0 if unknown.
    removable: float = 0.0


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.vectorize(math.erf, otypes=[np.float64])(z / math.sqrt(2.0)))


def _rectified(moments: ChannelMoments) -> ChannelMoments | None:
    """Mean and variance of relu(x) for Gaussian x with the given moments."""
    if moments.var is None:
        return None
    m = moments.mean
    s = np.sqrt(np.maximum(moments.var, 0.0))
    z = m / np.where(s > 0, s, 1.0)
    cdf = _normal_cdf(z)
    pdf = np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    constant = np.maximum(m, 0.0)  # a channel without variance is relu of its mean
    mean = np.where(s > 0, m * cdf + s * pdf, constant)
    second = np.where(s > 0, (m * m + s * s) * cdf + m * s * pdf, constant * constant)
    var = np.maximum(second - mean * mean, 0.0)
    covariance = None
    if moments.covariance is not None:
        # To first order a ReLU passes a channel's fluctuations with the probability that the
        # channel is positive: Cov(relu x_i, relu x_j) ~ P(x_i > 0) P(x_j > 0) Cov(x_i, x_j).
        # The variances on the diagonal are exact.
        passed = np.where(s > 0, cdf, (m > 0).astype(np.float64))
        covariance = moments.covariance * np.outer(passed, passed)
        np.fill_diagonal(covariance, var)
    return ChannelMoments(mean, var, covariance)


def channel_moments(model: Model, covariances: bool = True) -> dict[str, ChannelMoments]:
    """Moments of every activation of the main graph that follows from BatchNorm statistics.

    Empty for non-ONNX models and models without an inference-mode BatchNormalization.
    `covariances=False` skips the channel covariances (a W W^T per convolution), for callers
    that measure them instead (graph/measured_stats.py).
    """
    if model.format != "onnx" or b"BatchNormalization" not in model.topology:
        return {}
    graph = topology_proto(model.topology).graph
    constants = model.tensor_map()
    known: dict[str, ChannelMoments] = {}
    correlations: dict[str, np.ndarray] = {}  # convolution outputs: correlation between channels
    for node in graph.node:
        if node.domain not in STANDARD_DOMAINS or not node.output or not node.output[0]:
            continue
        if node.op_type == "Conv":
            correlation = _conv_correlation(node, constants) if covariances else None
            if correlation is not None:
                correlations[node.output[0]] = correlation
            continue
        result = _propagate(node, known, constants, correlations)
        if result is not None and np.isfinite(result.mean).all():
            if result.covariance is not None and not np.isfinite(result.covariance).all():
                result = ChannelMoments(result.mean, result.var)
            known[node.output[0]] = result
    return known


def _conv_correlation(node: onnx.NodeProto, constants: dict) -> np.ndarray | None:
    """Correlation between the output channels of an ungrouped convolution for white input:
    W W^T over each filter's (input channel, tap) weights, normalised.

    Data-free, the input's own correlations are unknown; the filters' overlap is what makes two
    output channels move together. On the digits ResNet-18 the estimate correlates with the
    measured input correlations of the next layers at 0.1-0.3 (0.24 in the first stage), and
    GPTQ on it still gains 2 BD-rate points (see quantize/feedback.py)."""
    if len(node.input) < 2 or int(attributes(node).get("group", 1)) != 1:
        return None
    weight = constants.get(node.input[1])
    if weight is None or weight.array.ndim < 3 or not weight.is_float:
        return None
    rows = np.asarray(weight.array, dtype=np.float32).reshape(weight.array.shape[0], -1)
    gram = (rows @ rows.T).astype(np.float64)
    scale = np.sqrt(np.maximum(np.diagonal(gram), 0.0))
    if not (scale > 0).all():
        return None
    return gram / np.outer(scale, scale)


def _propagate(
    node: onnx.NodeProto, known: dict[str, ChannelMoments], constants: dict, correlations: dict[str, np.ndarray]
) -> ChannelMoments | None:
    op = node.op_type
    inputs = [known.get(name) for name in node.input if name]
    if op == "BatchNormalization":
        result = _batchnorm_output(node, constants)
        correlation = correlations.get(node.input[0]) if node.input else None
        if result is None or result.var is None or correlation is None or correlation.shape[0] != result.mean.size:
            return result
        deviation = np.sqrt(result.var)
        return ChannelMoments(result.mean, result.var, correlation * np.outer(deviation, deviation))
    if op in _PASS_THROUGH or (op == "Flatten" and attributes(node).get("axis", 1) == 1):
        return inputs[0] if inputs else None
    if op == "Relu":
        return _rectified(inputs[0]) if inputs and inputs[0] is not None else None
    if op in ("Add", "Sum"):
        if len(inputs) < 2 or any(m is None for m in inputs) or len({m.mean.size for m in inputs}) != 1:
            return None
        mean = np.sum([m.mean for m in inputs], axis=0)
        var = None if any(m.var is None for m in inputs) else np.sum([m.var for m in inputs], axis=0)
        covariance = None
        if var is not None and any(m.covariance is not None for m in inputs):
            # Independent inputs (as for the variances): covariances add, a branch without one
            # adds its variances.
            covariance = np.sum([m.covariance if m.covariance is not None else np.diag(m.var) for m in inputs], axis=0)
        return ChannelMoments(mean, var, covariance)
    if op == "GlobalAveragePool" or (op == "AveragePool" and not _counts_padding(node)):
        return ChannelMoments(inputs[0].mean, None) if inputs and inputs[0] is not None else None
    return None


def _counts_padding(node: onnx.NodeProto) -> bool:
    attrs = attributes(node)
    padded = any(attrs.get("pads", [])) or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID")
    return bool(attrs.get("count_include_pad", 0)) and padded


def _batchnorm_output(node: onnx.NodeProto, constants: dict) -> ChannelMoments | None:
    attrs = attributes(node)
    if attrs.get("training_mode", 0) or len(node.output) > 1 and any(node.output[1:]) or len(node.input) != 5:
        return None
    params = [constants.get(name) for name in node.input[1:]]
    if any(p is None or p.array.ndim != 1 for p in params) or len({p.array.size for p in params}) != 1:
        return None
    scale, beta, _, var = (np.asarray(p.array, dtype=np.float64) for p in params)
    eps = float(attrs.get("epsilon", 1e-5))
    return ChannelMoments(beta.copy(), scale * scale * var / (var + eps))


# --------------------------------------------------------------------------------------------
# Expected inputs of each layer
# --------------------------------------------------------------------------------------------


def layer_inputs(model: Model, moments: dict[str, ChannelMoments]) -> dict[str, LayerInput]:
    """For every Conv / Gemm with a bias whose input moments are known: the expected input of
    each weight (by weight name). Weights and biases used anywhere else are left out."""
    if model.format != "onnx" or not moments:
        return {}
    from ..formats.onnx_format import to_proto

    graph = topology_proto(model.topology).graph
    tensors = model.tensor_map()
    uses = name_uses(graph)

    candidates = [n for n in graph.node if n.domain in STANDARD_DOMAINS and n.op_type in ("Conv", "Gemm") and len(n.input) >= 3]
    spatial: dict[str, list[int]] = {}
    if any(n.op_type == "Conv" for n in candidates):
        spatial = _input_shapes(to_proto(model, max_elements=_SHAPE_CONSTANT_ELEMENTS))

    found: dict[str, LayerInput] = {}
    for node in candidates:
        act, weight_name, bias_name = node.input[0], node.input[1], node.input[2]
        weight, bias, stats = tensors.get(weight_name), tensors.get(bias_name), moments.get(act)
        if weight is None or bias is None or stats is None or uses.get(weight_name) != 1 or uses.get(bias_name) != 1:
            continue
        if not (weight.is_float and bias.is_float):
            continue
        if node.op_type == "Conv":
            entry = _conv_input(node, weight.array.shape, stats, spatial.get(act))
        else:
            entry = _gemm_input(node, weight.array.shape, stats)
        if entry is None:
            continue
        expected, out_axis, removable = entry
        if bias.array.size != weight.array.shape[out_axis]:
            continue
        found[weight_name] = LayerInput(weight_name, bias_name, expected, out_axis, removable)
    return found


def conv_input_second_moments(model: Model, moments: dict[str, ChannelMoments]) -> dict[str, np.ndarray]:
    """For every ungrouped, undilated Conv whose input has a channel covariance in `moments`:
    the second moments E[x x^T] between its input channels (by weight name). Weights used by
    anything else are left out."""
    if model.format != "onnx" or not moments:
        return {}
    graph = topology_proto(model.topology).graph
    tensors = model.tensor_map()
    uses = name_uses(graph)
    found: dict[str, np.ndarray] = {}
    for node in graph.node:
        if node.domain not in STANDARD_DOMAINS or node.op_type != "Conv" or len(node.input) < 2:
            continue
        attrs = attributes(node)
        weight, stats = tensors.get(node.input[1]), moments.get(node.input[0])
        if weight is None or stats is None or stats.covariance is None or uses.get(node.input[1]) != 1:
            continue
        if int(attrs.get("group", 1)) != 1 or any(d != 1 for d in attrs.get("dilations", [])):
            continue
        if weight.array.ndim < 3 or weight.array.shape[1] != stats.mean.size:
            continue
        found[node.input[1]] = stats.covariance + np.outer(stats.mean, stats.mean)
    return found


def _input_shapes(proto: onnx.ModelProto) -> dict[str, list[int]]:
    """Static shapes from ONNX shape inference, with symbolic input dims (the batch) set to 1 so
    shape arithmetic on them (Shape -> Slice -> Concat -> Resize) still resolves."""
    for value in proto.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                dim.dim_value = 1
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # noqa: BLE001 - no shapes is a valid answer: layers needing them are skipped
        return {}
    shapes = {}
    for value in list(inferred.graph.value_info) + list(inferred.graph.input):
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [int(d.dim_value) for d in dims]
    return shapes


def _tap_coverage(size: int, kernel: int, stride: int, dilation: int, pad_begin: int, pad_end: int) -> np.ndarray | None:
    """Fraction of output positions at which each kernel tap reads a real (not padded) input."""
    outputs = (size + pad_begin + pad_end - dilation * (kernel - 1) - 1) // stride + 1
    if outputs <= 0:
        return None
    positions = np.arange(outputs)[:, None] * stride - pad_begin + np.arange(kernel)[None, :] * dilation
    return ((positions >= 0) & (positions < size)).mean(axis=0)


def _conv_pads(attrs: dict, sizes: list[int] | None, kernel: tuple[int, ...], strides: list[int], dilations: list[int]) -> list[int] | None:
    spatial = len(kernel)
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("NOTSET", ""):
        return list(attrs.get("pads", [0] * 2 * spatial))
    if auto_pad == "VALID":
        return [0] * 2 * spatial
    if sizes is None:
        return None
    begins, ends = [], []
    for d in range(spatial):
        out = -(-sizes[d] // strides[d])
        total = max((out - 1) * strides[d] + (kernel[d] - 1) * dilations[d] + 1 - sizes[d], 0)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins + ends


def _conv_input(node: onnx.NodeProto, shape: tuple[int, ...], stats: ChannelMoments, input_shape: list[int] | None):
    if len(shape) < 3:
        return None
    attrs = attributes(node)
    kernel = tuple(shape[2:])
    spatial = len(kernel)
    group = int(attrs.get("group", 1))
    strides = list(attrs.get("strides", [1] * spatial))
    dilations = list(attrs.get("dilations", [1] * spatial))
    channels = stats.mean.size
    if channels != shape[1] * group or shape[0] % group:
        return None
    sizes = input_shape[2:] if input_shape is not None and len(input_shape) == spatial + 2 else None
    pads = _conv_pads(attrs, sizes, kernel, strides, dilations)
    if pads is None:
        return None
    if sizes is None:
        if any(pads) or any(k != 1 for k in kernel):
            return None  # taps may read padding, and how often is unknown
        coverage = np.ones(kernel)
    else:
        axes = [_tap_coverage(sizes[d], kernel[d], strides[d], dilations[d], pads[d], pads[d + spatial]) for d in range(spatial)]
        if any(a is None for a in axes):
            return None
        coverage = axes[0]
        for axis in axes[1:]:
            coverage = np.multiply.outer(coverage, axis)
    per_in, per_out = channels // group, shape[0] // group
    means = stats.mean.reshape(group, 1, per_in, *([1] * spatial))
    expected = means * coverage.reshape(1, 1, 1, *kernel)  # group, 1, per_in, k...
    removable = 0.0
    if stats.var is not None:
        # Per tap: the mean over output positions is mean * coverage; E[x^2] is (mean^2 + var) * coverage.
        energy = float(np.sum((stats.mean**2 + stats.var).reshape(means.shape) * coverage.reshape(1, 1, 1, *kernel)))
        removable = float(np.sum(expected**2)) / energy if energy > 0 else 0.0
    if group > 1:
        expected = np.broadcast_to(expected, (group, per_out, per_in, *kernel)).reshape(shape)
    else:
        expected = expected.reshape(1, per_in, *kernel)
    return expected, 0, removable


def _gemm_input(node: onnx.NodeProto, shape: tuple[int, ...], stats: ChannelMoments):
    attrs = attributes(node)
    if attrs.get("transA", 0) or len(shape) != 2:
        return None
    transposed = bool(attrs.get("transB", 0))
    features = shape[1] if transposed else shape[0]
    channels = stats.mean.size
    if features % channels:
        return None
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    if beta == 0.0:
        return None
    # Flatten(axis=1) of N, C, H, W is channel-major: each channel's mean repeats H*W times.
    # Y = alpha * A B + beta * C: a shift of the product is undone by C changing 1/beta as much.
    repeat = features // channels
    removable = 0.0
    if stats.var is not None:
        energy = float(np.sum(stats.mean**2 + stats.var))
        removable = float(np.sum(stats.mean**2)) / energy if energy > 0 else 0.0
    mean = np.repeat(stats.mean, repeat) * (alpha / beta)
    return ((mean[None, :], 0) if transposed else (mean[:, None], 1)) + (removable,)
