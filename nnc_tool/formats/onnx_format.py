"""ONNX models: split a ModelProto into topology + tensors, and put it back together.

Tensors are taken from every place real exporters store float weights: graph initializers
and `Constant` nodes, in the main graph and (recursively) in every graph-valued attribute
(`If` branches, `Loop`/`Scan` bodies, ...).

Tensor names (the keys `write` uses to put tensors back):
  * main-graph initializer            -> its name, e.g. ``conv.weight``
  * main-graph ``Constant`` node       -> its output name
  * inside a subgraph                  -> ``<node>/<attribute>/<name>`` with ``<node>`` the node's
    name (or its first output name when unnamed), nested for deeper levels, e.g.
    ``gate/then_branch/w``; a ``GRAPHS`` attribute uses ``<attribute>[i]``.
  A name already taken gets ``#2``, ``#3``, ... appended. The order of discovery (a graph's own
  tensors before those of its subgraphs) depends only on the topology, so `write` recomputes
  exactly the same names from the stored topology and needs no separate name table.

Roles (and the reason for each) are decided by `onnx_roles` from the graph of values `_analyse`
records while it names the tensors; `tensor_roles` gives them for any topology.
"""
from __future__ import annotations

import os
import sys
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper

from ..errors import FormatError
from ..fileio import atomic_output, map_file
from ..model import FLOAT_DTYPES, Model, Tensor, numpy_dtype
from .onnx_roles import GraphBody, GraphNode, RoleDecision, TensorInfo, ValueGraph, decide_roles

FORMAT_NAME = "onnx"

# Metadata key: "1" when the source model kept its tensors in an external data file, so the
# decoded model is laid out the same way.
META_EXTERNAL_DATA = "onnx.external_data"

# ONNX element types we hand to the pipeline; anything else (strings, float8, int4, complex)
# stays inside the topology untouched.
_ONNX_DTYPES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.INT16: "int16",
    onnx.TensorProto.UINT16: "uint16",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.UINT32: "uint32",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.UINT64: "uint64",
    onnx.TensorProto.BOOL: "bool",
}

_STANDARD_DOMAINS = frozenset({"", "ai.onnx"})

# Initializers at least this big go to the external data file (onnx's own default threshold);
# smaller ones are cheaper inline.
_EXTERNAL_MIN_BYTES = 1024
# Protobuf refuses to serialize messages of 2 GiB or more; keep a margin for per-tensor framing.
_PROTO_LIMIT = 2**31 - 2**24
# Offsets in the data file: large tensors aligned to the usual mmap granularity so runtimes can
# map them directly, small ones just to a cache line.
_ALIGN_LARGE_FROM = 2**20
_ALIGN_LARGE = 2**16
_ALIGN_SMALL = 64

_ValueKey = tuple[int, str]  # (scope id, value name): names are only unique within a scope


@dataclass
class _Scope:
    id: int
    parent: _Scope | None
    names: frozenset[str]

    def resolve(self, name: str) -> _ValueKey:
        """The key of `name` as seen from this scope (subgraphs may use outer-scope values)."""
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.names:
                return (scope.id, name)
            scope = scope.parent
        return (-1, name)  # undefined in a valid model; keep it distinct from any real value


@dataclass
class _Slot:
    """One extracted tensor: where it lives in the ModelProto and which value it defines."""

    name: str
    proto: onnx.TensorProto
    key: _ValueKey
    is_initializer: bool


@dataclass
class _Analysis:
    slots: list[_Slot] = field(default_factory=list)
    graph: ValueGraph = field(default_factory=ValueGraph)


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The tensor of a `Constant` node in its `value` form (scalar/list forms stay in topology)."""
    if node.op_type != "Constant" or node.domain not in _STANDARD_DOMAINS or not node.output or not node.output[0]:
        return None
    for attr in node.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
            return attr.t
    return None


def _subgraphs(node: onnx.NodeProto) -> list[tuple[str, onnx.GraphProto]]:
    found: list[tuple[str, onnx.GraphProto]] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            found.append((attr.name, attr.g))
        elif attr.type == onnx.AttributeProto.GRAPHS:
            found.extend((f"{attr.name}[{i}]", g) for i, g in enumerate(attr.graphs))
    return found


def _scan_inputs(node: onnx.NodeProto) -> int:
    if node.op_type != "Scan":
        return -1
    return next((a.i for a in node.attribute if a.name == "num_scan_inputs"), -1)


def _analyse(proto: onnx.ModelProto) -> _Analysis:
    """Find extractable tensors, name them, and record the graph of values the roles come from."""
    result = _Analysis()
    taken: set[str] = set()
    next_scope_id = 0

    def unique(candidate: str) -> str:
        name, k = candidate, 2
        while name in taken:
            name, k = f"{candidate}#{k}", k + 1
        taken.add(name)
        return name

    def visit(graph: onnx.GraphProto, prefix: str, parent: _Scope | None, where: str) -> _Scope:
        nonlocal next_scope_id
        names = {v.name for v in graph.input} | {t.name for t in graph.initializer}
        names |= {o for n in graph.node for o in n.output if o}
        scope = _Scope(next_scope_id, parent, frozenset(names))
        next_scope_id += 1

        # The graph's own tensors are named before any subgraph's, so main-graph tensors always
        # keep their plain names and a colliding subgraph name is the one that gets a suffix.
        for init in graph.initializer:
            if init.data_type in _ONNX_DTYPES:
                result.slots.append(_Slot(unique(prefix + init.name), init, (scope.id, init.name), True))
        for node in graph.node:
            tensor = _constant_tensor(node)
            if tensor is not None and tensor.data_type in _ONNX_DTYPES:
                key = (scope.id, node.output[0])
                result.slots.append(_Slot(unique(prefix + node.output[0]), tensor, key, False))

        if parent is None:
            result.graph.outputs.extend(scope.resolve(out.name) for out in graph.output)

        nested: list[tuple[int, int, onnx.NodeProto]] = []
        for index, node in enumerate(graph.node):
            standard = node.domain in _STANDARD_DOMAINS
            result.graph.nodes.append(
                GraphNode(
                    op=node.op_type if standard else f"{node.domain}::{node.op_type}",
                    standard=standard,
                    inputs=[scope.resolve(n) if n else None for n in node.input],
                    outputs=[(scope.id, o) if o else None for o in node.output],
                    where=where,
                    num_scan_inputs=_scan_inputs(node),
                )
            )
            if node.attribute and any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute
            ):
                nested.append((index, len(result.graph.nodes) - 1, node))

        for index, node_ref, node in nested:
            node_id = node.name or next((o for o in node.output if o), f"{node.op_type}#{index}")
            for label, sub in _subgraphs(node):
                branch = label.removesuffix("_branch")
                child = visit(sub, f"{prefix}{node_id}/{label}/", scope, f"{where}/{node.op_type}/{branch}".lstrip("/"))
                body_ins = [(child.id, v.name) for v in sub.input]
                body_outs = [child.resolve(v.name) for v in sub.output]
                result.graph.bodies.append(GraphBody(node_ref, body_ins, body_outs))
        return scope

    visit(proto.graph, "", None, "")
    return result


def _decisions(analysis: _Analysis) -> list[RoleDecision]:
    infos = [
        TensorInfo(slot.key, _ONNX_DTYPES.get(slot.proto.data_type), tuple(int(d) for d in slot.proto.dims))
        for slot in analysis.slots
    ]
    return decide_roles(analysis.graph, infos)


def tensor_roles(model: onnx.ModelProto | bytes) -> dict[str, RoleDecision]:
    """(role, reason) of every tensor `from_proto` extracts, by tensor name.

    Needs only the topology: a stored (weightless) topology, as bytes, gives the same decisions
    as the full model, since they depend on the graph and the tensors' dtypes and dims alone.
    """
    if isinstance(model, (bytes, bytearray, memoryview)):
        proto = onnx.ModelProto()
        try:
            proto.ParseFromString(bytes(model))
        except Exception as err:  # noqa: BLE001
            raise FormatError(None, f"stored ONNX topology is damaged ({_one_line(err)})") from err
        model = proto
    analysis = _analyse(model)
    return {slot.name: decision for slot, decision in zip(analysis.slots, _decisions(analysis))}


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 240 else text[:237] + "..."


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of a graph and its subgraphs that may point to external data."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _all_tensors(sub)


def _load(path: Path) -> tuple[onnx.ModelProto, bool]:
    """Parse the model and pull in its external data; returns (proto, used external data)."""
    if not path.is_file():
        raise FormatError(path, "no such file" if not path.exists() else "not a regular file")
    try:
        proto = onnx.load_model(os.fspath(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - protobuf raises several unrelated types
        raise FormatError(path, f"not a valid ONNX model ({_one_line(err)})") from err
    if proto.ir_version <= 0 or not proto.HasField("graph"):
        raise FormatError(path, "not an ONNX model (no IR version or no graph)")
    if proto.ir_version >= 3 and not proto.opset_import:
        # onnx serializes opset_import after the graph, so its absence is the usual sign of a
        # file cut off right after the graph.
        raise FormatError(path, "ONNX model has no opset imports (truncated file?)")

    external = [t for t in _all_tensors(proto.graph) if external_data_helper.uses_external_data(t)]
    for tensor in external:
        _external_location(tensor, path)  # every problem with the data files surfaces here, early
    return proto, bool(external)


def _external_location(tensor: onnx.TensorProto, path: Path) -> tuple[Path, int, int | None]:
    """(data file, offset, length or None) of an externally stored tensor, validated.

    The location must name an existing file inside the model's directory: a model file must not
    make us read arbitrary files elsewhere on the machine.
    """
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    base = path.parent.resolve()
    target = (base / location).resolve()
    if not location or Path(location).is_absolute() or base not in target.parents:
        raise FormatError(path, f"tensor '{tensor.name}' points outside the model's directory ('{location}')")
    if not target.is_file():
        raise FormatError(path, f"external data file '{location}' (tensor '{tensor.name}') is missing")
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise FormatError(path, f"tensor '{tensor.name}' has a malformed external data offset or length") from None
    if offset < 0 or (length is not None and length < 0):
        raise FormatError(path, f"tensor '{tensor.name}' has a negative external data offset or length")
    return target, offset, length


class _ExternalData:
    """Read-only mappings of a model's external data files, opened once each."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._maps: dict[Path, object] = {}

    def array(self, tensor: onnx.TensorProto, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """A read-only view of the tensor's bytes in its data file (pages load on first use)."""
        target, offset, length = self._locate(tensor)
        count = int(np.prod(shape, dtype=np.int64))
        expected = count * dtype.itemsize
        if length is not None and length != expected:
            raise FormatError(
                self._path, f"tensor '{tensor.name}' has {length} bytes of external data, expected {expected}"
            )
        mapping = self._mapping(tensor, target, offset, expected)
        array = np.frombuffer(mapping, dtype=dtype, count=count, offset=offset).reshape(shape)
        if sys.byteorder == "big" and dtype.itemsize > 1:
            array = array.byteswap()  # ONNX data is little-endian; a swapped copy is the price on big-endian hosts
        return array

    def raw(self, tensor: onnx.TensorProto) -> bytes:
        """The stored bytes of an externally stored tensor (for tensors kept in the topology)."""
        target, offset, length = self._locate(tensor)
        if length is None:
            length = target.stat().st_size - offset
        mapping = self._mapping(tensor, target, offset, length)
        return bytes(mapping[offset : offset + length])

    def _locate(self, tensor: onnx.TensorProto) -> tuple[Path, int, int | None]:
        if self._path is None:
            raise FormatError(None, f"tensor '{tensor.name}' refers to external data but the model has no path")
        return _external_location(tensor, self._path)

    def _mapping(self, tensor: onnx.TensorProto, target: Path, offset: int, length: int):
        mapping = self._maps.get(target)
        if mapping is None:
            mapping = self._maps[target] = map_file(target)
        if length and offset + length > min(len(mapping), target.stat().st_size):
            raise FormatError(self._path, f"external data file '{target.name}' is too short for tensor '{tensor.name}'")
        return mapping


def external_files(path: Path) -> list[Path]:
    """The external data files an ONNX model refers to (existing ones, each once)."""
    proto = onnx.load_model(os.fspath(path), load_external_data=False)
    locations = {
        external_data_helper.ExternalDataInfo(t).location
        for t in _all_tensors(proto.graph)
        if external_data_helper.uses_external_data(t)
    }
    return [path.parent / loc for loc in sorted(locations) if (path.parent / loc).is_file()]


def _to_array(tensor: onnx.TensorProto, path: Path | None, external: _ExternalData) -> np.ndarray:
    dtype = numpy_dtype(_ONNX_DTYPES[tensor.data_type])
    count = int(np.prod(tensor.dims, dtype=np.int64))
    if external_data_helper.uses_external_data(tensor):
        return external.array(tensor, dtype, tuple(int(d) for d in tensor.dims))
    if tensor.raw_data and len(tensor.raw_data) != count * dtype.itemsize:
        raise FormatError(
            path,
            f"tensor '{tensor.name}' holds {len(tensor.raw_data)} bytes, expected {count * dtype.itemsize}"
            " (damaged data or external data file?)",
        )
    try:
        array = numpy_helper.to_array(tensor)
    except Exception as err:  # noqa: BLE001
        raise FormatError(path, f"tensor '{tensor.name}' is damaged ({_one_line(err)})") from err
    if array.dtype != dtype:
        # Older onnx releases return bfloat16 as raw uint16 bit patterns (or widened to float32).
        same_bits = array.dtype.kind in "ui" and array.dtype.itemsize == dtype.itemsize
        array = array.view(dtype) if same_bits else array.astype(dtype)
    # Own, writable, C-contiguous memory: to_array may return a read-only view of proto bytes.
    return np.array(array, dtype=dtype, order="C", copy=True).reshape(tuple(tensor.dims))


def _strip(tensor: onnx.TensorProto) -> None:
    """Drop a tensor's payload but keep its name, dtype and dims as the slot to refill."""
    for name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(name)
    del tensor.external_data[:]
    tensor.ClearField("data_location")


def read(path: Path) -> Model:
    """Read an ONNX model (with or without external data) into a format-neutral `Model`."""
    path = Path(path)
    proto, external = _load(path)
    return from_proto(proto, {META_EXTERNAL_DATA: "1" if external else "0"}, path)


def from_proto(proto: onnx.ModelProto, metadata: dict[str, str] | None = None, path: Path | None = None) -> Model:
    """Split a ModelProto into topology + tensors. Consumes `proto`.

    Tensors stored in external data files (relative to `path`) become read-only views of those
    files mapped into memory, so a large model is not copied; inline tensors are copied.
    """
    analysis = _analyse(proto)
    external = _ExternalData(path)
    tensors: list[Tensor] = []
    for slot, decision in zip(analysis.slots, _decisions(analysis)):
        tensors.append(Tensor(slot.name, _to_array(slot.proto, path, external), decision.role))
        _strip(slot.proto)
    # Tensors we do not extract (strings, float8, sparse parts) travel inside the topology.
    for tensor in _all_tensors(proto.graph):
        if external_data_helper.uses_external_data(tensor):
            raw = external.raw(tensor)
            _strip(tensor)
            tensor.raw_data = raw
    try:
        topology = proto.SerializeToString()
    except Exception as err:  # noqa: BLE001 - e.g. >2 GB of tensors we do not extract
        raise FormatError(path, f"cannot serialize the ONNX graph ({_one_line(err)})") from err
    return Model(format=FORMAT_NAME, topology=topology, tensors=tensors, metadata=dict(metadata or {}))


def to_proto(model: Model, max_elements: int | None = None) -> onnx.ModelProto:
    """The complete in-memory ModelProto (all weights inline) for graph analysis and rewriting.

    With `max_elements`, larger tensors keep only their dims: enough for shape inference (whose
    shape arithmetic reads small constants only) without copying the weights.
    """
    proto, slots, arrays = _assemble(model, None)
    for slot, array in zip(slots, arrays):
        if max_elements is None or array.size <= max_elements:
            slot.proto.raw_data = _bytes_view(array).tobytes()
    return proto


# Initializers up to this many values stay inline in runtime_proto.
INLINE_ELEMENTS = 64


def runtime_proto(model: Model) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The ModelProto for an onnxruntime session, without copying the main graph's weights.

    Main-graph initializers are declared as external data and returned as arrays by name, to
    be handed to the session directly (`graph.onnx_util.cpu_session(..., initializers=)`);
    other tensors (Constant nodes, subgraphs) and initializers of at most INLINE_ELEMENTS values
    are inline (onnxruntime's shape inference reads axes and shape constants such as Unsqueeze's
    and cannot read external ones). ResNet-18: 0.01 s instead of 0.1 s for `to_proto` and
    serialisation.
    """
    proto, slots, arrays = _assemble(model, None)
    main = {init.name for init in proto.graph.initializer}
    handed: dict[str, np.ndarray] = {}
    for slot, array in zip(slots, arrays):
        if slot.is_initializer and slot.key[0] == 0 and slot.name in main and array.size > INLINE_ELEMENTS:
            slot.proto.data_location = onnx.TensorProto.EXTERNAL
            entry = slot.proto.external_data.add()
            entry.key, entry.value = "location", "in-memory"
            handed[slot.name] = array
        else:
            slot.proto.raw_data = _bytes_view(array).tobytes()
    return proto, handed


def overridable_proto(model: Model) -> tuple[onnx.ModelProto, dict[str, str], dict[str, np.ndarray]]:
    """The model as a ModelProto whose float tensors can be replaced at run time.

    Every float tensor becomes a main-graph initializer that is also declared a graph input, so
    an onnxruntime session runs with the stored values and takes other values for any of them
    as feeds (ONNX lets graph inputs override initializers, IR >= 4): `Constant` nodes turn into
    initializers, and a tensor of an `If`/`Loop`/`Scan` body moves to the main graph, which the
    body reads from its outer scope (only when its name is unique in the whole model, so moving
    it cannot capture another value). Returns the proto; for each tensor that can be fed, the
    graph input that takes it (tensor name -> input name); and, as `runtime_proto` does, the
    larger initializers as arrays for the session (`graph.onnx_util.cpu_session(...,
    initializers=)`), declared external instead of copied into the proto. IR < 4 models are
    returned with nothing overridable.
    """
    proto, slots, arrays = _assemble(model, None)
    if proto.ir_version < 4:
        for slot, array in zip(slots, arrays):
            slot.proto.raw_data = _bytes_view(array).tobytes()
        return proto, {}, {}
    graph = proto.graph
    occurrences: dict[str, int] = defaultdict(int)
    _count_value_names(graph, occurrences)
    hoisted = {
        slot.key[1]: slot for slot in slots
        if _ONNX_DTYPES[slot.proto.data_type] in FLOAT_DTYPES and (slot.key[0] == 0 or occurrences[slot.key[1]] == 1)
    }
    handed: dict[str, np.ndarray] = {}
    for slot, array in zip(slots, arrays):
        # onnxruntime makes OrtValues of numpy's own dtypes only: bfloat16 stays inline.
        if hoisted.get(slot.key[1]) is slot and array.size > INLINE_ELEMENTS and array.dtype.kind != "V":
            slot.proto.data_location = onnx.TensorProto.EXTERNAL
            entry = slot.proto.external_data.add()
            entry.key, entry.value = "location", "in-memory"
            handed[slot.key[1]] = array
        else:
            slot.proto.raw_data = _bytes_view(array).tobytes()
    moved: list[onnx.TensorProto] = []
    _hoist(graph, hoisted, moved, main=True)
    graph.initializer.extend(moved)
    declared = {v.name for v in graph.input}
    for init in graph.initializer:
        if init.name in hoisted and init.name not in declared:
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return proto, {slot.name: value for value, slot in hoisted.items()}, handed


def _count_value_names(graph: onnx.GraphProto, counts: dict[str, int]) -> None:
    """How often each value name is defined anywhere in the graph hierarchy."""
    for name in [v.name for v in graph.input] + [t.name for t in graph.initializer]:
        counts[name] += 1
    for node in graph.node:
        for out in node.output:
            if out:
                counts[out] += 1
        for _, sub in _subgraphs(node):
            _count_value_names(sub, counts)


def _hoist(graph: onnx.GraphProto, hoisted: dict[str, _Slot], moved: list[onnx.TensorProto], main: bool) -> None:
    """Take the `hoisted` tensors out of `graph` and its subgraphs into `moved` (Constant nodes
    become initializers; subgraph initializers leave their body)."""
    # A main-graph tensor's name may be defined again inside a body (shadowing): only the graph
    # the hoisted tensor lives in gives it up.
    mine = {name for name, slot in hoisted.items() if (slot.key[0] == 0) == main}
    kept = []
    for node in graph.node:
        out = node.output[0] if node.output else ""
        if node.op_type == "Constant" and node.domain in _STANDARD_DOMAINS and out in mine and _constant_tensor(node) is not None:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(hoisted[out].proto)
            tensor.name = out
            moved.append(tensor)
            continue
        for _, sub in _subgraphs(node):
            _hoist(sub, hoisted, moved, main=False)
        kept.append(node)
    if len(kept) != len(graph.node):
        del graph.node[:]
        graph.node.extend(kept)
    if not main:
        leaving = [i for i, init in enumerate(graph.initializer) if init.name in mine]
        for index in reversed(leaving):
            tensor = onnx.TensorProto()
            tensor.CopyFrom(graph.initializer[index])
            moved.append(tensor)
            del graph.initializer[index]


def _fit(tensor: Tensor, slot: _Slot, path: Path) -> np.ndarray:
    """The tensor's array in the slot's declared dtype and shape, little-endian and contiguous."""
    want_name = _ONNX_DTYPES[slot.proto.data_type]
    want = numpy_dtype(want_name)
    shape = tuple(int(d) for d in slot.proto.dims)
    array = tensor.array
    if array.dtype != want:
        # Float precision may legitimately be changed by the pipeline; integer data may not.
        if not (tensor.is_float and want_name in FLOAT_DTYPES):
            raise FormatError(path, f"tensor '{slot.name}' is {tensor.dtype}, the model needs {want_name}")
        array = array.astype(want)
    if array.shape != shape:
        if array.size != int(np.prod(shape, dtype=np.int64)):
            raise FormatError(path, f"tensor '{slot.name}' has shape {array.shape}, the model needs {shape}")
        array = array.reshape(shape)
    array = np.ascontiguousarray(array)
    if sys.byteorder == "big" and want.itemsize > 1:
        array = array.byteswap()  # ONNX raw data is always little-endian
    return array


def _bytes_view(array: np.ndarray) -> np.ndarray:
    """The array's memory as uint8 (works for ml_dtypes, which lack a buffer format)."""
    return array.reshape(-1).view(np.uint8)


def write(model: Model, path: Path) -> None:
    """Write `model` (read by `read`) as ONNX at `path`, plus `path.name + '.data'` if needed."""
    path = Path(path)
    proto, slots, arrays = _assemble(model, path)
    total = len(model.topology) + sum(a.nbytes for a in arrays)
    if model.metadata.get(META_EXTERNAL_DATA) == "1" or total >= _PROTO_LIMIT:
        _write_external(proto, slots, arrays, path, len(model.topology))
        return
    for slot, array in zip(slots, arrays):
        slot.proto.raw_data = _bytes_view(array).tobytes()
    with atomic_output(path) as tmp:
        tmp.write_bytes(proto.SerializeToString())


def _assemble(model: Model, path: Path | None) -> tuple[onnx.ModelProto, list[_Slot], list[np.ndarray]]:
    """Parse the topology and match each tensor slot with its array (not yet filled in)."""
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(model.topology)
    except Exception as err:  # noqa: BLE001
        raise FormatError(path, f"stored ONNX topology is damaged ({_one_line(err)})") from err
    slots = _analyse(proto).slots
    by_name = model.tensor_map()
    missing = [s.name for s in slots if s.name not in by_name]
    unexpected = sorted(set(by_name) - {s.name for s in slots})
    if missing or unexpected:
        raise FormatError(
            path,
            f"tensors do not fit the ONNX graph (missing: {', '.join(missing[:5]) or '-'};"
            f" unexpected: {', '.join(unexpected[:5]) or '-'})",
        )
    return proto, slots, [_fit(by_name[s.name], s, path) for s in slots]


def _write_external(
    proto: onnx.ModelProto, slots: list[_Slot], arrays: list[np.ndarray], path: Path, topology_bytes: int
) -> None:
    data_name = path.name + ".data"
    big = [a.nbytes >= _EXTERNAL_MIN_BYTES for a in arrays]
    # Constants stay inline like onnx's own exporter does (many tools only resolve external
    # data on initializers), unless keeping them inline would break the protobuf size limit.
    inline_bytes = topology_bytes + sum(
        a.nbytes for s, a, b in zip(slots, arrays, big) if not (b and s.is_initializer)
    )
    constants_out = inline_bytes >= _PROTO_LIMIT
    outside = [b and (s.is_initializer or constants_out) for s, b in zip(slots, big)]

    # Data first, model second: whoever sees the new model file also sees its data.
    with atomic_output(path) as tmp_model:
        with atomic_output(path.with_name(data_name)) as tmp_data:
            with tmp_data.open("wb") as data:
                offset = 0
                for slot, array, out in zip(slots, arrays, outside):
                    if not out:
                        slot.proto.raw_data = _bytes_view(array).tobytes()
                        continue
                    align = _ALIGN_LARGE if array.nbytes >= _ALIGN_LARGE_FROM else _ALIGN_SMALL
                    pad = -offset % align
                    data.write(b"\0" * pad)
                    offset += pad
                    data.write(_bytes_view(array))
                    # Filled by hand: onnx's set_external_data insists on raw_data being present.
                    for key, value in (("location", data_name), ("offset", offset), ("length", array.nbytes)):
                        entry = slot.proto.external_data.add()
                        entry.key, entry.value = key, str(value)
                    slot.proto.data_location = onnx.TensorProto.EXTERNAL
                    offset += array.nbytes
            tmp_model.write_bytes(proto.SerializeToString())


__all__ = [
    "FORMAT_NAME", "META_EXTERNAL_DATA", "external_files", "from_proto", "read", "tensor_roles", "to_proto", "write",
]
