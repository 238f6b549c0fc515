"""Which axes of a weight tensor are its output neurons, its inputs and its kernel.

Pruning needs to know, for every weight, along which axis an output neuron's inputs run (N:M
groups) and which axis enumerates the output channels (channel zeroing, the coder's zero rows).

ONNX: the layout comes from the op that consumes the tensor (standard domain only):

  ===================  =========================  ========  =======  ============
  consumer (slot)      weight shape               out_axis  in_axis  kernel_axes
  ===================  =========================  ========  =======  ============
  Conv (W)             [out, in/g, k...]          0         1        2..
  ConvTranspose (W)    [in, out/g, k...]          1         0        2..
  Gemm B, transB=1     [out, in]                  0         1        ()
  Gemm B, transB=0     [in, out]                  1         0        ()
  Gemm A, transA=0     [out, in]  (Y = A @ X)     0         1        ()
  Gemm A, transA=1     [in, out]                  1         0        ()
  MatMul, 2nd input    [..., in, out]             ndim-1    ndim-2   ()
  MatMul, 1st input    [..., out, in]             ndim-2    ndim-1   ()
  ===================  =========================  ========  =======  ============

Axes are always given as non-negative indices (MatMul's "-1/-2" are resolved with the
tensor's rank). A tensor read by any other op (or slot), or by several consumers that disagree
about the axes, has no known layout and is omitted. Consumers inside subgraphs are resolved
with the same scoping rules and tensor names as `nnc_tool.formats.onnx_format`.

PyTorch formats and safetensors: there is no analysable graph, so torch's own convention is
assumed for every WEIGHT tensor of rank >= 2 (Linear [out, in], Conv [out, in/g, k...]):
out 0, in 1, kernel axes 2.., op "torch". (ConvTranspose modules, stored [in, out/g, k...],
cannot be told apart by name or shape; they are rare and get the same assumption.)
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import onnx

from ..model import Model, TensorRole
from .onnx_util import STANDARD_DOMAINS, topology_proto

__all__ = ["TORCH_FORMATS", "WeightLayout", "weight_layouts"]

TORCH_FORMATS = frozenset({"torch-state-dict", "torchscript", "torch-export", "safetensors"})


@dataclass(frozen=True)
class WeightLayout:
    """Axes of one weight tensor: output neurons, their inputs (None if unknown), kernel."""

    out_axis: int
    in_axis: int | None
    kernel_axes: tuple[int, ...]
    op: str


def weight_layouts(model: Model) -> dict[str, WeightLayout]:
    """Layout of every WEIGHT-role tensor of `model` whose layout is known, by tensor name."""
    if model.format == "onnx":
        return _onnx_layouts(model)
    if model.format in TORCH_FORMATS:
        return {
            t.name: WeightLayout(0, 1, tuple(range(2, t.array.ndim)), "torch")
            for t in model.tensors
            if t.role == TensorRole.WEIGHT and t.array.ndim >= 2
        }
    return {}


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name and attr.type == onnx.AttributeProto.INT:
            return int(attr.i)
    return default


def _consumer_layout(node: onnx.NodeProto, slot: int, ndim: int) -> WeightLayout | None:
    """The layout a consumer implies for the tensor in its input `slot` (None: unknown)."""
    if node.domain not in STANDARD_DOMAINS:
        return None
    op = node.op_type
    if op == "Conv" and slot == 1 and ndim >= 3:
        return WeightLayout(0, 1, tuple(range(2, ndim)), op)
    if op == "ConvTranspose" and slot == 1 and ndim >= 3:
        return WeightLayout(1, 0, tuple(range(2, ndim)), op)
    if op == "Gemm" and ndim == 2:
        if slot == 1:
            return WeightLayout(0, 1, (), op) if _attr(node, "transB", 0) else WeightLayout(1, 0, (), op)
        if slot == 0:
            return WeightLayout(1, 0, (), op) if _attr(node, "transA", 0) else WeightLayout(0, 1, (), op)
    if op == "MatMul" and ndim >= 2:
        if slot == 1:
            return WeightLayout(ndim - 1, ndim - 2, (), op)
        if slot == 0:
            return WeightLayout(ndim - 2, ndim - 1, (), op)
    return None


def _onnx_layouts(model: Model) -> dict[str, WeightLayout]:
    # Private helpers of the format module, used read-only: they define the tensor names and
    # the value scopes, and reusing them keeps both views of the graph in step.
    from ..formats import onnx_format

    proto = topology_proto(model.topology)
    analysis = onnx_format._analyse(proto)

    # Walk the graphs in exactly the order `_analyse` does, so scope ids match its value keys.
    consumers: dict[tuple[int, str], list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    next_id = 0

    def walk(graph: onnx.GraphProto, parent: onnx_format._Scope | None) -> None:
        nonlocal next_id
        names = {v.name for v in graph.input} | {t.name for t in graph.initializer}
        names |= {o for n in graph.node for o in n.output if o}
        scope = onnx_format._Scope(next_id, parent, frozenset(names))
        next_id += 1
        for node in graph.node:
            for slot, name in enumerate(node.input):
                if name:
                    consumers[scope.resolve(name)].append((node, slot))
        for node in graph.node:
            for _label, sub in onnx_format._subgraphs(node):
                walk(sub, scope)

    walk(proto.graph, None)

    by_name = model.tensor_map()
    layouts: dict[str, WeightLayout] = {}
    for slot in analysis.slots:
        tensor = by_name.get(slot.name)
        if tensor is None or tensor.role != TensorRole.WEIGHT:
            continue
        found = [_consumer_layout(node, index, tensor.array.ndim) for node, index in consumers.get(slot.key, [])]
        if not found or any(f is None for f in found):
            continue
        axes = {(f.out_axis, f.in_axis, f.kernel_axes) for f in found}
        if len(axes) != 1:
            continue  # consumers disagree: the layout is ambiguous
        ops = sorted({f.op for f in found})
        first = found[0]
        layouts[slot.name] = WeightLayout(first.out_axis, first.in_axis, first.kernel_axes, "+".join(ops))
    return layouts
