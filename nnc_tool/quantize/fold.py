"""Fold inference-mode BatchNormalization into the preceding layer's weight and bias.

    model, folded = fold_batchnorm(model)

A BatchNormalization in inference mode is a per-channel affine map
``y = (x - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``. When ``x`` is the output of a
layer that is linear per output channel, the map can be absorbed into that layer::

    W' = W * s        (per output channel)
    b' = (b - mean) * s + beta        (b = 0 when the layer had no bias)

which removes the BN node and its four 1-D tensors. Those tensors are "non-weight" tensors that
the coder stores at a very fine step plus a per-tensor header, so folding shrinks the bitstream.

What is folded (main graph only, standard-domain ops):

* the BN has the inference form: 5 inputs, one (non-empty) output, ``training_mode`` 0, no
  ``spatial=0`` (opset 7/8), ``is_test=1`` for opset < 7; scale/B/mean/var are constants
  (initializers or ``Constant`` nodes, ``value``/``value_float(s)`` forms), 1-D, one per channel;
* its input is the first output of a Conv, ConvTranspose (weight ``[C_in, C_out/group, k...]``,
  groups handled), Gemm (any transA/transB; the BN's channel axis is Gemm's feature axis 1; a C
  input of shape ``[]``, ``[1]``, ``[N]`` or ``[1, N]`` is folded, ``beta`` is set to 1) or MatMul
  whose second input is a constant 2-D weight and whose first input is known (by shape
  inference) to be 2-D, so the BN's axis 1 is the MatMul's feature axis;
* that output feeds only the BN (no other node, no subgraph, not a graph output);
* the layer's weight (and existing bias) is a constant used by this layer alone and is a float.

MatMul has no bias input, so a folded MatMul gets an ``Add`` node (``MatMul -> Add(bias)``) in
place of the BN; onnxruntime fuses MatMul+Add into a Gemm anyway.

The layer's weight and bias keep their names and dtypes (the arithmetic is done in float64 and
cast back, so fp16/bf16 models stay fp16/bf16). A bias that has to be added is named after the
weight (``conv.weight`` -> ``conv.bias``, otherwise ``<weight>_bias``, made unique) and stored as
an initializer. BN parameters are removed once nothing else uses them; the BN output name is kept
(the layer now writes it), so graph outputs and downstream names are unchanged.

Skipped: everything else, in particular weights shared by several layers (or used by another
input slot), layers/BNs inside subgraphs (If/Loop/Scan bodies), initializers that are also graph
inputs (overridable, so not constants - this includes IR < 4 models that list every initializer
as an input), sparse initializers, Gemm in opset < 7 and non-finite ``s``. Non-ONNX models are
returned unchanged.
"""
from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ..formats import onnx_format
from ..graph.onnx_util import STANDARD_DOMAINS
from ..model import Model

__all__ = ["FoldResult", "fold_batchnorm", "fold_batchnorms"]

_LAYERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
_FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
)
_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")


@dataclass
class FoldResult:
    """A model with its BatchNorms folded, and what folding did to the weights' scale.

    `scales` maps each rewritten weight to |s| per output channel (float64): W' = W * s. The
    quantization plan reads them to give a folded weight the step the unfolded one would have
    had (a BN whose s is 1e-4 shrinks its conv's weights 10^4-fold; one absolute step for all
    weights would round them to zero). `row_scaled` names the weights whose first (stored) axis
    is that output channel (Conv, Gemm with transB): their rows can each take their own step.
    """

    model: Model
    count: int
    scales: dict[str, np.ndarray]
    row_scaled: frozenset[str] = frozenset()


def fold_batchnorms(model: Model) -> FoldResult:
    """Fold every foldable BatchNormalization of an ONNX model.

    The input model is not modified. When nothing is folded (or the model is not ONNX) the
    model itself is returned with count 0.
    """
    if model.format != onnx_format.FORMAT_NAME or b"BatchNormalization" not in model.topology:
        # The topology alone tells: no need to assemble (and copy) every weight.
        return FoldResult(model, 0, {})
    proto = onnx_format.to_proto(model)
    folder = _Folder(proto)
    folded = folder.run()
    if not folded:
        return FoldResult(model, 0, {})
    return FoldResult(onnx_format.from_proto(proto, dict(model.metadata)), folded, folder.scales, frozenset(folder.row_scaled))


def fold_batchnorm(model: Model) -> tuple[Model, int]:
    """`fold_batchnorms` as (model, number folded)."""
    result = fold_batchnorms(model)
    return result.model, result.count


# ----------------------------------------------------------------------------------------------


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _subgraph_names(graph: onnx.GraphProto, found: set[str]) -> None:
    """Every name read by nodes or output by the graph in `graph` and its subgraphs."""
    for node in graph.node:
        found.update(n for n in node.input if n)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _subgraph_names(attr.g, found)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _subgraph_names(sub, found)
    found.update(o.name for o in graph.output)


def _all_names(graph: onnx.GraphProto, names: set[str], node_names: set[str]) -> None:
    names.update(t.name for t in graph.initializer)
    names.update(v.name for v in (*graph.input, *graph.output, *graph.value_info))
    for sparse in graph.sparse_initializer:
        names.add(sparse.values.name)
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        if node.name:
            node_names.add(node.name)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _all_names(attr.g, names, node_names)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _all_names(sub, names, node_names)


def _set_array(tensor: onnx.TensorProto, values: np.ndarray) -> None:
    """Refill `tensor` in place (name, dtype and other fields kept) with `values`, cast to its dtype."""
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    array = np.ascontiguousarray(np.asarray(values).astype(dtype))
    if sys.byteorder == "big" and array.dtype.itemsize > 1:
        array = array.byteswap()
    for name in _DATA_FIELDS:
        tensor.ClearField(name)
    del tensor.external_data[:]
    tensor.ClearField("data_location")
    del tensor.dims[:]
    tensor.dims.extend(array.shape)
    tensor.raw_data = array.reshape(-1).view(np.uint8).tobytes()


@dataclass
class _Const:
    """A constant value of the main graph: an initializer or a Constant node's output."""

    name: str
    tensor: onnx.TensorProto | None  # the TensorProto to rewrite in place (None: scalar/list Constant forms)
    node: onnx.NodeProto | None  # the Constant node, if any
    data_type: int

    def array(self) -> np.ndarray:
        if self.tensor is not None:
            return numpy_helper.to_array(self.tensor)
        assert self.node is not None
        for a in self.node.attribute:
            if a.name == "value_float":
                return np.array(a.f, dtype=np.float32)
            if a.name == "value_floats":
                return np.array(list(a.floats), dtype=np.float32)
        raise ValueError("unsupported Constant form")


class _Folder:
    def __init__(self, proto: onnx.ModelProto) -> None:
        self.proto = proto
        self.graph = proto.graph
        self.opset = next((o.version for o in proto.opset_import if o.domain in STANDARD_DOMAINS), 1)
        graph = self.graph
        # One wrapper per node, kept for the whole run: nodes are identified by id() below.
        self.nodes = list(graph.node)
        graph_inputs = {v.name for v in graph.input}
        self.consts: dict[str, _Const] = {}
        for init in graph.initializer:
            if init.name not in graph_inputs:
                self.consts[init.name] = _Const(init.name, init, None, init.data_type)
        for node in self.nodes:
            if node.op_type != "Constant" or node.domain not in STANDARD_DOMAINS or len(node.output) != 1:
                continue
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    self.consts[node.output[0]] = _Const(node.output[0], a.t, node, a.t.data_type)
                elif a.name in ("value_float", "value_floats"):
                    self.consts[node.output[0]] = _Const(node.output[0], None, node, onnx.TensorProto.FLOAT)

        # How often each value is read: main-graph node inputs, graph outputs, and (once, as a
        # conservative "used elsewhere") any reference from inside a subgraph.
        self.uses: Counter[str] = Counter()
        self.producer: dict[str, onnx.NodeProto] = {}
        inner: set[str] = set()
        for node in self.nodes:
            self.uses.update(n for n in node.input if n)
            for out in node.output:
                if out:
                    self.producer[out] = node
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    _subgraph_names(attr.g, inner)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        _subgraph_names(sub, inner)
        self.uses.update(inner)
        self.graph_outputs = {o.name for o in graph.output}
        self.uses.update(self.graph_outputs)

        self.names: set[str] = set()
        self.node_names: set[str] = set()
        _all_names(graph, self.names, self.node_names)
        self.removed: set[int] = set()  # id() of nodes to drop
        self.scales: dict[str, np.ndarray] = {}  # weight name -> |s| per output channel
        self.row_scaled: set[str] = set()  # weights whose axis 0 is the output channel
        self.added_after: dict[int, onnx.NodeProto] = {}  # id(BN node) -> node replacing it
        # Initializers are added/removed only at the end, so the TensorProtos held in `consts`
        # stay the ones in the graph while folding:
        self.dropped_inits: set[str] = set()
        self.new_inits: dict[str, tuple[str, onnx.TensorProto]] = {}  # bias name -> (weight name, tensor)
        # Ranks from shape inference, taken before any rewrite (only MatMul folding needs them).
        self._ranks = self._infer_ranks() if any(n.op_type == "MatMul" for n in self.nodes) else {}

    # -- helpers --------------------------------------------------------------------------------

    def _infer_ranks(self) -> dict[str, int]:
        try:
            inferred = onnx.shape_inference.infer_shapes(self.proto)
        except Exception:  # noqa: BLE001 - custom ops, >2 GB, invalid models: no rank known
            inferred = self.proto
        ranks = {}
        g = inferred.graph
        for v in (*g.input, *g.value_info, *g.output):
            t = v.type.tensor_type
            if v.type.HasField("tensor_type") and t.HasField("shape"):
                ranks[v.name] = len(t.shape.dim)
        return ranks

    def _unique(self, candidate: str, taken: set[str]) -> str:
        name, k = candidate, 2
        while name in taken:
            name, k = f"{candidate}_{k}", k + 1
        taken.add(name)
        return name

    def _own_const(self, name: str) -> _Const | None:
        """The writable constant `name` if it is a float used exactly once (by the layer)."""
        const = self.consts.get(name)
        if const is None or const.tensor is None or const.data_type not in _FLOAT_TYPES:
            return None
        return const if self.uses[name] == 1 else None

    def _release(self, name: str) -> None:
        """One use of `name` is gone; drop the constant when nothing reads it any more."""
        self.uses[name] -= 1
        if self.uses[name] > 0:
            return
        const = self.consts.pop(name, None)
        if const is None:
            return
        if const.node is not None:
            self.removed.add(id(const.node))
        elif const.name in self.new_inits:
            del self.new_inits[const.name]
        else:
            self.dropped_inits.add(name)

    def _bn_params(self, bn: onnx.NodeProto, channels: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(s, beta - mean * s) in float64, or None when the BN is not a foldable inference BN."""
        if len(bn.input) != 5 or not bn.output or not bn.output[0] or any(o for o in bn.output[1:]):
            return None
        if _attr(bn, "training_mode", 0) != 0 or _attr(bn, "spatial", 1) != 1:
            return None
        if self.opset < 7 and _attr(bn, "is_test", 0) != 1:
            return None
        arrays = []
        for name in bn.input[1:]:
            const = self.consts.get(name)
            if const is None or const.data_type not in _FLOAT_TYPES:
                return None
            array = const.array()
            if array.ndim != 1 or array.shape[0] != channels:
                return None
            arrays.append(array.astype(np.float64))
        gamma, beta, mean, var = arrays
        eps = float(np.float32(_attr(bn, "epsilon", 1e-5)))
        with np.errstate(all="ignore"):
            s = gamma / np.sqrt(var + eps)
        if not np.isfinite(s).all():
            return None
        return s, beta - mean * s

    # -- folding --------------------------------------------------------------------------------

    def run(self) -> int:
        count = 0
        for bn in self.nodes:
            if bn.op_type == "BatchNormalization" and bn.domain in STANDARD_DOMAINS and self._fold(bn):
                count += 1
        if count:
            nodes = []
            for node in self.nodes:
                if id(node) in self.added_after:
                    nodes.append(self.added_after[id(node)])
                elif id(node) not in self.removed:
                    nodes.append(node)
            nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in nodes]
            del self.graph.node[:]
            self.graph.node.extend(nodes)

            # New biases go right after their layer's weight (so tensor lists read naturally). The
            # initializers are reordered in place: rebuilding the list would copy every weight.
            initializers = self.graph.initializer
            rank = {init.name: (2 * index, 0) for index, init in enumerate(initializers)}
            last = (2 * len(rank), 0)  # after everything: biases of weights that are not initializers
            for sequence, (weight_name, tensor) in enumerate(self.new_inits.values()):
                rank[tensor.name] = (rank.get(weight_name, last)[0] + 1, sequence)
                initializers.append(tensor)
            for index in reversed(range(len(initializers))):
                if initializers[index].name in self.dropped_inits:
                    del initializers[index]
            initializers.sort(key=lambda init: rank[init.name])
        return count

    def _fold(self, bn: onnx.NodeProto) -> bool:
        if not bn.input or not bn.input[0]:
            return False
        x = bn.input[0]
        layer = self.producer.get(x)
        if (
            layer is None
            or layer.op_type not in _LAYERS
            or layer.domain not in STANDARD_DOMAINS
            or layer.output[0] != x
            or self.uses[x] != 1
            or x in self.graph_outputs
            or len(layer.input) < 2
            or id(layer) in self.removed
        ):
            return False
        weight = self._own_const(layer.input[1])
        if weight is None:
            return False
        w = numpy_helper.to_array(weight.tensor).astype(np.float64)
        plan = self._plan(layer, w)
        if plan is None:
            return False
        channels, scale_w, old_bias = plan
        params = self._bn_params(bn, channels)
        if params is None:
            return False
        s, shift = params
        bias = shift if old_bias is None else old_bias * s + shift

        # Everything checked: rewrite.
        _set_array(weight.tensor, scale_w(w, s))
        self.scales[weight.name] = np.abs(s)
        if layer.op_type == "Conv" or (layer.op_type == "Gemm" and int(_attr(layer, "transB", 0))):
            self.row_scaled.add(weight.name)
        out = bn.output[0]
        if layer.op_type == "MatMul":
            self._add_matmul_bias(layer, bn, weight, bias)
        else:
            self._set_bias(layer, weight, bias)
            layer.output[0] = out
            self.producer[out] = layer
            self.producer.pop(x, None)
            self._drop_value_info(x)
            self.removed.add(id(bn))
        self.uses[x] -= 1
        for name in bn.input[1:]:
            self._release(name)
        return True

    def _plan(self, layer: onnx.NodeProto, w: np.ndarray):
        """(channels, weight scaler, existing bias in float64 or None) for a foldable layer, else None."""
        op = layer.op_type
        bias_name = layer.input[2] if len(layer.input) > 2 and layer.input[2] else None
        if bias_name is not None and self._own_const(bias_name) is None:
            return None  # a bias that is shared, not constant or not float: leave the layer alone

        def old_bias(shape_ok) -> tuple[bool, np.ndarray | None]:
            if bias_name is None:
                return True, None
            b = self.consts[bias_name].array().astype(np.float64)
            return shape_ok(b), b

        if op in ("Conv", "ConvTranspose"):
            if w.ndim < 3:
                return None
            group = int(_attr(layer, "group", 1))
            if op == "Conv":
                channels = w.shape[0]

                def scale_w(w, s):
                    return w * s.reshape((-1,) + (1,) * (w.ndim - 1))
            else:
                if group < 1 or w.shape[0] % group:
                    return None
                per_group = w.shape[1]
                channels = group * per_group

                def scale_w(w, s):
                    # W[c, j] feeds output channel (c // (C_in/group)) * (C_out/group) + j.
                    grouped = w.reshape((group, w.shape[0] // group, per_group) + w.shape[2:])
                    factors = s.reshape((group, 1, per_group) + (1,) * (w.ndim - 2))
                    return (grouped * factors).reshape(w.shape)
            ok, b = old_bias(lambda b: b.shape == (channels,))
            return (channels, scale_w, b) if ok else None

        if op == "Gemm":
            if self.opset < 7 or w.ndim != 2:
                return None
            trans_b = int(_attr(layer, "transB", 0))
            channels = w.shape[0] if trans_b else w.shape[1]

            def scale_w(w, s):
                return w * (s[:, None] if trans_b else s[None, :])

            if bias_name is None:
                return channels, scale_w, None
            b = self.consts[bias_name].array().astype(np.float64)
            if b.ndim > 2 or (b.ndim == 2 and b.shape[0] != 1) or (b.ndim >= 1 and b.shape[-1] not in (1, channels)):
                return None  # a per-row C ([M, N], [M, 1]) does not fold into a per-column bias
            b = np.broadcast_to(float(_attr(layer, "beta", 1.0)) * b.reshape(-1), (channels,)).copy()
            return channels, scale_w, b

        # MatMul(X, W): the BN's axis 1 is W's column axis only when X (hence Y) is 2-D.
        if len(layer.input) != 2 or w.ndim != 2 or self._ranks.get(layer.input[0]) != 2:
            return None

        def scale_w(w, s):
            return w * s[None, :]

        return w.shape[1], scale_w, None

    def _new_bias_name(self, weight_name: str) -> str:
        base = weight_name[: -len(".weight")] + ".bias" if weight_name.endswith(".weight") else weight_name + "_bias"
        return self._unique(base, self.names)

    def _set_bias(self, layer: onnx.NodeProto, weight: _Const, bias: np.ndarray) -> None:
        if len(layer.input) > 2 and layer.input[2]:
            const = self.consts[layer.input[2]]
            keep_2d = layer.op_type == "Gemm" and len(const.tensor.dims) == 2  # Gemm C of shape [1, N]
            shape = (1, bias.size) if keep_2d else bias.shape
            _set_array(const.tensor, bias.reshape(shape))
        else:
            name = self._new_bias_name(weight.name)
            self._add_initializer(name, bias, weight)
            if len(layer.input) > 2:
                layer.input[2] = name
            else:
                layer.input.append(name)
            self.uses[name] += 1
        if layer.op_type == "Gemm":
            for a in layer.attribute:
                if a.name == "beta":
                    a.f = 1.0

    def _add_initializer(self, name: str, values: np.ndarray, weight: _Const) -> None:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(weight.data_type)
        tensor = numpy_helper.from_array(np.asarray(values).astype(dtype), name)
        self.new_inits[name] = (weight.name, tensor)
        self.consts[name] = _Const(name, tensor, None, weight.data_type)

    def _add_matmul_bias(self, layer: onnx.NodeProto, bn: onnx.NodeProto, weight: _Const, bias: np.ndarray) -> None:
        name = self._new_bias_name(weight.name)
        self._add_initializer(name, bias, weight)
        base = (layer.name or layer.output[0]) + "/bias"
        node_name = self._unique(base, self.node_names)
        add = onnx.helper.make_node("Add", [layer.output[0], name], [bn.output[0]], name=node_name)
        self.added_after[id(bn)] = add
        self.uses[layer.output[0]] += 1  # read by the Add now (the BN's read is released by the caller)
        self.uses[name] += 1
        self.producer[bn.output[0]] = add

    def _drop_value_info(self, name: str) -> None:
        for i, v in enumerate(self.graph.value_info):
            if v.name == name:
                del self.graph.value_info[i]
                return
