"""Depth pruning of ONNX graphs: remove whole residual branches.

After "Can Unstructured Pruning Reduce the Depth in Deep Neural Networks?" (Entropy Guided
Pruning) and NEPENTHE: a rectifier whose on/off state hardly ever changes over the data (always
on = linear, always off = dead) adds little non-linearity, so a branch made of such units can go.

Units
    A *residual unit* is an ``Add`` with two inputs ``u`` (the branch) and ``v`` (the shortcut)
    such that ``u`` is computed by a single-entry single-exit subgraph hanging off a fork value
    ``X`` that ``v`` also derives from (``v`` is ``X`` itself, or a shortcut path from ``X``, e.g.
    1x1 conv + BN). Single entry: every backward path from ``u`` ends at ``X`` or at a constant.
    Single exit: every value the branch computes is read only inside the branch, except ``u``,
    which only the ``Add`` reads; no graph output lies inside. ``u``, ``v`` and the ``Add``
    output must have the same shape and element type (onnx shape inference; when that cannot
    tell, the shapes seen at run time on the calibration batch), so dropping the branch leaves
    every shape unchanged. Removing the unit rewires the ``Add``'s consumers to ``v`` and deletes
    the ``Add`` and the branch with its initializers. When both inputs qualify, the one with more
    parameters (then more nodes) is the branch, the lighter path the shortcut.

Scores (on `PruneConfig.calibration`, in onnxruntime, relative to the *original* model)
    entropy      for every rectifier in the branch (Relu, LeakyRelu, PRelu, Elu, Celu, Selu,
                 ThresholdedRelu, Clip): per output position (channel x spatial) the share p of
                 calibration samples where it is active (pre-activation above the kink), the
                 binary entropy H(p) in bits averaged over positions, then over the branch's
                 rectifiers. 0 = every unit always on or always off (the branch is linear or
                 dead), 1 = maximal switching. A branch without rectifiers scores 0 (it is linear).
    distortion   mean KL(softmax(original) || softmax(pruned)) of [N, classes] outputs (MSE
                 relative to the original's mean square for other outputs) when this unit, on top
                 of those already removed, is bypassed: the lower of (a) plain bypass and (b)
                 bypass plus re-estimated running statistics of the BatchNorms downstream of every
                 rewired Add, (b) judged by 2-fold cross-validation (statistics fitted on one half of
                 the calibration data, distortion measured on the other, and vice versa), so units
                 with many downstream BatchNorms are not favoured for fitting the samples they are
                 judged on. (b) is what removal really costs, since the same re-estimation is
                 applied to the result.
    score        distortion x (1 + entropy / 4): distortion dominates, the entropy breaks
                 near-ties in favour of the branch whose rectifiers switch less (EGP/NEPENTHE).
                 On the sample models entropy alone, or plain bypass distortion, would remove
                 mobilenet's block5 first (test accuracy 0.738) where (b) removes block3 (0.887);
                 see the docstring of tests/test_prune_depth.py.

Removal is greedy: round-half-up(sparsity x units) units are removed one at a time, each time the
lowest-scoring one, with units and scores re-measured on the pruned graph after every removal
(a unit nested in a removed branch disappears with it). Finally the downstream BatchNorm
statistics are re-estimated on all calibration samples if the cross-validated distortion says
that helps. Channels that are constant on the calibration data keep their trained statistics.

Cost: one onnxruntime session per unit per step (plus two per downstream BatchNorm and unit when
re-estimating; skipped beyond 64 downstream BatchNorms). Models must have one input and be small
enough to serialize (< 2 GB).
"""
from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import UsageError
from ..formats import onnx_format
from ..model import Model, TensorRole
from .config import LayerChange, PruneConfig, PruneReport, calibration_rows
from ..graph.onnx_util import STANDARD_DOMAINS, subgraphs

# Rectifier-like ops: their activation state is "pre-activation above the kink" (the kink is 0
# except for ThresholdedRelu's alpha and Clip's lower bound).
_RECTIFIERS = frozenset({"Relu", "LeakyRelu", "PRelu", "Elu", "Celu", "Selu", "ThresholdedRelu", "Clip"})

_CHUNK = 128  # calibration samples per onnxruntime run (unless the model fixes its batch size)
_MAX_BN_RECALIBRATION = 64  # more downstream BatchNorms than this: skip re-estimation (one run each)
_MIN_FOLD = 4  # fewer calibration samples per half than this: no BatchNorm re-estimation
_ENTROPY_WEIGHT = 0.25  # score = distortion x (1 + weight x entropy): entropy as a soft tie-breaker
_EPS = 1e-12


# --------------------------------------------------------------------------------------------
# Graph helpers


def _key(node: onnx.NodeProto) -> str:
    return next((o for o in node.output if o), "")


def _free_names(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from enclosing scopes."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    defined |= {o for n in graph.node for o in n.output if o}
    used: set[str] = {o.name for o in graph.output}
    for node in graph.node:
        used.update(i for i in node.input if i)
        for sub in subgraphs(node):
            used |= _free_names(sub)
    return used - defined


def _reads(node: onnx.NodeProto) -> list[str]:
    """Every value a node reads: its inputs plus outer-scope values used by its subgraphs."""
    names = [i for i in node.input if i]
    for sub in subgraphs(node):
        names.extend(sorted(_free_names(sub)))
    return names


def _captures(node: onnx.NodeProto) -> set[str]:
    found: set[str] = set()
    for sub in subgraphs(node):
        found |= _free_names(sub)
    return found


class _Index:
    """Producers and consumers of the values of a main graph."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.nodes = list(graph.node)
        self.initializers = {t.name for t in graph.initializer}
        self.inputs = [v.name for v in graph.input if v.name not in self.initializers]
        self.outputs = {v.name for v in graph.output}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        for i, node in enumerate(self.nodes):
            for out in node.output:
                if out:
                    self.producer[out] = i
            for name in dict.fromkeys(_reads(node)):
                self.consumers[name].append(i)
        self.constants = set(self.initializers)
        for i, node in enumerate(self.nodes):  # topological order: constant folding in one pass
            reads = _reads(node)
            if node.domain in STANDARD_DOMAINS and all(r in self.constants for r in reads) and (
                reads or node.op_type == "Constant"
            ):
                self.constants.update(o for o in node.output if o)

    def node_name(self, i: int) -> str:
        node = self.nodes[i]
        return node.name or next((o for o in node.output if o), f"{node.op_type}#{i}")


def _shape_table(proto: onnx.ModelProto) -> dict[str, tuple[int, tuple[int | str | None, ...] | None]]:
    """value -> (element type, dims) from onnx shape inference; a dim is int, symbol or None."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is best effort; run-time shapes decide then
        inferred = proto
    table: dict[str, tuple[int, tuple[int | str | None, ...] | None]] = {}
    graph = inferred.graph
    for info in list(graph.input) + list(graph.value_info) + list(graph.output):
        tensor = info.type.tensor_type
        if not info.type.HasField("tensor_type"):
            continue
        dims = None
        if tensor.HasField("shape"):
            dims = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim
            )
        table[info.name] = (tensor.elem_type, dims)
    for init in graph.initializer:
        table[init.name] = (init.data_type, tuple(int(d) for d in init.dims))
    return table


def _fmt_shape(entry: tuple[int, tuple[int | str | None, ...] | None] | None) -> str:
    if entry is None or entry[1] is None:
        return "?"
    return "[" + ",".join("?" if d is None else str(d) for d in entry[1]) + "]"


# --------------------------------------------------------------------------------------------
# Finding units


@dataclass
class _Unit:
    name: str  # the Add node's name (stable across rewrites)
    add_output: str  # the value whose readers get rewired
    branch_output: str  # the Add input that is dropped
    shortcut: str  # ... to this value
    entry: str  # the fork value X
    nodes: list[str]  # names of the branch nodes (without the Add), for reports
    keys: frozenset[str]  # the branch nodes' first outputs (unique, unlike node names)
    shared_ok: frozenset[str]  # keys of constant-valued branch nodes, which may be read elsewhere too
    rectifiers: list[tuple[str, float]]  # (pre-activation value, kink) of each rectifier
    parameters: int  # float parameters inside the branch
    runtime_shape_check: bool  # static shapes unknown: compare run-time shapes before use
    entropy: float = float("nan")  # mean binary entropy of the branch's rectifier states, bits
    bypass: float = float("nan")  # output distortion with the branch bypassed
    refit: float = float("nan")  # ... and downstream BatchNorms re-estimated (cross-validated)
    batchnorms: int = 0  # BatchNorms downstream of the rewired Add(s)

    @property
    def distortion(self) -> float:
        """What removing the unit costs: the better of plain bypass and bypass + BN re-estimation."""
        return self.bypass if not self.refit < self.bypass else self.refit

    @property
    def score(self) -> float:
        return self.distortion * (1.0 + _ENTROPY_WEIGHT * self.entropy)


@dataclass
class _Search:
    units: list[_Unit] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    adds: int = 0


def _branch_closure(index: _Index, u: str, entry: str) -> set[int] | None:
    """Nodes on the backward paths from `u` that stop at `entry` or constants; None if a path
    reaches a graph input (or an undefined value) instead, i.e. `entry` does not dominate `u`."""
    nodes: set[int] = set()
    stack, seen = [u], set()
    while stack:
        value = stack.pop()
        if value == entry or value in seen:
            continue
        seen.add(value)
        if value in index.initializers:
            continue
        producer = index.producer.get(value)
        if producer is None:
            return None
        if producer in nodes:
            continue
        nodes.add(producer)
        stack.extend(_reads(index.nodes[producer]))
    return nodes


def _ancestors(index: _Index, value: str, limit: int = 512) -> list[str]:
    """Non-constant values `value` derives from, nearest first (breadth first), itself included."""
    order, queue, seen = [], [value], {value}
    while queue and len(order) < limit:
        current = queue.pop(0)
        if current in index.constants:
            continue
        order.append(current)
        producer = index.producer.get(current)
        if producer is None:
            continue
        for name in _reads(index.nodes[producer]):
            if name not in seen:
                seen.add(name)
                queue.append(name)
    return order


def _float_params(index: _Index, nodes: set[int], sizes: dict[str, int]) -> int:
    """Float parameters (initializers, Constant tensors) that only the given nodes read."""
    names = {n for i in nodes for n in _reads(index.nodes[i]) if n in sizes}
    return sum(sizes[n] for n in names if set(index.consumers.get(n, [])) <= nodes and n not in index.outputs)


def _constant_value(index: _Index, name: str) -> float | None:
    for init in index.graph.initializer:
        if init.name == name:
            array = numpy_helper.to_array(init)
            return float(array.reshape(-1)[0]) if array.size == 1 else None
    producer = index.producer.get(name)
    if producer is not None and index.nodes[producer].op_type == "Constant":
        for attr in index.nodes[producer].attribute:
            if attr.name == "value":
                array = numpy_helper.to_array(attr.t)
                return float(array.reshape(-1)[0]) if array.size == 1 else None
            if attr.name == "value_float":
                return float(attr.f)
    return None


def _rectifiers(index: _Index, nodes: Iterable[int]) -> list[tuple[str, float]]:
    found = []
    for i in sorted(nodes):
        node = index.nodes[i]
        if node.domain not in STANDARD_DOMAINS or node.op_type not in _RECTIFIERS or not node.input[0]:
            continue
        kink = 0.0
        if node.op_type == "ThresholdedRelu":
            kink = next((a.f for a in node.attribute if a.name == "alpha"), 1.0)
        elif node.op_type == "Clip":
            low = next((a.f for a in node.attribute if a.name == "min"), None)  # opset < 11
            if low is None and len(node.input) > 1 and node.input[1]:
                low = _constant_value(index, node.input[1])
                if low is None:
                    continue  # a data-dependent bound: no fixed kink to count against
            kink = 0.0 if low is None or not math.isfinite(low) else low
        found.append((node.input[0], float(kink)))
    return found


def _compare_shapes(branch, shortcut, total) -> tuple[str, bool]:
    """('', whether run-time shapes must confirm) if branch, shortcut and sum can be equal in
    shape and type, else (the reason they cannot, False). Symbolic or unknown dims that differ
    only by name are left to the run-time check."""
    entries = (branch, shortcut, total)
    if any(e is None for e in entries):
        return "", True
    if len({e[0] for e in entries if e[0]}) > 1:
        return "element types of branch, shortcut and sum differ", False
    if any(e[1] is None for e in entries):
        return "", True
    reason = (
        f"branch output shape {_fmt_shape(branch)} differs from shortcut shape {_fmt_shape(shortcut)}"
        f" (sum {_fmt_shape(total)}): dropping the branch would change shapes"
    )
    if len({len(e[1]) for e in entries}) > 1:
        return reason, False
    runtime = False
    for column in zip(*(e[1] for e in entries)):
        if len({d for d in column if isinstance(d, int)}) > 1:
            return reason, False
        runtime |= len(set(column)) > 1 or None in column
    return "", runtime


def _try_branch(
    index: _Index, add: int, u: str, v: str, shapes: dict, sizes: dict[str, int]
) -> tuple[_Unit | None, str]:
    """The unit dropping `u` (keeping `v`), or None and why not."""
    add_node = index.nodes[add]
    out = add_node.output[0]
    entry = None
    branch: set[int] | None = None
    feeds_u = set(_ancestors(index, u, limit=1 << 30))
    for candidate in _ancestors(index, v):
        if candidate not in feeds_u or candidate == u:
            continue
        closure = _branch_closure(index, u, candidate)
        if closure and any(candidate in _reads(index.nodes[i]) for i in closure):
            entry, branch = candidate, closure
            break
    if branch is None or entry is None:
        return None, f"'{u}' does not fork off any value '{v}' derives from"
    if u in index.outputs or index.consumers.get(u, []) != [add]:
        return None, f"'{u}' is also read outside the Add"
    for i in branch:
        outs = [o for o in index.nodes[i].output if o]
        if all(o in index.constants and o not in index.outputs for o in outs):
            continue  # constant subgraphs may be shared; removal keeps them while still read
        for o in outs:
            if o in index.outputs:
                return None, f"graph output '{o}' lies inside the branch"
            outside = [c for c in index.consumers.get(o, []) if c not in branch and not (o == u and c == add)]
            if outside:
                return None, f"branch value '{o}' is also read by '{index.node_name(outside[0])}' (not single-exit)"
    problem, runtime_check = _compare_shapes(shapes.get(u), shapes.get(v), shapes.get(out))
    if problem:
        return None, problem
    unit = _Unit(
        name=index.node_name(add),
        add_output=out,
        branch_output=u,
        shortcut=v,
        entry=entry,
        nodes=[index.node_name(i) for i in sorted(branch)],
        keys=frozenset(_key(index.nodes[i]) for i in branch),
        shared_ok=frozenset(_key(index.nodes[i]) for i in branch if _key(index.nodes[i]) in index.constants),
        rectifiers=_rectifiers(index, branch),
        parameters=_float_params(index, branch, sizes),
        runtime_shape_check=runtime_check,
    )
    return unit, ""


def _float_sizes(graph: onnx.GraphProto) -> dict[str, int]:
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    sizes = {t.name: int(np.prod(t.dims, dtype=np.int64)) for t in graph.initializer if t.data_type in floats}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type in floats:
                    sizes[node.output[0]] = int(np.prod(attr.t.dims, dtype=np.int64))
    return sizes


def _find_units(proto: onnx.ModelProto) -> _Search:
    index = _Index(proto.graph)
    shapes = _shape_table(proto)
    sizes = _float_sizes(proto.graph)
    search = _Search()
    for i, node in enumerate(index.nodes):
        if node.op_type != "Add" or node.domain not in STANDARD_DOMAINS:
            continue
        search.adds += 1
        name = index.node_name(i)
        inputs = [n for n in node.input]
        if len(inputs) != 2 or not all(inputs) or not node.output or not node.output[0]:
            search.skipped.append(f"{name}: not a two-input Add")
            continue
        a, b = inputs
        if a in index.constants or b in index.constants:
            search.skipped.append(f"{name}: adds a constant (bias), not a residual branch")
            continue
        if a == b:
            search.skipped.append(f"{name}: both inputs are the same value")
            continue
        found, reasons = [], []
        for u, v in ((a, b), (b, a)):
            unit, why = _try_branch(index, i, u, v, shapes, sizes)
            if unit is not None:
                found.append(unit)
            else:
                reasons.append(f"dropping '{u}': {why}")
        if not found:
            search.skipped.append(f"{name}: no removable branch ({'; '.join(reasons)})")
            continue
        # Both sides qualify (e.g. conv branch vs. conv shortcut): the heavier side is the branch.
        found.sort(key=lambda unit: (unit.parameters, len(unit.nodes)), reverse=True)
        search.units.append(found[0])
    return search


# --------------------------------------------------------------------------------------------
# Rewriting


def _remove_unit(proto: onnx.ModelProto, unit: _Unit) -> tuple[onnx.ModelProto, set[str]]:
    """A copy of `proto` with the unit's Add bypassed and its branch (and orphans) deleted, and
    the keys of the nodes that now read the shortcut instead of the sum."""
    proto = copy.deepcopy(proto)
    graph = proto.graph
    nodes = list(graph.node)
    add = next(i for i, n in enumerate(nodes) if n.output and n.output[0] == unit.add_output)
    out, shortcut = unit.add_output, unit.shortcut
    outputs = {o.name for o in graph.output}
    if out in outputs or any(out in _captures(n) for n in nodes):
        # Keep the value name: readers we cannot rename (graph outputs, subgraphs) still see it.
        nodes[add] = helper.make_node("Identity", [shortcut], [out], name=nodes[add].name)
        rewired = {out}
    else:
        rewired = set()
        for node in nodes:
            for k, name in enumerate(node.input):
                if name == out:
                    node.input[k] = shortcut
                    rewired.add(_key(node))
        del nodes[add]

    # Delete what no longer feeds anything, among the branch's nodes only (pre-existing dead
    # nodes elsewhere in the graph are left alone).
    candidates = set(unit.keys)
    removed_reads: set[str] = set()
    changed = True
    while changed:
        changed = False
        used = set(outputs)
        for node in nodes:
            used.update(_reads(node))
        keep = []
        for node in nodes:
            if _key(node) in candidates and not any(o in used for o in node.output if o):
                removed_reads.update(_reads(node))
                changed = True
            else:
                keep.append(node)
        nodes = keep
    left = (candidates - unit.shared_ok) & {_key(n) for n in nodes}
    if left:
        raise RuntimeError(f"depth pruning: branch nodes {sorted(left)[:3]} of {unit.name} are still in use")
    del graph.node[:]
    graph.node.extend(nodes)

    used = set(outputs)
    for node in nodes:
        used.update(_reads(node))
    drop = {name for name in removed_reads if name not in used}
    initializers = [t for t in graph.initializer if t.name not in drop]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    inputs = [v for v in graph.input if v.name not in drop]  # initializers listed as inputs (IR < 4)
    del graph.input[:]
    graph.input.extend(inputs)
    defined = {o for n in nodes for o in n.output if o} | {t.name for t in initializers} | {v.name for v in inputs}
    infos = [v for v in graph.value_info if v.name in defined]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    return proto, rewired


def _downstream_batchnorms(proto: onnx.ModelProto, seeds: set[str]) -> list[int]:
    """Indices (topological order) of the inference-mode BatchNorms whose input depends on the
    output of a node in `seeds` (keys of rewired nodes), the seed nodes included."""
    index = _Index(proto.graph)
    reached: set[str] = set()
    found = []
    for i, node in enumerate(index.nodes):
        if _key(node) not in seeds and not any(r in reached for r in _reads(node)):
            continue
        reached.update(o for o in node.output if o)
        if node.op_type != "BatchNormalization" or node.domain not in STANDARD_DOMAINS:
            continue
        training = any(a.name == "training_mode" and a.i for a in node.attribute)
        stats = list(node.input[3:5])
        private = len(stats) == 2 and all(s in index.initializers and index.consumers.get(s) == [i] for s in stats)
        if not training and private and len([o for o in node.output if o]) == 1:
            found.append(i)
    return found


def _recalibrate(proto: onnx.ModelProto, batchnorms: list[int], runner: _Runner) -> onnx.ModelProto:
    """A copy of `proto` whose BatchNorms `batchnorms` (indices, topological order) get running
    mean/var estimated on the runner's data, one at a time, each seeing the earlier ones' new
    statistics (population variance over batch and spatial positions)."""
    proto = copy.deepcopy(proto)
    inits = {t.name: t for t in proto.graph.initializer}
    for i in batchnorms:
        node = proto.graph.node[i]
        x = node.input[0]
        total = squares = None
        count = 0
        for result in runner.run(proto, [x]):
            value = result[x].astype(np.float64)
            axes = tuple(a for a in range(value.ndim) if a != 1)
            s, s2 = value.sum(axis=axes), (value**2).sum(axis=axes)
            total = s if total is None else total + s
            squares = s2 if squares is None else squares + s2
            count += value.size // value.shape[1]
        mean = total / count
        var = np.maximum(squares / count - mean**2, 0.0)
        old_mean, old_var = (numpy_helper.to_array(inits[n]).astype(np.float64).reshape(-1) for n in node.input[3:5])
        # A channel that is constant on the calibration data (e.g. fed only by dead rectifiers)
        # says nothing about its spread; a zero variance would amplify any later deviation by
        # 1/sqrt(epsilon), so such channels keep their trained statistics.
        flat = var <= 1e-6 * float(np.median(var)) + 1e-12
        mean, var = np.where(flat, old_mean, mean), np.where(flat, old_var, var)
        for name, array in ((node.input[3], mean), (node.input[4], var)):
            old = inits[name]
            dtype = helper.tensor_dtype_to_np_dtype(old.data_type)
            old.CopyFrom(numpy_helper.from_array(array.astype(dtype).reshape(tuple(old.dims)), name))
    return proto


# --------------------------------------------------------------------------------------------
# Running the model


class _Runner:
    """Runs a model (plus extra intermediate outputs) on calibration data in onnxruntime."""

    def __init__(self, proto: onnx.ModelProto, calibration: dict[str, np.ndarray] | np.ndarray) -> None:
        initializers = {t.name for t in proto.graph.initializer}
        inputs = [v for v in proto.graph.input if v.name not in initializers]
        if not isinstance(calibration, dict):
            if len(inputs) != 1:
                raise UsageError(None, f"a bare calibration array needs a model with one input, this one has {len(inputs)}")
            calibration = {inputs[0].name: calibration}
        fixed = 0
        data = {}
        for info in inputs:
            elem = info.type.tensor_type.elem_type
            dtype = helper.tensor_dtype_to_np_dtype(elem) if elem else np.dtype(np.float32)
            if info.name not in calibration:
                raise UsageError(None, f"calibration data has no array for the model input '{info.name}'")
            rows = np.asarray(calibration[info.name]).astype(dtype, copy=False)
            dims = list(info.type.tensor_type.shape.dim)
            if dims and rows.ndim != len(dims):
                raise UsageError(None, f"calibration data has {rows.ndim} dimensions, the model input {len(dims)}")
            if dims and dims[0].HasField("dim_value"):
                fixed = fixed or dims[0].dim_value
            data[info.name] = rows
        self.fixed = fixed
        self.chunk = self.fixed or _CHUNK
        count = len(next(iter(data.values())))
        usable = (count // self.chunk) * self.chunk if self.fixed else count
        if usable == 0:
            raise UsageError(None, f"depth pruning needs at least {self.chunk} calibration samples")
        self.data = {name: rows[:usable] for name, rows in data.items()}
        self.output_names = [o.name for o in proto.graph.output]

    def __len__(self) -> int:
        return len(next(iter(self.data.values())))

    def subset(self, start: int, stop: int) -> _Runner:
        other = copy.copy(self)
        other.data = {name: rows[start:stop] for name, rows in self.data.items()}
        return other

    def chunks(self) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self), self.chunk):
            yield {name: rows[start : start + self.chunk] for name, rows in self.data.items()}

    @staticmethod
    def session(proto: onnx.ModelProto, threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def run(self, proto: onnx.ModelProto, extra: Iterable[str] = ()) -> Iterator[dict[str, np.ndarray]]:
        """Per chunk of data: the model outputs plus the `extra` intermediate values."""
        proto = _with_outputs(proto, extra)
        session = self.session(proto)
        names = [o.name for o in proto.graph.output]
        for batch in self.chunks():
            yield dict(zip(names, session.run(names, batch)))

    def outputs(self, proto: onnx.ModelProto) -> list[np.ndarray]:
        """The model outputs over all data: per-sample outputs concatenated along the batch,
        outputs that are not per sample (no batch axis) stacked per chunk."""
        parts: dict[str, list[np.ndarray]] = defaultdict(list)
        sizes = []
        for batch, result in zip(self.chunks(), self.run(proto)):
            sizes.append(len(next(iter(batch.values()))))
            for name in self.output_names:
                parts[name].append(np.asarray(result[name]))
        joined = []
        for name in self.output_names:
            arrays = parts[name]
            per_sample = all(a.ndim >= 1 and a.shape[0] == n for a, n in zip(arrays, sizes))
            same = all(a.shape == arrays[0].shape for a in arrays)
            joined.append(np.concatenate(arrays) if per_sample else np.stack(arrays) if same else np.concatenate([a.reshape(-1) for a in arrays]))
        return joined


def _with_outputs(proto: onnx.ModelProto, extra: Iterable[str]) -> onnx.ModelProto:
    present = {o.name for o in proto.graph.output}
    extra = [e for e in dict.fromkeys(extra) if e not in present]
    if not extra:
        return proto
    proto = copy.deepcopy(proto)
    infos = {v.name: v for v in proto.graph.value_info}
    for name in extra:
        proto.graph.output.append(copy.deepcopy(infos[name]) if name in infos else onnx.ValueInfoProto(name=name))
    return proto


def _distortion(reference: list[np.ndarray], outputs: list[np.ndarray]) -> float:
    """Mean KL(softmax(reference) || softmax(outputs)) for [N, classes] outputs, MSE relative to
    the reference's mean square for other float outputs, mismatch rate otherwise; summed."""
    total = 0.0
    for ref, out in zip(reference, outputs):
        if ref.shape != out.shape:
            return float("inf")
        if not np.issubdtype(ref.dtype, np.floating):
            total += float(np.mean(ref != out))
            continue
        ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
        if ref.ndim == 2 and ref.shape[1] > 1:
            log_p = ref64 - ref64.max(axis=1, keepdims=True)
            log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
            log_q = out64 - out64.max(axis=1, keepdims=True)
            log_q -= np.log(np.exp(log_q).sum(axis=1, keepdims=True))
            total += float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=1)))
        else:
            total += float(np.mean((ref64 - out64) ** 2) / (np.mean(ref64**2) + _EPS))
    return max(total, 0.0) if math.isfinite(total) else float("inf")


def _binary_entropy(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return np.nan_to_num(h, nan=0.0)


class _Evaluator:
    """Output distortion of a pruned graph against the original, with and without BatchNorm
    re-estimation. Re-estimation is judged by 2-fold cross-validation (fit the statistics on one
    half of the calibration data, measure on the other, and the other way round) so that the
    ranking does not favour units with many downstream BatchNorms just because more statistics
    were fitted to the very samples they are judged on."""

    def __init__(self, original: onnx.ModelProto, calibration: dict[str, np.ndarray] | np.ndarray) -> None:
        self.runner = _Runner(original, calibration)
        self.reference = self.runner.outputs(original)
        n, chunk = len(self.runner), self.runner.chunk
        half = (n // 2 // chunk) * chunk if self.runner.fixed else n // 2
        self.folds: list[tuple[_Runner, list[np.ndarray]]] = []
        if half >= max(_MIN_FOLD, self.runner.fixed):
            for start in (0, half):
                fold = self.runner.subset(start, start + half)
                self.folds.append((fold, fold.outputs(original)))

    def cost(self, proto: onnx.ModelProto, seeds: set[str]) -> tuple[float, float, int]:
        """(distortion as is, cross-validated distortion after re-estimating the BatchNorms
        downstream of `seeds` (nan if there are none or too many), number of those BatchNorms)."""
        bypass = _distortion(self.reference, self.runner.outputs(proto))
        batchnorms = _downstream_batchnorms(proto, seeds)
        if not batchnorms or len(batchnorms) > _MAX_BN_RECALIBRATION or len(self.folds) != 2:
            return bypass, float("nan"), len(batchnorms)
        held_out = []
        for (fit, _), (judge, reference) in (self.folds, self.folds[::-1]):
            held_out.append(_distortion(reference, judge.outputs(_recalibrate(proto, batchnorms, fit))))
        return bypass, float(np.mean(held_out)), len(batchnorms)


def _measure(
    proto: onnx.ModelProto, units: list[_Unit], evaluator: _Evaluator, seeds: set[str]
) -> tuple[list[_Unit], dict[str, str]]:
    """Fill in entropy and distortion of every unit (on top of the removals in `proto`, whose
    rewired nodes are `seeds`). Units whose run-time shapes differ or whose bypassed graph does not
    run are returned separately as {Add output: reason}."""
    failures: dict[str, str] = {}
    pre = sorted({value for unit in units for value, _ in unit.rectifiers})
    kinks = {value: kink for unit in units for value, kink in unit.rectifiers}
    checks = [
        v for unit in units if unit.runtime_shape_check for v in (unit.add_output, unit.branch_output, unit.shortcut)
    ]
    active: dict[str, np.ndarray] = {}
    seen_shapes: dict[str, tuple[int, ...]] = {}
    runner = evaluator.runner
    for result in runner.run(proto, pre + checks):
        for value in pre:
            on = (np.atleast_1d(result[value]) > kinks[value]).sum(axis=0, dtype=np.int64)
            active[value] = active[value] + on if value in active else on
        for value in checks:
            seen_shapes[value] = result[value].shape
    n = len(runner)
    layer_entropy = {value: float(np.mean(_binary_entropy(counts / n))) for value, counts in active.items()}

    kept = []
    for unit in units:
        if unit.runtime_shape_check:
            seen = {seen_shapes.get(v) for v in (unit.add_output, unit.branch_output, unit.shortcut)}
            if len(seen) != 1:
                failures[unit.add_output] = "branch, shortcut and sum differ in shape at run time"
                continue
        unit.entropy = float(np.mean([layer_entropy[v] for v, _ in unit.rectifiers])) if unit.rectifiers else 0.0
        try:
            pruned, rewired = _remove_unit(proto, unit)
            unit.bypass, unit.refit, unit.batchnorms = evaluator.cost(pruned, seeds | rewired)
        except Exception as err:  # noqa: BLE001 - a bypass onnxruntime rejects is not a removable unit
            failures[unit.add_output] = f"the bypassed graph does not run ({' '.join(str(err).split())[:200]})"
            continue
        if math.isfinite(unit.distortion):
            kept.append(unit)
        else:
            failures[unit.add_output] = "bypassing it changes the output shape"
    return kept, failures


# --------------------------------------------------------------------------------------------
# Entry point


def _parameters(model: Model) -> tuple[int, int]:
    """(float parameters of roles weight/non-weight, how many of them are zero)."""
    total = zeros = 0
    for tensor in model.tensors:
        if tensor.role in (TensorRole.WEIGHT, TensorRole.NONWEIGHT) and tensor.is_float:
            total += tensor.array.size
            zeros += int(np.count_nonzero(tensor.array == 0))
    return total, zeros


def _unit_note(unit: _Unit) -> str:
    refit = f"{unit.refit:.5f} ({unit.batchnorms} BN)" if math.isfinite(unit.refit) else "-"
    return (
        f"{unit.name}: {len(unit.nodes)} nodes, {unit.parameters} params, {len(unit.rectifiers)} rectifiers;"
        f" entropy {unit.entropy:.4f} bit; distortion bypassed {unit.bypass:.5f}, with BN re-estimation {refit};"
        f" score {unit.score:.5f}"
    )


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


def prune_depth_onnx(model: Model, config: PruneConfig) -> tuple[Model, PruneReport]:
    """Remove the round(sparsity x units) least important residual branches of an ONNX model."""
    if config.calibration is None:
        raise UsageError(None, "depth pruning needs calibration data (--calib)")
    before, zeros_before = _parameters(model)
    report = PruneReport("depth", before, before, zeros_before)
    original = onnx_format.to_proto(model)
    search = _find_units(original)
    report.skipped.extend(search.skipped)
    if not search.units:
        what = "the graph has no Add nodes" if search.adds == 0 else f"none of its {search.adds} Add node(s) qualifies"
        report.notes.append(f"no removable units (residual branches): {what}; model unchanged")
        return model, report

    evaluator = _Evaluator(original, calibration_rows(config.calibration))
    current, seeds = original, set()
    units, failures = _measure(current, search.units, evaluator, seeds)
    report.skipped.extend(f"{u.name}: {failures[u.add_output]}" for u in search.units if u.add_output in failures)
    if not units:
        report.notes.append("no removable units (residual branches): none survives the run-time checks; model unchanged")
        return model, report
    initial = {unit.add_output: unit for unit in units}
    target = min(_round_half_up(config.sparsity * len(units)), len(units))
    report.notes.append(
        f"{len(units)} removable unit(s); removing {target} = round({config.sparsity:g} x {len(units)});"
        f" score = distortion x (1 + {_ENTROPY_WEIGHT:g} x entropy), distortion = output KL divergence (softmax"
        " of [N, classes] outputs; relative MSE for others) vs. the original, the lower of bypassed and bypassed"
        " with downstream BatchNorms re-estimated (2-fold cross-validated); lowest score removed first"
    )
    report.notes.extend("unit " + _unit_note(unit) for unit in sorted(units, key=lambda u: u.score))

    removed: list[_Unit] = []
    while len(removed) < target and units:
        best = min(units, key=lambda u: (u.score, u.entropy, u.add_output))
        current, rewired = _remove_unit(current, best)
        seeds |= rewired
        removed.append(best)
        report.notes.append(f"step {len(removed)}: removed {best.name} (score {best.score:.5f} as measured then)")
        if len(removed) < target:
            units, _ = _measure(current, _find_units(current).units, evaluator, seeds)
            report.notes.extend(f"  re-measured {_unit_note(unit)}" for unit in sorted(units, key=lambda u: u.score))

    gone = {unit.add_output for unit in removed}
    for key, unit in initial.items():
        report.layers.append(LayerChange(unit.name, 1, 0 if key in gone else 1))
    # Units that only became removable after an earlier removal (e.g. an outside reader went away).
    report.layers.extend(LayerChange(u.name, 1, 0) for u in removed if u.add_output not in initial)
    if not removed:
        report.notes.append("sparsity selects no unit; model unchanged")
        return model, report

    bypass, refit, count = evaluator.cost(current, seeds)
    final = bypass
    if refit < bypass:
        current = _recalibrate(current, _downstream_batchnorms(current, seeds), evaluator.runner)  # fit on all
        final = _distortion(evaluator.reference, evaluator.runner.outputs(current))
        report.notes.append(
            f"BatchNorm re-estimation of {count} downstream layer(s) kept: distortion {bypass:.5f} -> {refit:.5f} (held out)"
        )
    elif count:
        report.notes.append(
            f"BatchNorm re-estimation of {count} downstream layer(s) discarded: distortion {refit:.5f} (held out) >= {bypass:.5f}"
        )
    report.notes.append(f"output distortion of the pruned model vs. the original on the calibration data: {final:.5f}")

    onnx.checker.check_model(current, full_check=True)
    pruned = onnx_format.from_proto(current, model.metadata)
    report.parameters_after, report.zeros_after = _parameters(pruned)
    return pruned, report


__all__ = ["prune_depth_onnx"]
