"""Channel dependency analysis of ONNX graphs (which channels must be removed together).

This module only *analyses*; choosing what to remove and rewriting the graph live in
`nnc_tool.prune.structured` (the split Torch-Pruning makes between `dependency/` and `pruner/`).

Model
-----
Every activation that carries channels on axis 1 (``[N, C, ...]`` or ``[N, F]``) is described by a
*layout*: a list of segments ``(space, block)`` laid out one after the other along axis 1. Channel
``u`` of ``space`` occupies the ``block`` consecutive indices ``offset + u*block ...`` of the
segment. Spaces are joined by a union-find in which a space may also be a *coarsening* of another
(one unit of the parent = ``ratio`` consecutive units of the child), which is how grouped and
depthwise convolutions (whole conv groups move together), ``Flatten`` into a ``Gemm`` (channel ->
block of ``H*W`` features) and ``Concat`` (several segments) are expressed. Each root space of
the union-find becomes one `ChannelGroup`.

Ops that *create* channels (Conv, ConvTranspose, Gemm, MatMul with a constant weight) start a new
space and record *producer* slices (output-channel axis of the weight, bias, and every per-channel
parameter met on the way: BatchNorm, PRelu slopes, constant addends/scales...). Ops that *read*
channels (the next Conv/Gemm/MatMul) record *consumer* slices (input-channel axis). Channel-wise
ops pass layouts through; elementwise ops with two channel inputs (residual ``Add``, SE gating
``Mul``) join the spaces. Anything the analysis does not understand blocks the spaces involved
(``prunable=False`` with the reason), so a pattern we cannot handle is never rewritten.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import onnx
from onnx import numpy_helper

from .onnx_util import STANDARD_DOMAINS

__all__ = ["ChannelGroup", "ChannelSlice", "ShapeFix", "analyse_channels", "node_labels", "constant_arrays"]


class ChannelSlice(NamedTuple):
    """A slice of a constant tensor that belongs to a group's channels.

    Channel ``u`` of the group (``0 <= u < group.size``) is the index range
    ``[offset + u*block, offset + (u+1)*block)`` of ``axis`` of ``tensor``.
    """

    tensor: str  # initializer (or Constant-node output) name
    axis: int
    offset: int = 0
    block: int = 1
    node: str = ""  # label (see `node_labels`) of the node that uses the tensor this way
    # weight | bias | bn_scale | bn_bias | bn_mean | bn_var | norm_scale | norm_bias | slope | const | qparam
    kind: str = ""


class ShapeFix(NamedTuple):
    """An entry of an int64 shape constant that counts a group's channels (Reshape shape, Resize sizes).

    Removing ``k`` channels of the group lowers ``tensor[index]`` by ``k * block``.
    """

    tensor: str
    index: int
    block: int
    node: str = ""


@dataclass
class ChannelGroup:
    """A set of channels that can only be removed together, and every tensor slice that names them."""

    name: str  # stable, human-readable: the first producing layer's weight (or the first value)
    size: int  # channels (units) in the group
    producers: list[ChannelSlice] = field(default_factory=list)  # slices that create the channels
    consumers: list[ChannelSlice] = field(default_factory=list)  # slices that read them
    # values whose axis 1 holds exactly this group's channels and every read of the channels by a
    # channel-mixing layer goes through one of them: multiplying each by a [1,C,1,...] 0/1 mask
    # emulates removing the masked channels.
    mask_values: list[str] = field(default_factory=list)
    prunable: bool = True
    reason: str = ""  # why not, when not prunable
    shape_fixes: list[ShapeFix] = field(default_factory=list)  # shape constants to adjust on removal
    values: list[str] = field(default_factory=list)  # every value whose axis 1 carries (some of) these channels


def node_labels(graph: onnx.GraphProto) -> list[str]:
    """A unique label per node: its name, else its first output, de-duplicated with ``#k``."""
    taken: set[str] = set()
    labels: list[str] = []
    for index, node in enumerate(graph.node):
        base = node.name or next((o for o in node.output if o), f"{node.op_type}#{index}")
        label, k = base, 2
        while label in taken:
            label, k = f"{base}#{k}", k + 1
        taken.add(label)
        labels.append(label)
    return labels


def constant_arrays(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Values of the graph's initializers and ``Constant`` nodes (``value`` or list forms)."""
    found: dict[str, np.ndarray] = {}
    for init in graph.initializer:
        found[init.name] = numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type != "Constant" or node.domain not in STANDARD_DOMAINS or not node.output:
            continue
        for attr in node.attribute:
            if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                found[node.output[0]] = numpy_helper.to_array(attr.t)
            elif attr.name == "value_ints":
                found[node.output[0]] = np.array(list(attr.ints), np.int64)
            elif attr.name == "value_int":
                found[node.output[0]] = np.array(attr.i, np.int64)
            elif attr.name == "value_floats":
                found[node.output[0]] = np.array(list(attr.floats), np.float32)
            elif attr.name == "value_float":
                found[node.output[0]] = np.array(attr.f, np.float32)
    return found


def _editable_constants(graph: onnx.GraphProto) -> set[str]:
    """Constants whose payload a rewrite can replace: initializers (not graph inputs) and Constant ``value``."""
    inputs = {v.name for v in graph.input}
    names = {t.name for t in graph.initializer if t.name not in inputs}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in STANDARD_DOMAINS and node.output:
            if any(a.name == "value" and a.type == onnx.AttributeProto.TENSOR for a in node.attribute):
                names.add(node.output[0])
    return names


def _attr(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _subgraph_refs(graph: onnx.GraphProto) -> set[str]:
    """Every name a graph's nodes read (recursively), including outer-scope references."""
    refs: set[str] = set()
    for node in graph.node:
        refs.update(n for n in node.input if n)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                refs |= _subgraph_refs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    refs |= _subgraph_refs(sub)
    refs.update(o.name for o in graph.output)
    return refs


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


Dim = int | str | None
Layout = list[tuple[int, int]]  # [(space, block)]

_UNARY = frozenset(
    {
        "Relu", "Sigmoid", "Tanh", "LeakyRelu", "Elu", "Selu", "Celu", "Gelu", "HardSigmoid", "HardSwish",
        "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Clip", "Abs", "Neg", "Exp", "Log", "Sqrt",
        "Reciprocal", "Erf", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Tan", "Sinh", "Cosh", "Asin",
        "Acos", "Atan", "Asinh", "Acosh", "Atanh", "Identity", "Cast", "CastLike", "Not", "IsNaN", "IsInf",
        "Shrink", "Dropout", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
        "GlobalLpPool", "Swish",
    }
)
_ELEMENTWISE = frozenset(
    {
        "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Mod", "Equal", "Greater", "Less",
        "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Where", "BitwiseAnd", "BitwiseOr", "BitwiseXor",
    }
)
_REDUCE = frozenset(
    {
        "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
        "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
    }
)
# Extra outputs that carry the same channels as output 0 (anything else used blocks the input).
_SAME_LAYOUT_EXTRA_OUTPUTS = frozenset({"Dropout"})


class _Analyser:
    def __init__(self, proto: onnx.ModelProto):
        self.graph = proto.graph
        self.opset = next((o.version for o in proto.opset_import if o.domain in STANDARD_DOMAINS), 0)
        self.labels = node_labels(self.graph)
        self.consts = constant_arrays(self.graph)
        self.editable = _editable_constants(self.graph)
        self.shapes = self._infer(proto)
        # union-find over channel spaces
        self.parent: list[int] = []
        self.ratio: list[int] = []
        self.size: list[int] = []
        self.reason: dict[int, str] = {}
        self.layout: dict[str, Layout | None] = {}  # value -> layout; None = carries channels we cannot follow
        self.records: list[tuple[int, str, ChannelSlice]] = []  # (space, "p"|"c", slice in space units)
        self.fixes: list[tuple[int, ShapeFix]] = []
        self.mask_candidates: list[tuple[str, int]] = []  # (value, space) read by channel-mixing layers
        self.producer_of: dict[str, int] = {}  # value -> index of the node producing it
        self.uses: dict[str, set[str]] = defaultdict(set)  # constant -> labels of nodes (or "graph output") using it
        self.read_names = {n for node in self.graph.node for n in node.input} | {o.name for o in self.graph.output}
        for node in self.graph.node:
            if _has_subgraph(node):
                for attr in node.attribute:
                    for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                        self.read_names |= _subgraph_refs(sub)

    # ---- shapes and constants -------------------------------------------------------------
    @staticmethod
    def _infer(proto: onnx.ModelProto) -> dict[str, list[Dim] | None]:
        try:
            inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
        except Exception:  # noqa: BLE001 - e.g. a model beyond the protobuf limit; work without shapes
            inferred = proto
        shapes: dict[str, list[Dim] | None] = {}
        graph = inferred.graph
        for value in list(graph.input) + list(graph.value_info) + list(graph.output):
            if not value.type.HasField("tensor_type"):
                continue
            tensor_type = value.type.tensor_type
            if not tensor_type.HasField("shape"):
                shapes.setdefault(value.name, None)
                continue
            dims: list[Dim] = []
            for dim in tensor_type.shape.dim:
                if dim.HasField("dim_value"):
                    dims.append(int(dim.dim_value))
                elif dim.HasField("dim_param"):
                    dims.append(dim.dim_param)
                else:
                    dims.append(None)
            shapes[value.name] = dims
        for init in graph.initializer:
            shapes[init.name] = [int(d) for d in init.dims]
        return shapes

    def dims(self, name: str) -> list[Dim] | None:
        if name in self.consts:
            return list(self.consts[name].shape)
        return self.shapes.get(name)

    def const(self, name: str) -> np.ndarray | None:
        return self.consts.get(name) if name else None

    # ---- union-find -------------------------------------------------------------------------
    def new_space(self, size: int, reason: str | None = None) -> int:
        index = len(self.parent)
        self.parent.append(index)
        self.ratio.append(1)
        self.size.append(int(size))
        if reason:
            self.reason[index] = reason
        return index

    def find(self, node: int) -> tuple[int, int]:
        """(root, units of `node` per unit of root)."""
        chain = []
        while self.parent[node] != node:
            chain.append(node)
            node = self.parent[node]
        root = node
        acc = 1
        for child in reversed(chain):
            acc = self.ratio[child] * acc
            self.parent[child] = root
            self.ratio[child] = acc
        return root, (self.ratio[chain[0]] if chain else 1)

    def block(self, space: int, reason: str) -> None:
        root, _ = self.find(space)
        self.reason.setdefault(root, reason)

    def block_layout(self, layout: Layout | None, reason: str) -> None:
        for space, _ in layout or []:
            self.block(space, reason)

    def _link(self, child: int, parent: int, ratio: int) -> None:
        self.parent[child] = parent
        self.ratio[child] = ratio
        if child in self.reason:
            self.reason.setdefault(parent, self.reason[child])

    def union(self, a: int, block_a: int, b: int, block_b: int, where: str) -> None:
        """Segments (a, block_a) and (b, block_b) denote the same indices: their channels move together."""
        ra, fa = self.find(a)
        rb, fb = self.find(b)
        ea, eb = fa * block_a, fb * block_b
        if ra == rb:
            if ea != eb:
                self.block(ra, f"inconsistent channel coupling at {where}")
            return
        if self.size[ra] * ea != self.size[rb] * eb:
            self.block(ra, f"channel counts do not match at {where}")
            self.block(rb, f"channel counts do not match at {where}")
            return
        if ea == eb:
            self._link(rb, ra, 1)
        elif eb % ea == 0:
            self._link(ra, rb, eb // ea)
        elif ea % eb == 0:
            self._link(rb, ra, ea // eb)
        else:
            self.block(ra, f"incompatible channel blocks at {where}")
            self.block(rb, f"incompatible channel blocks at {where}")

    # ---- layouts -------------------------------------------------------------------------------
    def width(self, layout: Layout) -> int:
        return sum(self.size[s] * b for s, b in layout)

    def couple(self, la: Layout | None, lb: Layout | None, where: str) -> None:
        if la is None or lb is None:
            self.block_layout(la, f"coupled with channels that cannot be followed at {where}")
            self.block_layout(lb, f"coupled with channels that cannot be followed at {where}")
            return
        if len(la) == len(lb) and all(self.size[sa] * ba == self.size[sb] * bb for (sa, ba), (sb, bb) in zip(la, lb)):
            for (sa, ba), (sb, bb) in zip(la, lb):
                self.union(sa, ba, sb, bb, where)
            return
        reason = f"channels of differently concatenated tensors meet at {where}"
        self.block_layout(la, reason)
        self.block_layout(lb, reason)

    def record(self, layout: Layout, role: str, tensor: str, axis: int, label: str, kind: str) -> bool:
        """Record `tensor`'s `axis` as laid out like `layout`; False (and blocks) if it cannot be sliced."""
        array = self.const(tensor)
        if array is None or tensor not in self.editable:
            self.block_layout(layout, f"'{tensor}' of {label} is not a constant that can be sliced")
            return False
        if array.ndim <= axis or array.shape[axis] != self.width(layout):
            self.block_layout(layout, f"'{tensor}' of {label} does not match the channel count")
            return False
        offset = 0
        for space, block in layout:
            self.records.append((space, role, ChannelSlice(tensor, axis, offset, block, label, kind)))
            offset += self.size[space] * block
        return True

    def per_channel_param(self, layout: Layout, name: str, rank: int, label: str, kind: str) -> bool:
        """A constant broadcast against a rank-`rank` value with channels on axis 1 (bias, slope, scale).

        Returns False if the parameter cannot be handled (the layout is then blocked).
        """
        dims = self.dims(name)
        if dims is None:
            self.block_layout(layout, f"unknown shape of '{name}' at {label}")
            return False
        axis = len(dims) - (rank - 1)  # position of the channel axis in the right-aligned parameter
        if axis < 0 or dims[axis] == 1:
            return True  # does not vary along the channels
        if name not in self.consts:
            self.block_layout(layout, f"a computed tensor '{name}' varies along the channels at {label}")
            return False
        return self.record(layout, "p", name, axis, label, kind)

    def set_out(self, node: onnx.NodeProto, layout: Layout | None, index: int = 0) -> None:
        if index < len(node.output) and node.output[index]:
            self.layout[node.output[index]] = layout

    def fresh_blocked(self, name: str, reason: str) -> Layout | None:
        dims = self.dims(name)
        if dims and len(dims) >= 2 and isinstance(dims[1], int):
            return [(self.new_space(dims[1], reason), 1)]
        return None

    def mark_used(self, name: str, label: str) -> None:
        if name in self.consts:
            self.uses[name].add(label)

    # ---- the walk ----------------------------------------------------------------------------------
    def run(self) -> list[ChannelGroup]:
        graph = self.graph
        initializers = {t.name for t in graph.initializer}
        for value in graph.input:
            if value.name in initializers:
                continue
            dims = self.dims(value.name)
            reason = f"channels of the graph input '{value.name}'"
            if dims is None or len(dims) >= 2:
                self.layout[value.name] = self.fresh_blocked(value.name, reason)

        for index, node in enumerate(graph.node):
            label = self.labels[index]
            for name in node.input:
                self.mark_used(name, label)
            for out in node.output:
                if out:
                    self.producer_of[out] = index
            if _has_subgraph(node):
                inner = False
                for attr in node.attribute:
                    subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                    for sub in subs:
                        for ref in _subgraph_refs(sub):
                            self.mark_used(ref, label + "/subgraph")
                            if ref in self.layout:
                                self.block_layout(self.layout[ref], f"read inside a subgraph of {label}")
                                inner = True
                if inner or any(n in self.layout for n in node.input):
                    self.unknown(node, label, f"{node.op_type} node {label} reads them")
                continue
            channel_inputs = [n for n in node.input if n and n in self.layout]
            if not channel_inputs:
                continue  # computes constants or shapes, no channels flow through it
            if node.domain not in STANDARD_DOMAINS:
                self.unknown(node, label, f"custom op {node.domain}::{node.op_type} ({label})")
                continue
            handler = getattr(self, f"op_{node.op_type}", None)
            if handler is None:
                if node.op_type in _UNARY:
                    handler = self.unary
                elif node.op_type in _ELEMENTWISE:
                    handler = self.elementwise
                elif node.op_type in _REDUCE:
                    handler = self.reduce
            if handler is None:
                self.unknown(node, label, f"{node.op_type} node {label} reads them")
            else:
                handler(node, label)

        for out in graph.output:
            self.mark_used(out.name, "graph output")
            if out.name in self.layout:
                self.block_layout(self.layout[out.name], f"they are channels of the graph output '{out.name}'")
        return self.groups()

    def unknown(self, node: onnx.NodeProto, label: str, reason: str) -> None:
        for name in node.input:
            if name in self.layout:
                self.block_layout(self.layout[name], reason)
        for out in node.output:
            if not out:
                continue
            dims = self.dims(out)
            if dims is not None and len(dims) < 2:
                continue  # scalars and shapes: no channel axis downstream
            self.layout[out] = self.fresh_blocked(out, f"produced by {node.op_type} node {label}")

    def check_extra_outputs(self, node: onnx.NodeProto, label: str, layout: Layout | None) -> None:
        for out in node.output[1:]:
            if not out:
                continue
            if node.op_type in _SAME_LAYOUT_EXTRA_OUTPUTS:
                self.layout[out] = layout
            elif out in self.read_names:
                self.block_layout(layout, f"output '{out}' of {node.op_type} node {label} depends on channel positions")

    def rank_of(self, name: str) -> int | None:
        dims = self.dims(name)
        return None if dims is None else len(dims)

    # ---- channel-wise ops ----------------------------------------------------------------------
    def unary(self, node: onnx.NodeProto, label: str) -> None:
        layout = self.layout.get(node.input[0])
        if node.input[0] not in self.layout:
            # e.g. Clip whose bound is computed from channels: not a pattern we follow
            self.unknown(node, label, f"{node.op_type} node {label} uses them as a parameter")
            return
        for extra in node.input[1:]:
            if extra in self.layout:
                self.unknown(node, label, f"{node.op_type} node {label} uses them as a parameter")
                return
        self.set_out(node, layout)
        self.check_extra_outputs(node, label, layout)

    def op_BatchNormalization(self, node: onnx.NodeProto, label: str) -> None:
        self.norm(node, label, ("bn_scale", "bn_bias", "bn_mean", "bn_var"))

    def op_InstanceNormalization(self, node: onnx.NodeProto, label: str) -> None:
        self.norm(node, label, ("norm_scale", "norm_bias"))

    def norm(self, node: onnx.NodeProto, label: str, kinds: tuple[str, ...]) -> None:
        x = node.input[0]
        layout = self.layout.get(x)
        if x not in self.layout or any(n in self.layout for n in node.input[1:]):
            self.unknown(node, label, f"{node.op_type} node {label} with computed parameters")
            return
        if layout is not None:
            for name, kind in zip(node.input[1:], kinds):
                if name and not self.record(layout, "p", name, 0, label, kind):
                    break
        self.set_out(node, layout)
        self.check_extra_outputs(node, label, layout)

    def op_LayerNormalization(self, node: onnx.NodeProto, label: str) -> None:
        x = node.input[0]
        rank = self.rank_of(x)
        axis = _attr(node, "axis", -1)
        if rank is not None and axis < 0:
            axis += rank
        if rank is None or axis <= 1 or any(n in self.layout for n in node.input[1:]):
            self.unknown(node, label, f"LayerNormalization node {label} normalises across them")
            return
        self.set_out(node, self.layout[x])
        self.check_extra_outputs(node, label, self.layout[x])

    def op_PRelu(self, node: onnx.NodeProto, label: str) -> None:
        x, slope = node.input[0], node.input[1]
        layout, rank = self.layout.get(x), self.rank_of(x)
        if x not in self.layout or slope in self.layout or rank is None:
            self.unknown(node, label, f"PRelu node {label} with a computed slope")
            return
        if layout is not None:
            self.per_channel_param(layout, slope, rank, label, "slope")
        self.set_out(node, layout)

    def op_QuantizeLinear(self, node: onnx.NodeProto, label: str) -> None:
        self.quant(node, label)

    def op_DequantizeLinear(self, node: onnx.NodeProto, label: str) -> None:
        self.quant(node, label)

    def quant(self, node: onnx.NodeProto, label: str) -> None:
        x = node.input[0]
        layout = self.layout.get(x)
        if x not in self.layout or any(n in self.layout for n in node.input[1:]):
            self.unknown(node, label, f"{node.op_type} node {label} with computed parameters")
            return
        axis = _attr(node, "axis", 1)
        rank = self.rank_of(x)
        for name in node.input[1:3]:
            if not name:
                continue
            value = self.const(name)
            if value is None:
                self.unknown(node, label, f"{node.op_type} node {label} with computed parameters")
                return
            if value.size > 1:
                if rank is None or (axis + rank if axis < 0 else axis) != 1 or layout is None:
                    self.unknown(node, label, f"{node.op_type} node {label} quantizes along another axis")
                    return
                self.record(layout, "p", name, 0, label, "qparam")
        self.set_out(node, layout)

    def op_Pad(self, node: onnx.NodeProto, label: str) -> None:
        x = node.input[0]
        rank = self.rank_of(x)
        if self.opset >= 11:
            pads = self.const(node.input[1]) if len(node.input) > 1 else None
            axes = self.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        else:
            pads = _attr(node, "pads")
            pads = None if pads is None else np.array(pads)
            axes = None
        if pads is None or rank is None or any(n in self.layout for n in node.input[1:]):
            self.unknown(node, label, f"Pad node {label} with pads that cannot be read")
            return
        pads = np.asarray(pads).reshape(-1)
        axes_list = list(range(rank)) if axes is None else [int(a) + rank if a < 0 else int(a) for a in axes]
        n = len(axes_list)
        for i, axis in enumerate(axes_list):
            if axis == 1 and (pads[i] != 0 or pads[i + n] != 0):
                self.unknown(node, label, f"Pad node {label} pads the channel axis")
                return
        self.set_out(node, self.layout[x])

    def op_Resize(self, node: onnx.NodeProto, label: str) -> None:
        self.resize(node, label)

    def op_Upsample(self, node: onnx.NodeProto, label: str) -> None:
        self.resize(node, label)

    def resize(self, node: onnx.NodeProto, label: str) -> None:
        x = node.input[0]
        layout = self.layout[x]
        rank = self.rank_of(x)
        if any(n in self.layout for n in node.input[1:]) or rank is None:
            self.unknown(node, label, f"{node.op_type} node {label} with computed parameters")
            return
        axes = _attr(node, "axes")
        channel_pos = 1
        if axes is not None:
            axes = [a + rank if a < 0 else a for a in axes]
            channel_pos = axes.index(1) if 1 in axes else None
        if node.op_type == "Upsample":
            scales = self.const(node.input[1]) if len(node.input) > 1 else _attr(node, "scales")
            sizes = None
        else:
            scales = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            sizes = self.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        if channel_pos is None:
            pass  # the channel axis is not resized
        elif scales is not None and np.asarray(scales).size:
            if float(np.asarray(scales).reshape(-1)[channel_pos]) != 1.0:
                self.unknown(node, label, f"{node.op_type} node {label} resizes the channel axis")
                return
        elif sizes is not None and np.asarray(sizes).size:
            if layout is None or int(np.asarray(sizes).reshape(-1)[channel_pos]) != self.width(layout):
                self.unknown(node, label, f"{node.op_type} node {label} resizes the channel axis")
                return
            name = node.input[3]
            if name not in self.editable:
                self.unknown(node, label, f"{node.op_type} node {label} has sizes that cannot be edited")
                return
            for space, block in layout:
                self.fixes.append((space, ShapeFix(name, channel_pos, block, label)))
        else:
            self.unknown(node, label, f"{node.op_type} node {label} with computed scales or sizes")
            return
        self.set_out(node, layout)

    def op_Softmax(self, node: onnx.NodeProto, label: str) -> None:
        self.softmax(node, label)

    def op_LogSoftmax(self, node: onnx.NodeProto, label: str) -> None:
        self.softmax(node, label)

    def op_Hardmax(self, node: onnx.NodeProto, label: str) -> None:
        self.softmax(node, label)

    def softmax(self, node: onnx.NodeProto, label: str) -> None:
        x = node.input[0]
        rank = self.rank_of(x)
        axis = _attr(node, "axis", -1 if self.opset >= 13 else 1)
        if rank is not None and axis < 0:
            axis += rank
        # before opset 13 the input is coerced to 2-D at `axis`: everything from axis on is normalised together
        mixes = rank is None or axis == 1 or (self.opset < 13 and axis <= 1)
        if mixes:
            self.unknown(node, label, f"{node.op_type} node {label} normalises across them")
            return
        self.set_out(node, self.layout[x])

    def reduce(self, node: onnx.NodeProto, label: str) -> None:
        x = node.input[0]
        rank = self.rank_of(x)
        axes_from_input = self.opset >= 18 or (node.op_type == "ReduceSum" and self.opset >= 13)
        if axes_from_input:
            axes = self.const(node.input[1]) if len(node.input) > 1 and node.input[1] else None
            if len(node.input) > 1 and node.input[1] and axes is None:
                self.unknown(node, label, f"{node.op_type} node {label} with computed axes")
                return
        else:
            axes = _attr(node, "axes")
        if axes is None or np.asarray(axes).size == 0:
            if _attr(node, "noop_with_empty_axes", 0):
                self.set_out(node, self.layout[x])
                return
            self.unknown(node, label, f"{node.op_type} node {label} reduces over every axis")
            return
        if rank is None:
            self.unknown(node, label, f"{node.op_type} node {label} on a tensor of unknown rank")
            return
        axes = {int(a) + rank if a < 0 else int(a) for a in np.asarray(axes).reshape(-1)}
        if axes & {0, 1}:
            self.unknown(node, label, f"{node.op_type} node {label} reduces over the batch or channel axis")
            return
        self.set_out(node, self.layout[x])

    def op_Squeeze(self, node: onnx.NodeProto, label: str) -> None:
        self.squeeze(node, label, squeeze=True)

    def op_Unsqueeze(self, node: onnx.NodeProto, label: str) -> None:
        self.squeeze(node, label, squeeze=False)

    def squeeze(self, node: onnx.NodeProto, label: str, squeeze: bool) -> None:
        x = node.input[0]
        if self.opset >= 13:
            axes = self.const(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        else:
            axes = _attr(node, "axes")
        rank = self.rank_of(x)
        if axes is None or rank is None:
            self.unknown(node, label, f"{node.op_type} node {label} with axes that cannot be read")
            return
        axes = np.asarray(axes).reshape(-1)
        out_rank = rank - len(axes) if squeeze else rank + len(axes)
        ref = rank if squeeze else out_rank
        normalised = {int(a) + ref if a < 0 else int(a) for a in axes}
        if normalised & {0, 1} or out_rank < 2:
            self.unknown(node, label, f"{node.op_type} node {label} moves the channel axis")
            return
        self.set_out(node, self.layout[x])

    def op_Transpose(self, node: onnx.NodeProto, label: str) -> None:
        perm = _attr(node, "perm")
        if perm is not None and len(perm) >= 2 and perm[0] == 0 and perm[1] == 1:
            self.set_out(node, self.layout[node.input[0]])
            return
        self.unknown(node, label, f"Transpose node {label} moves the channel axis")

    def op_Slice(self, node: onnx.NodeProto, label: str) -> None:
        x = node.input[0]
        rank = self.rank_of(x)
        if any(n in self.layout for n in node.input[1:]) or rank is None:
            self.unknown(node, label, f"Slice node {label} with computed parameters")
            return
        if self.opset >= 10:
            starts = self.const(node.input[1]) if len(node.input) > 1 else None
            axes = self.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            if starts is None or (len(node.input) > 3 and node.input[3] and axes is None):
                self.unknown(node, label, f"Slice node {label} with computed parameters")
                return
        else:
            starts, axes = _attr(node, "starts"), _attr(node, "axes")
        axes_list = list(range(len(starts))) if axes is None else [int(a) + rank if a < 0 else int(a) for a in axes]
        if 1 in axes_list or 0 in axes_list:
            self.unknown(node, label, f"Slice node {label} slices the batch or channel axis")
            return
        self.set_out(node, self.layout[x])

    # ---- layout-changing ops -------------------------------------------------------------------------
    def op_Flatten(self, node: onnx.NodeProto, label: str) -> None:
        x = node.input[0]
        layout = self.layout[x]
        dims = self.dims(x)
        axis = _attr(node, "axis", 1)
        if dims is not None and axis < 0:
            axis += len(dims)
        spatial = dims[2:] if dims is not None else None
        if layout is None or axis != 1 or spatial is None or not all(isinstance(d, int) for d in spatial):
            self.unknown(node, label, f"Flatten node {label} mixes channels with other axes in a way we cannot map")
            return
        per = math.prod(spatial)
        self.set_out(node, [(s, b * per) for s, b in layout])

    def op_Reshape(self, node: onnx.NodeProto, label: str) -> None:
        x, shape_name = node.input[0], node.input[1]
        layout = self.layout[x]
        dims = self.dims(x)
        shape = self.const(shape_name)
        if layout is None or shape is None or dims is None or len(dims) < 2 or shape_name in self.layout:
            self.unknown(node, label, f"Reshape node {label} with a shape that cannot be mapped")
            return
        shape = [int(s) for s in np.asarray(shape).reshape(-1)]
        allowzero = _attr(node, "allowzero", 0)
        channels = self.width(layout)
        rest = dims[2:]
        rest_known = all(isinstance(d, int) for d in rest)
        rest_prod = math.prod(rest) if rest_known else None
        fail = f"Reshape node {label} regroups the channel axis"
        if len(shape) < 2 or (allowzero and 0 in shape):
            self.unknown(node, label, fail)
            return
        batch_ok = shape[0] == 0 or (shape[0] == dims[0] and isinstance(dims[0], int)) or shape[0] == -1
        if not batch_ok:
            self.unknown(node, label, fail)
            return
        explicit_1 = shape[1] not in (0, -1)
        if shape[0] == -1 and not explicit_1:
            self.unknown(node, label, fail)
            return
        per: int | None = None
        if len(shape) == 2 and len(dims) >= 3 and rest_known and (
            shape[1] == -1 or shape[1] == channels * rest_prod
        ):
            per = rest_prod  # flatten: channel -> block of H*W features
        elif shape[1] == 0 or shape[1] == channels:
            tail = shape[2:]
            if -1 in tail or (rest_known and math.prod(tail) == rest_prod):
                per = 1
        elif shape[1] == -1 and rest_known and -1 not in shape[2:] and math.prod(shape[2:]) == rest_prod:
            per = 1
            explicit_1 = False
        if per is None:
            self.unknown(node, label, fail)
            return
        if explicit_1 and shape[1] != 0:
            if shape_name not in self.editable:
                self.unknown(node, label, f"Reshape node {label} has a shape constant that cannot be edited")
                return
            for space, block in layout:
                self.fixes.append((space, ShapeFix(shape_name, 1, block * per, label)))
        self.set_out(node, [(s, b * per) for s, b in layout])

    def op_Concat(self, node: onnx.NodeProto, label: str) -> None:
        rank = next((self.rank_of(n) for n in node.input if n and self.rank_of(n) is not None), None)
        axis = _attr(node, "axis", 1)
        if rank is not None and axis < 0:
            axis += rank
        if rank is None:
            self.unknown(node, label, f"Concat node {label} on tensors of unknown rank")
            return
        if axis != 1:
            self.elementwise(node, label, broadcast=False)
            return
        segments: Layout = []
        opaque = False
        for name in node.input:
            if not name:
                continue
            if name in self.layout:
                if self.layout[name] is None:
                    opaque = True
                else:
                    segments.extend(self.layout[name])
                continue
            part = self.fresh_blocked(name, f"channels from '{name}', which {label} concatenates")
            if part is None:
                opaque = True
            else:
                segments.extend(part)
        if opaque:
            for name in node.input:
                if name in self.layout:
                    reason = f"Concat node {label} joins them with channels we cannot follow"
                    self.block_layout(self.layout[name], reason)
            self.set_out(node, None)
            return
        self.set_out(node, segments)

    def elementwise(self, node: onnx.NodeProto, label: str, broadcast: bool = True) -> None:
        out = node.output[0]
        ranks = [self.rank_of(n) for n in node.input if n]
        out_rank = self.rank_of(out)
        if out_rank is None:
            out_rank = max((r for r in ranks if r is not None), default=None)
        if out_rank is None or any(self.rank_of(n) is None for n in node.input if n in self.layout):
            self.unknown(node, label, f"{node.op_type} node {label} on tensors of unknown rank")
            return
        out_dims = self.dims(out)
        out_channels = out_dims[1] if out_dims is not None and len(out_dims) == out_rank else None
        if not isinstance(out_channels, int):
            widths = [self.dims(n)[1] for n in node.input if n and self.dims(n) and len(self.dims(n)) == out_rank]
            out_channels = max((w for w in widths if isinstance(w, int)), default=None)
        coupled: list[Layout | None] = []
        params: list[str] = []
        for name in node.input:
            if not name:
                continue
            dims = self.dims(name)
            if name in self.layout:
                layout = self.layout[name]
                if len(dims) != out_rank:  # right-aligned broadcasting would move its channel axis
                    self.unknown(node, label, f"{node.op_type} node {label} aligns them with another axis")
                    return
                if broadcast and dims[1] == 1 and out_channels != 1 and (layout is None or self.width(layout) == 1):
                    # a single channel broadcast over all (e.g. a spatial attention map): independent
                    # of the others, but it can never be emptied either
                    continue
                coupled.append(layout)
            else:
                params.append(name)
        if not coupled:
            self.unknown(node, label, f"{node.op_type} node {label} broadcasts channel-less tensors")
            return
        first = coupled[0]
        for other in coupled[1:]:
            self.couple(first, other, f"{node.op_type} node {label}")
        if first is not None:
            for name in params:
                if not self.per_channel_param(first, name, out_rank, label, "const"):
                    break
        self.set_out(node, first)
        for extra in node.output[1:]:
            if extra:
                self.layout[extra] = None

    # ---- channel-creating ops -----------------------------------------------------------------------
    def op_Conv(self, node: onnx.NodeProto, label: str) -> None:
        x, w = node.input[0], node.input[1]
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        layout = self.layout[x]
        weight = self.const(w)
        if weight is None or weight.ndim < 3 or w in self.layout or (bias and bias in self.layout):
            self.unknown(node, label, f"Conv node {label} has a computed weight")
            return
        group = int(_attr(node, "group", 1))
        c_out, per_group_in = int(weight.shape[0]), int(weight.shape[1])
        if group == 1:
            if layout is not None:
                if self.record(layout, "c", w, 1, label, "weight"):
                    self.mask_candidates.extend((x, space) for space, _ in layout)
            out = [(self.new_space(c_out), 1)]
            self.record(out, "p", w, 0, label, "weight")
            if bias:
                self.record(out, "p", bias, 0, label, "bias")
            self.set_out(node, out)
            return
        # grouped / depthwise: a whole conv group (per_group_in inputs, c_out/group outputs) moves together
        if layout is None or len(layout) != 1 or c_out % group or self.width(layout) != group * per_group_in:
            self.block_layout(layout, f"grouped Conv node {label} (group={group}) that cannot be mapped")
            reason = f"output of grouped Conv node {label} that cannot be mapped"
            self.set_out(node, [(self.new_space(c_out, reason), 1)])
            return
        groups = self.new_space(group)
        space, block = layout[0]
        self.union(space, block, groups, per_group_in, f"grouped Conv node {label}")
        out = [(groups, c_out // group)]
        self.record(out, "p", w, 0, label, "weight")
        if bias:
            self.record(out, "p", bias, 0, label, "bias")
        self.set_out(node, out)

    def op_ConvTranspose(self, node: onnx.NodeProto, label: str) -> None:
        x, w = node.input[0], node.input[1]
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        layout = self.layout[x]
        weight = self.const(w)
        group = int(_attr(node, "group", 1))
        if weight is None or weight.ndim < 3 or group != 1 or w in self.layout or (bias and bias in self.layout):
            self.unknown(node, label, f"ConvTranspose node {label} (computed weight or group > 1)")
            return
        if layout is not None and self.record(layout, "c", w, 0, label, "weight"):
            self.mask_candidates.extend((x, space) for space, _ in layout)
        out = [(self.new_space(int(weight.shape[1])), 1)]
        self.record(out, "p", w, 1, label, "weight")
        if bias:
            self.record(out, "p", bias, 0, label, "bias")
        self.set_out(node, out)

    def op_Gemm(self, node: onnx.NodeProto, label: str) -> None:
        a, b = node.input[0], node.input[1]
        c = node.input[2] if len(node.input) > 2 and node.input[2] else None
        weight = self.const(b)
        if (
            a not in self.layout
            or weight is None
            or weight.ndim != 2
            or _attr(node, "transA", 0)
            or self.rank_of(a) != 2
            or (c and c in self.layout)
        ):
            self.unknown(node, label, f"Gemm node {label} is not activations x constant weight")
            return
        trans_b = _attr(node, "transB", 0)
        in_axis, out_axis = (1, 0) if trans_b else (0, 1)
        layout = self.layout[a]
        if layout is not None and self.record(layout, "c", b, in_axis, label, "weight"):
            self.mask_candidates.extend((a, space) for space, _ in layout)
        out = [(self.new_space(int(weight.shape[out_axis])), 1)]
        self.record(out, "p", b, out_axis, label, "weight")
        if c:
            self.per_channel_param(out, c, 2, label, "bias")
        self.set_out(node, out)

    def op_MatMul(self, node: onnx.NodeProto, label: str) -> None:
        a, b = node.input[0], node.input[1]
        weight = self.const(b)
        if a not in self.layout or weight is None or weight.ndim != 2 or self.rank_of(a) != 2:
            self.unknown(node, label, f"MatMul node {label} is not 2-D activations x constant weight")
            return
        layout = self.layout[a]
        if layout is not None and self.record(layout, "c", b, 0, label, "weight"):
            self.mask_candidates.extend((a, space) for space, _ in layout)
        out = [(self.new_space(int(weight.shape[1])), 1)]
        self.record(out, "p", b, 1, label, "weight")
        self.set_out(node, out)

    # ---- results ---------------------------------------------------------------------------------------
    def mask_values_for(self, value: str, root: int, seen: set[str]) -> list[str]:
        """Values upstream of `value` (through Flatten/Reshape/Concat/Squeeze) whose axis 1 is exactly `root`."""
        if value in seen:
            return []
        seen.add(value)
        layout = self.layout.get(value)
        if layout is None:
            return []
        if len(layout) == 1:
            space, block = layout[0]
            found_root, factor = self.find(space)
            if found_root == root and factor * block == 1:
                return [value]
        index = self.producer_of.get(value)
        if index is None:
            return []
        node = self.graph.node[index]
        if node.op_type in ("Flatten", "Reshape", "Squeeze", "Unsqueeze"):
            return self.mask_values_for(node.input[0], root, seen)
        if node.op_type == "Concat":
            found: list[str] = []
            for name in node.input:
                if name in self.layout and any(self.find(s)[0] == root for s, _ in self.layout[name] or []):
                    found += self.mask_values_for(name, root, seen)
            return found
        return []

    def groups(self) -> list[ChannelGroup]:
        roots: dict[int, ChannelGroup] = {}
        order: list[int] = []
        conflicts: dict[int, str] = {}

        def group_of(space: int) -> tuple[int, ChannelGroup, int]:
            root, factor = self.find(space)
            if root not in roots:
                roots[root] = ChannelGroup(name="", size=self.size[root])
                order.append(root)
            return root, roots[root], factor

        # slices, resolved to root units; check that no tensor axis is claimed twice
        claims: dict[tuple[str, int], list[tuple[int, int, int, str]]] = defaultdict(list)
        edited_by: dict[str, set[str]] = defaultdict(set)
        seen_slices: set[tuple[int, str, ChannelSlice]] = set()
        for space, role, piece in self.records:
            root, group, factor = group_of(space)
            resolved = piece._replace(block=piece.block * factor)
            key = (root, role, resolved)
            if key in seen_slices:
                continue
            seen_slices.add(key)
            (group.producers if role == "p" else group.consumers).append(resolved)
            claims[(piece.tensor, piece.axis)].append(
                (piece.offset, piece.offset + self.size[root] * resolved.block, root, role)
            )
            edited_by[piece.tensor].add(piece.node)
        seen_fixes: set[tuple[int, ShapeFix]] = set()
        for space, fix in self.fixes:
            root, group, factor = group_of(space)
            resolved = fix._replace(block=fix.block * factor)
            if (root, resolved) in seen_fixes:
                continue
            seen_fixes.add((root, resolved))
            group.shape_fixes.append(resolved)
            claims[(fix.tensor, -1 - fix.index)].append((0, 1, root, "fix"))
            edited_by[fix.tensor].add(fix.node)

        for (tensor, _axis), spans in claims.items():
            distinct = sorted(set(spans))
            for i, (start, stop, root, _role) in enumerate(distinct):
                for start2, stop2, root2, _role2 in distinct[i + 1 :]:
                    if start2 < stop and start < stop2 and (root2 != root or (start, stop) != (start2, stop2)):
                        conflicts.setdefault(root, f"'{tensor}' is shared with other channels")
                        conflicts.setdefault(root2, f"'{tensor}' is shared with other channels")
        for tensor, editors in edited_by.items():
            others = self.uses.get(tensor, set()) - editors
            if others:
                who = sorted(others)[0]
                for (name, _axis), spans in claims.items():
                    if name == tensor:
                        for *_, root, _role in spans:
                            conflicts.setdefault(root, f"'{tensor}' is also used by {who}")

        values_of: dict[int, list[str]] = defaultdict(list)
        for value, layout in self.layout.items():
            for space, _ in layout or []:
                root, group, _ = group_of(space)
                if value not in values_of[root]:
                    values_of[root].append(value)

        result: list[ChannelGroup] = []
        taken: set[str] = set()
        for root in order:
            group = roots[root]
            group.values = values_of.get(root, [])
            weights = [s for s in group.producers if s.kind == "weight"]
            base = weights[0].tensor if weights else (group.values[0] if group.values else f"channels#{root}")
            name, k = base, 2
            while name in taken:
                name, k = f"{base}#{k}", k + 1
            taken.add(name)
            group.name = name
            reason = self.reason.get(root) or conflicts.get(root)
            if reason is None and not weights:
                reason = "no layer with a constant weight creates these channels"
            if reason is None and group.size < 2:
                reason = "a single channel"
            group.prunable = reason is None
            group.reason = reason or ""
            masks: list[str] = []
            for value, space in self.mask_candidates:
                if self.find(space)[0] != root:
                    continue
                for found in self.mask_values_for(value, root, set()):
                    if found not in masks:
                        masks.append(found)
            group.mask_values = masks
            result.append(group)
        return result


def analyse_channels(proto: onnx.ModelProto) -> list[ChannelGroup]:
    """The channel groups of `proto`'s main graph, in order of first appearance.

    Every group whose channels could be physically removed has ``prunable=True``; the others say
    why not. `proto` is not modified (shape inference runs on a copy).
    """
    return _Analyser(proto).run()
