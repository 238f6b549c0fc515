"""Layer input Hessians from calibration data, for GPTQ error feedback (quantize/rdo.py).

One onnxruntime pass over the calibration inputs exposes every Conv / Gemm / MatMul weight's
input activations; each layer's Hessian is E[x x^T] of its inputs (for convolutions over patch
rows, output positions subsampled past HESSIAN_ROWS_PER_COLUMN rows per column), kept as the
diagonal column blocks GPTQ works on.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..graph.onnx_util import attributes, cpu_session, name_uses
from ..inputs import ModelInputs, as_model_inputs
from ..model import Model, TensorRole
from .rdo import EXACT_LEVELS, GptqFactor, block_layout, gptq_factor, gptq_gain, gptq_round
from .sensitivity import calibration_threads

# Calibration samples the layer Hessians are summed over.
HESSIAN_SAMPLES = 256

# Patch rows per Hessian column beyond which a convolution's output positions are subsampled.
HESSIAN_ROWS_PER_COLUMN = 32


@dataclass
class LayerHessian:
    """Input Hessians of one weight tensor: W viewed as [rows, cols] blocks (y = W x per group),
    each group's Hessian as its [count, width, width] diagonal column blocks (rdo.GPTQ_BLOCK)."""

    shape: tuple[int, ...]
    transpose: bool  # Gemm(transB=0) / MatMul: the stored tensor is [cols, rows]
    groups: list[tuple[slice, np.ndarray]]  # (row slice, H blocks)
    samples: int = 0  # input rows (patches, tokens) H was summed over: 0 when unknown
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
        """GPTQ's expected reduction of the layer's output error on inputs like the calibration
        inputs, not only on them.

        On the calibration inputs themselves the reduction is `gptq_gain` (energy-weighted over
        groups); GPTQ fits its compensation to those inputs, so that is optimistic by about what
        least squares is optimistic by on n rows with p unknowns per output: its error there is
        (n - p) / (n + p) of its error on new inputs. With n <= p nothing is expected. (The
        file-type classifier's final Dense, 512 inputs fitted on ~700 rows, predicted 0.015 and
        was credited that much coarser a step; on new files its error was the largest.)"""
        total = weighted = 0.0
        for (rows, h), factor in zip(self.groups, self.factors()):
            energy = float(np.trace(h, axis1=1, axis2=2).sum()) * (rows.stop - rows.start)
            weighted += gptq_gain(h, factor=factor) * energy
            total += energy
        fitted = weighted / total if total > 0 else 1.0
        if not self.samples:
            return fitted
        width = self.groups[0][1].shape[-1]  # the columns one GPTQ block compensates across
        if self.samples <= width:
            return 1.0
        return min(1.0, fitted * (self.samples + width) / (self.samples - width))

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


def layer_hessians(model: Model, calibration: ModelInputs | np.ndarray) -> dict[str, LayerHessian]:
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
    session = cpu_session(proto, calibration_threads())
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
                groups, samples = _conv_hessians(act, shape, attributes(node))
                out[name] = LayerHessian(shape, False, groups, samples)
            else:
                transpose = node.op_type == "MatMul" or not attributes(node).get("transB", 0)
                cols = shape[0] if transpose else shape[1]
                rows = shape[1] if transpose else shape[0]
                if act.shape[-1] != cols:
                    continue
                h = _gram(act.reshape(-1, cols))
                out[name] = LayerHessian(shape, transpose, [(slice(0, rows), h)], act.size // cols)
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


def _conv_hessians(act: np.ndarray, shape: tuple[int, ...], attrs: dict) -> tuple[list[tuple[slice, np.ndarray]], int]:
    """Per group: (output-channel slice, diagonal blocks of the Hessian of the im2col patches),
    columns in W's layout; and the number of patch rows each was summed over."""
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
    return groups, act.shape[0] * positions
