"""What one run of an ONNX model costs, counted in multiply-accumulates from shapes alone.

Budgets that must not make the bytes depend on the machine (how many calibration inputs the
sensitivity runs use) count this instead of timing a run. Conv, ConvTranspose, MatMul and Gemm of
the main graph are counted (the rest is a small share of a CNN's or transformer's work); shapes
come from onnx's shape inference with the inputs fixed to one sample's shape.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from ..model import Model

_COUNTED = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def multiply_accumulates(model: Model, sample: Mapping[str, np.ndarray]) -> float | None:
    """Multiply-accumulates of one run of an ONNX `model` on inputs shaped like `sample` (input
    name -> one sample's array, batch axis included); None when a counted node's shapes cannot be
    inferred or the graph counts none."""
    import onnx

    from ..formats.onnx_format import runtime_proto

    proto, _ = runtime_proto(model)
    for value in proto.graph.input:
        if value.name in sample:
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for size in np.shape(sample[value.name]):
                dims.add().dim_value = int(size)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # noqa: BLE001 - any failure of inference means "unknown", never an error
        return None
    shapes: dict[str, list[int]] = {init.name: list(init.dims) for init in inferred.graph.initializer}
    graph = inferred.graph
    for value in (*graph.value_info, *graph.input, *graph.output):
        dims = value.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
            shapes.setdefault(node.output[0], list(node.attribute[0].t.dims))
    total, counted = 0.0, 0
    for node in graph.node:
        if node.op_type not in _COUNTED:
            continue
        operands = [shapes.get(name) for name in node.input[:2]]
        out = shapes.get(node.output[0])
        if any(shape is None for shape in operands) or out is None:
            return None
        a, b = operands
        if node.op_type == "Conv":
            total += math.prod(out) * math.prod(b[1:])  # each output: C_in / groups x kernel taps
        elif node.op_type == "ConvTranspose":
            total += math.prod(a) * math.prod(b[1:])  # each input: C_out / groups x kernel taps
        elif node.op_type == "Gemm":
            trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
            total += math.prod(out) * (a[0] if trans_a else a[-1])
        else:
            total += math.prod(out) * (a[-1] if a else 1)
        counted += 1
    return total if counted else None
