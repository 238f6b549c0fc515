"""How each tensor of an ONNX model may be coded, and why: one pass over the graph of values.

The role of an extracted tensor follows its *data* to the ops that really consume it, not just
the op next door. Exporters read weights through views: torch.onnx reorders LSTM gates with a
`Slice` per gate and a `Concat`, inside `If` branches; tf2onnx transposes and reshapes kernels.
So the analysis follows each tensor through the view ops (`VIEW_OPS`, data inputs only), across
subgraph boundaries (outer-scope values read in bodies, `If` branch outputs to the `If` outputs),
to its *real uses*, and then decides (first rule that applies wins):

1. not a float tensor: EXACT (integers, bools: indices, counters, masks);
2. its value reaches a steering input (`STEERING_SLOTS`: shapes, indices, trip counts, branch
   conditions), through any chain of ops (backward taint; `SHAPE_ONLY_OPS` stop it): EXACT;
3. a real use that is no learned-parameter slot (a graph output, a Softmax, a `Div` denominator,
   a `Pow` exponent, a `Max` bound, ...): EXACT;
4. an elementwise use (`Add`/`Sub`/`Mul`, `Div` numerator) whose result feeds a sensitive op
   (`SENSITIVE_SLOTS`: denominators, Sqrt/Log/Pow/Exp/Reciprocal, comparisons, Min/Max/Clip,
   `Where` conditions) right away (e.g. eps -> Add -> Sqrt): EXACT - unless the other operand
   is the output of a learned layer (then it is that layer's bias or scale, see below);
5. tiny: 1 element used elementwise, or at most `TINY_ELEMENTS` used elementwise on something
   that is no learned layer's output: EXACT (epsilons, the 1/N of a mean, GELU's 0.5 and
   0.044715, temperatures, RGB means);
6. otherwise the tensor is learned: WEIGHT if it has at least 2 axes and more than
   `TINY_ELEMENTS` values and either every use is a weight slot (Conv/Gemm/MatMul/Einsum/LSTM/
   GRU/RNN weights, Gather tables) or two of its axes are longer than 1 (a positional embedding
   added to activations); NONWEIGHT otherwise: biases, scales and norm parameters (`BIAS_SLOTS`,
   elementwise uses) with at most one axis longer than 1 (a [1, 512, 1] scale is 1-D), and tiny
   or 1-D weights;
7. except a WEIGHT read by a layer whose result becomes a magnitude or a logarithm (`Sqrt` or
   `Log` of it, reached through views, `Abs`, `Neg`, `Pow`, sums, floors (`Max`, `Clip`) and
   arithmetic among such results and constants: re^2 + im^2 -> Sqrt), or through another
   linear layer that reads its square (log(|STFT|^2 @ mel)): a filterbank (an STFT or CQT basis
   as a Conv, a mel matrix), NONWEIGHT.

Why tiny tensors used elementwise are exact, but a 1-element bias of a 1-output Conv or Gemm is
not: a slot such as Conv's B or Gemm's C says "learned bias" whatever its size, while a handful
of values added or multiplied somewhere is as often an exporter's constant (an epsilon, 1/N,
sqrt(2/pi), a temperature, a normalisation mean) whose error the graph may amplify without
bound (eps -> Sqrt -> Reciprocal). A scalar used elementwise is exact even after a learned layer
(q @ Wq * 0.125 scales attention). The bound 8 covers the constants of the model kinds we see
(scalars, RGB(A) triples, box coordinates, 2-8 strides or anchors) and stays below every channel
count of a learned layer; coding 8 float32 values exactly costs at most ~30 bytes more than lossy.

Why a filterbank takes the fine step: its rounding error leaks the energy of the loud bands into
the quiet ones, and the magnitude (or log) downstream reads quiet bands as loudly as loud ones, so
the error is amplified by the spectral range of real signals (speech, music: 40-60 dB) - which
white-noise probes, flat in spectrum, do not show. Its RMS says nothing about its effect, as for
the NONWEIGHT parameters, and it is one layer: silero-vad's STFT basis at the weight step alone
takes its streamed speech probabilities to 31 dB, 16 QP finer to 48 dB, for 7 % more bytes;
basic-pitch's CQT at QP -38 goes from 19.8 to 30.7 dB output SNR for 32 % more (a 29 KB stream).

Every decision carries a short reason (`RoleDecision.reason`), e.g. ``weight: Slice -> Concat ->
Unsqueeze -> LSTM W in If/else/If/then``, ``exact: reaches Sqrt (Add -> Sqrt)``, ``exact: 1
element``, ``exact: feeds Reshape shape``, ``nonweight: bias of Conv``. Decisions depend on the
graph, the tensors' dtypes and shapes only, never on their values, so `nnc info` recomputes them
from a bitstream's stored topology with the same function the encoder used.

This module sees a `ValueGraph` (built by `onnx_format` while it names the tensors) and nothing
of the ModelProto, so the naming stays in one place and the role rules in another.
"""
from __future__ import annotations

import math
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from ..model import FLOAT_DTYPES, TensorRole

ValueKey = tuple[int, str]  # (scope id, value name): names are only unique within a scope

# At most this many values used elementwise make a constant, not a learned bias or scale (see above).
TINY_ELEMENTS = 8

# Ops whose data input reaches their output unchanged in value (only rearranged, selected,
# concatenated or cast): a weight read through them is still a weight. Data inputs: 0, any for Concat.
VIEW_OPS = frozenset(
    {"Slice", "Split", "Gather", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Cast", "Concat", "Identity"}
)
# Followed as well when checking whether an elementwise result feeds a sensitive op.
_SENSITIVE_PASS = VIEW_OPS | {"Expand", "Tile"}

# Input slots of learned weights -> slot label for the reasons.
WEIGHT_SLOTS: dict[str, dict[int, str]] = {
    "Conv": {1: "W"},
    "ConvTranspose": {1: "W"},
    "Gemm": {0: "A", 1: "B"},
    "MatMul": {0: "A", 1: "B"},
    "LSTM": {1: "W", 2: "R"},
    "GRU": {1: "W", 2: "R"},
    "RNN": {1: "W", 2: "R"},
}
# Input slots of learned biases, scales and norm parameters.
BIAS_SLOTS: dict[str, dict[int, str]] = {
    "Conv": {2: "B"},
    "ConvTranspose": {2: "B"},
    "Gemm": {2: "C"},
    "LSTM": {3: "B", 7: "P"},  # the peephole weights P are per-channel vectors
    "GRU": {3: "B"},
    "RNN": {3: "B"},
    "BatchNormalization": {1: "scale", 2: "bias", 3: "mean", 4: "var"},
    "InstanceNormalization": {1: "scale", 2: "B"},
    "LayerNormalization": {1: "scale", 2: "B"},
    "GroupNormalization": {1: "scale", 2: "bias"},
    "PRelu": {1: "slope"},
}
_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div"})  # Div: the numerator only (input 0)
# Outputs of these carry a learned layer's result; a constant added to or multiplied with such a
# value (directly, through views or other elementwise arithmetic) is that layer's bias or scale.
_LEARNED_LAYERS = frozenset(set(WEIGHT_SLOTS) | set(BIAS_SLOTS) | {"Einsum"}) - {"PRelu"}
# Linear layers that can be a filterbank, the ops a magnitude is computed with, and its end.
_FILTER_LAYERS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
_MAGNITUDE_OPS = _ELEMENTWISE | {"Pow", "Abs", "Neg", "ReduceSum", "ReduceSumSquare", "Max", "Clip"}
_MAGNITUDE_ENDS = frozenset({"Sqrt", "Log"})
# What a norm divides by passes through these first (x / max(sqrt(sum x^2), eps)).
_DIVISOR_PASS = VIEW_OPS | {"Add", "Max", "Clip", "Expand"}

# Input slots where a small error is amplified without bound or flips a decision; `None`: all inputs.
SENSITIVE_SLOTS: dict[str, frozenset[int] | None] = {
    "Div": frozenset({1}),
    "Sqrt": None,
    "Reciprocal": None,
    "Log": None,
    "Exp": None,
    "Pow": None,
    "Less": None,
    "LessOrEqual": None,
    "Greater": None,
    "GreaterOrEqual": None,
    "Equal": None,
    "Min": None,
    "Max": None,
    "Clip": None,
    "Where": frozenset({0}),
    "Floor": None,
    "Ceil": None,
    "Round": None,
    "Sign": None,
    "Mod": None,
}

# Input slots whose *values* decide shapes, indices, trip counts or branches. Anything that can
# reach them, through any chain of ops, must be coded exactly: a tiny error there changes the
# graph's behaviour, not just its numbers. `None` means every input.
STEERING_SLOTS: dict[str, frozenset[int] | None] = {
    "Reshape": frozenset({1}),
    "Resize": frozenset({1, 2, 3}),
    "Upsample": frozenset({1}),
    "Expand": frozenset({1}),
    "Tile": frozenset({1}),
    "Range": None,
    "Slice": frozenset({1, 2, 3, 4}),
    "Pad": frozenset({1, 2, 3}),
    "Clip": frozenset({1, 2}),
    "ConstantOfShape": frozenset({0}),
    "TopK": frozenset({1}),
    "OneHot": frozenset({1}),
    "Squeeze": frozenset({1}),
    "Unsqueeze": frozenset({1}),
    "Split": frozenset({1}),
    "CumSum": frozenset({1}),
    "NonMaxSuppression": frozenset({2, 3, 4}),
    "Loop": frozenset({0, 1}),
    "If": frozenset({0}),
    # Less common ops whose inputs set output sizes, positions or counts for the same reason.
    "Trilu": frozenset({1}),
    "Compress": frozenset({1}),
    "CenterCropPad": frozenset({1}),
    "Col2Im": frozenset({1, 2}),
    "MaxUnpool": frozenset({2}),
    "AffineGrid": frozenset({1}),
    "DFT": frozenset({1, 2}),
    "STFT": frozenset({1, 3}),
    "SplitToSequence": frozenset({1}),
    "SequenceAt": frozenset({1}),
    "SequenceInsert": frozenset({2}),
    "SequenceErase": frozenset({1}),
    "HannWindow": frozenset({0}),
    "HammingWindow": frozenset({0}),
    "BlackmanWindow": frozenset({0}),
    "MelWeightMatrix": None,
}

# Ops whose outputs depend only on their input's shape, never on its values. Taint must stop
# here, or the ubiquitous Shape -> Gather -> Concat -> Reshape pattern of exporters would mark
# every weight upstream of a flatten as exact.
SHAPE_ONLY_OPS = frozenset({"Shape", "Size", "EyeLike", "RandomNormalLike", "RandomUniformLike"})

# Input names for the reasons ("feeds Reshape shape"); other slots are called "input N".
_INPUT_NAMES: dict[str, tuple[str, ...]] = {
    "Reshape": ("data", "shape"),
    "Resize": ("X", "roi", "scales", "sizes"),
    "Upsample": ("X", "scales"),
    "Expand": ("input", "shape"),
    "Tile": ("input", "repeats"),
    "Slice": ("data", "starts", "ends", "axes", "steps"),
    "Pad": ("data", "pads", "constant value", "axes"),
    "Clip": ("input", "min", "max"),
    "ConstantOfShape": ("shape",),
    "TopK": ("X", "K"),
    "OneHot": ("indices", "depth", "values"),
    "Squeeze": ("data", "axes"),
    "Unsqueeze": ("data", "axes"),
    "Split": ("input", "split"),
    "CumSum": ("x", "axis"),
    "Loop": ("trip count", "condition"),
    "If": ("condition",),
    "Div": ("numerator", "denominator"),
    "Pow": ("base", "exponent"),
    "Where": ("condition", "X", "Y"),
    "Gather": ("data", "indices"),
}


class RoleDecision(NamedTuple):
    role: TensorRole
    reason: str


@dataclass
class GraphNode:
    """One node as the analysis needs it; `op` is domain-qualified outside the standard domains."""

    op: str
    standard: bool
    inputs: list[ValueKey | None]
    outputs: list[ValueKey | None]
    where: str  # the subgraph holding the node, "" for the main graph, e.g. "If/else/If/then"
    num_scan_inputs: int = -1  # Scan only


@dataclass
class GraphBody:
    """A graph-valued attribute of `node` (index into ValueGraph.nodes) and its formal values."""

    node: int
    inputs: list[ValueKey]
    outputs: list[ValueKey]


@dataclass
class TensorInfo:
    """An extracted tensor as the rules see it: the value it defines, its dtype name and shape."""

    key: ValueKey
    dtype: str | None  # None: not a dtype the pipeline handles
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass
class ValueGraph:
    """Nodes of the main graph and every subgraph, with values keyed across scopes."""

    nodes: list[GraphNode] = field(default_factory=list)
    bodies: list[GraphBody] = field(default_factory=list)
    outputs: list[ValueKey] = field(default_factory=list)  # the main graph's outputs


def _label(op: str, slot: int) -> str:
    names = _INPUT_NAMES.get(op, ())
    return f"{op} {names[slot]}" if slot < len(names) else f"{op} input {slot}"


def _in_slots(table: dict[str, frozenset[int] | None], op: str, slot: int) -> bool:
    if op not in table:
        return False
    allowed = table[op]
    return allowed is None or slot in allowed


def _is_steering(op: str, slot: int) -> bool:
    if op not in STEERING_SLOTS:
        return op.startswith("Reduce") and slot == 1  # the axes input of every Reduce* op
    return _in_slots(STEERING_SLOTS, op, slot)


def _present(keys: list[ValueKey | None], index: int) -> list[ValueKey]:
    """The key at `index` as a 0- or 1-element list (optional inputs may be absent or empty)."""
    key = keys[index] if index < len(keys) else None
    return [] if key is None else [key]


def _control_flow_deps(
    node: GraphNode, body_ins: list[ValueKey], body_outs: list[ValueKey]
) -> tuple[list[list[ValueKey]], list[list[ValueKey]]] | None:
    """Per-position dependencies (of body inputs, of node outputs) for If/Loop/Scan.

    Knowing which body output feeds which node output keeps taint from a shape computed off
    one loop-carried value from spilling onto every weight used in the body. Returns None when
    the arity does not match the op's contract, so the caller falls back to all-to-all.
    """
    ins, outs = node.inputs, node.outputs
    if not node.standard:
        return None
    if node.op == "If":
        if body_ins or len(body_outs) != len(outs):
            return None
        return [], [[b] for b in body_outs]
    if node.op == "Loop":
        # node (M, cond, v...) -> (v_final..., scan...); body (iter, cond, v...) -> (cond, v..., scan...)
        n_carried = len(ins) - 2
        if n_carried < 0 or len(body_ins) != n_carried + 2 or len(body_outs) != len(outs) + 1:
            return None
        body_in_deps = [_present(ins, 0), _present(ins, 1) + [body_outs[0]]]
        body_in_deps += [_present(ins, 2 + i) + [body_outs[1 + i]] for i in range(n_carried)]
        # Zero iterations return the initial values, hence the dependency on the node input too.
        out_deps = [[body_outs[1 + i]] + _present(ins, 2 + i) for i in range(n_carried)]
        out_deps += [[b] for b in body_outs[1 + n_carried :]]
        return body_in_deps, out_deps
    if node.op == "Scan":
        # node (state..., scan_in...) -> (state_final..., scan_out...); the body mirrors it by position
        n_scan = node.num_scan_inputs
        n_state = len(ins) - n_scan
        if n_scan < 0 or n_state < 0 or len(body_ins) != len(ins) or len(body_outs) != len(outs):
            return None
        body_in_deps = [_present(ins, j) + (body_outs[j : j + 1] if j < n_state else []) for j in range(len(ins))]
        out_deps = [[body_outs[j]] + (_present(ins, j) if j < n_state else []) for j in range(len(outs))]
        return body_in_deps, out_deps
    return None


class _Use(NamedTuple):
    """A real use of a tensor: node `node` reads it at input `slot` after the views in `path`."""

    node: int  # -1: a graph output
    slot: int
    path: tuple[str, ...]


class _Analysis:
    """The graph of values with the indexes every decision needs (built once per model)."""

    def __init__(self, graph: ValueGraph, tensors: list[TensorInfo]) -> None:
        self.graph = graph
        self.uses: dict[ValueKey, list[tuple[int, int]]] = defaultdict(list)
        self.producer: dict[ValueKey, int] = {}
        for index, node in enumerate(graph.nodes):
            for slot, key in enumerate(node.inputs):
                if key is not None:
                    self.uses[key].append((index, slot))
            for key in node.outputs:
                if key is not None:
                    self.producer[key] = index
        # Body output -> (node, output position) for If branches, whose outputs are the node's.
        self.branch_outputs: dict[ValueKey, list[tuple[int, int]]] = defaultdict(list)
        self.body_outputs: set[ValueKey] = set()
        for body in graph.bodies:
            node = graph.nodes[body.node]
            for position, key in enumerate(body.outputs):
                self.body_outputs.add(key)
                if node.standard and node.op == "If" and position < len(node.outputs):
                    self.branch_outputs[key].append((body.node, position))
        self.graph_outputs = set(graph.outputs)
        self.constants = {t.key for t in tensors}
        self._constant_cache: dict[ValueKey, bool] = {}
        self.taint = self._taint()
        self.learned_output = self._learned_outputs()
        self.filterbanks = self._filterbanks()

    def _taint(self) -> dict[ValueKey, str]:
        """Every value that can reach a steering slot -> that slot's label (first found)."""
        deps: dict[ValueKey, list[ValueKey]] = defaultdict(list)
        seeds: list[tuple[ValueKey, str]] = []
        for node in self.graph.nodes:
            real_ins = [k for k in node.inputs if k is not None]
            for slot, key in enumerate(node.inputs):
                if key is not None and node.standard and _is_steering(node.op, slot):
                    seeds.append((key, _label(node.op, slot)))
            if not (node.standard and node.op in SHAPE_ONLY_OPS):
                for out in node.outputs:
                    if out is not None:
                        deps[out].extend(real_ins)
        for body in self.graph.bodies:
            node = self.graph.nodes[body.node]
            mapped = _control_flow_deps(node, body.inputs, body.outputs)
            if mapped is None:
                # Unknown contract: every body input may carry every node input and every
                # body output may reach every node output.
                real_ins = [k for k in node.inputs if k is not None]
                body_in_deps = [real_ins + body.outputs for _ in body.inputs]
                out_deps = [body.outputs for _ in node.outputs]
            else:
                body_in_deps, out_deps = mapped
            for key, found in zip(body.inputs, body_in_deps):
                deps[key].extend(found)
            for out, found in zip(node.outputs, out_deps):
                if out is not None:
                    deps[out].extend(found)
            if node.standard and node.op == "Loop" and body.outputs:
                seeds.append((body.outputs[0], "Loop condition"))  # the body's "continue" output
        tainted: dict[ValueKey, str] = {}
        for key, label in seeds:
            tainted.setdefault(key, label)
        queue = deque(tainted)
        while queue:
            key = queue.popleft()
            for dep in deps.get(key, ()):
                if dep not in tainted:
                    tainted[dep] = tainted[key]
                    queue.append(dep)
        return tainted

    def _learned_outputs(self) -> dict[ValueKey, str]:
        """Values that carry a learned layer's result -> that layer's op.

        A layer's outputs, what views make of them, and elementwise arithmetic of them with
        constants or with each other (a bias Add, a scale Mul, the sum of two MatMuls); an
        operand computed otherwise (an activation, a reduction, a residual input) stops it.
        Iterated to a fixed point: nodes are in order within each graph, but a subgraph's nodes
        come after the outer nodes that read its results.
        """
        carried: dict[ValueKey, str] = {}
        changed = True
        while changed:
            changed = False
            for node in self.graph.nodes:
                if not node.standard:
                    continue
                source = None
                if node.op in _LEARNED_LAYERS:
                    source = node.op
                elif node.op in VIEW_OPS:
                    data = node.inputs if node.op == "Concat" else node.inputs[:1]
                    source = next((carried[k] for k in data if k is not None and k in carried), None)
                elif node.op in _ELEMENTWISE:
                    operands = [k for k in node.inputs if k is not None]
                    found = [carried[k] for k in operands if k in carried]
                    if found and all(k in carried or self._constant_derived(k) for k in operands):
                        source = found[0]
                if source is None:
                    continue
                for out in node.outputs:
                    if out is not None and out not in carried:
                        carried[out] = source
                        changed = True
        return carried

    def _filterbanks(self) -> dict[int, str]:
        """Linear layers (node index) whose result reaches Sqrt or Log as a magnitude -> that op.

        Carried like `_learned_outputs`, through views, Abs, Pow bases, sums over an axis, floors
        (Max, Clip: log(max(x, eps))) and arithmetic of carried values with each other and
        constants; a Concat carries whatever of it is carried (the other parts are other bands).
        Once squared (Pow, Abs, x * x, ReduceSumSquare) it is a power spectrum, and a linear layer
        reading it carries it on (log(|STFT|^2 @ mel): the mel matrix is a filterbank too); before,
        a linear layer starts afresh, so Conv -> Clip (ReLU6) -> Conv links no layers. A mean, an
        activation or a residual input stops it, so a LayerNorm (ReduceMean -> Sub -> Pow ->
        ReduceMean -> Sqrt) after a layer is none; nor is an L2 normalisation, whose Sqrt becomes
        a divisor (x / sqrt(sum x^2)).
        """
        origins: dict[ValueKey, frozenset[int]] = {}
        powers: set[ValueKey] = set()  # carried values that have been squared
        found: dict[int, str] = {}
        changed = True
        while changed:
            changed = False
            for index, node in enumerate(self.graph.nodes):
                if not node.standard:
                    continue
                carried: frozenset[int] = frozenset()
                sources: list[ValueKey] = []  # carried inputs whose origins the outputs carry on
                squared = False
                if node.op in _FILTER_LAYERS:
                    carried = frozenset({index})
                    sources = [k for k in node.inputs[:1] if k in powers]
                elif node.op in VIEW_OPS:
                    sources = [k for k in (node.inputs if node.op == "Concat" else node.inputs[:1]) if k in origins]
                elif node.op in _MAGNITUDE_OPS:
                    operands = [k for k in node.inputs if k is not None]
                    if node.op in ("Pow", "Div", "Clip"):  # the base, numerator or value carries; the rest are constants
                        if operands and all(self._constant_derived(k) for k in operands[1:]):
                            sources = [k for k in operands[:1] if k in origins]
                    elif all(k in origins or self._constant_derived(k) for k in operands):
                        sources = [k for k in operands if k in origins]
                    squared = bool(sources) and (
                        node.op in ("Pow", "Abs", "ReduceSumSquare") or (node.op == "Mul" and len(sources) == 2)
                    )
                elif node.op in _MAGNITUDE_ENDS and node.inputs and node.inputs[0] in origins:
                    new = origins[node.inputs[0]] - found.keys()
                    if new and not self._divisor(node):
                        found.update(dict.fromkeys(new, node.op))
                        changed = True
                carried = carried.union(*(origins[k] for k in sources))
                if not carried:
                    continue
                power = squared or any(k in powers for k in sources)
                for out in node.outputs:
                    if out is None:
                        continue
                    if not carried <= origins.get(out, frozenset()):
                        origins[out] = origins.get(out, frozenset()) | carried
                        changed = True
                    if power and out not in powers:
                        powers.add(out)
                        changed = True
        return found

    def _divisor(self, node: GraphNode) -> bool:
        """Whether the result of `node` is what something is divided by (a Div denominator or a
        Reciprocal, through views, an epsilon Add, Max or Clip)."""
        return self._downstream(
            node,
            found=lambda user, slot: (user.op == "Div" and slot == 1) or user.op == "Reciprocal",
            through=lambda user, slot: user.op in _DIVISOR_PASS,
        ) is not None

    def _is_view_input(self, node: GraphNode, slot: int) -> bool:
        if not node.standard or node.op not in VIEW_OPS:
            return False
        if node.op == "Concat":
            return True
        if slot != 0:
            return False
        if node.op == "Gather":
            # Constant indices select fixed rows (a view); data-dependent ones look up a table.
            indices = node.inputs[1] if len(node.inputs) > 1 else None
            return indices is not None and self._constant_derived(indices)
        return True

    def _constant_derived(self, key: ValueKey) -> bool:
        """Whether `key` is an extracted tensor or a view of extracted tensors only."""
        known = self._constant_cache.get(key)
        if known is None:
            known = self._constant_cache[key] = self._trace_constant(key)
        return known

    def _trace_constant(self, key: ValueKey) -> bool:
        seen: set[ValueKey] = set()
        stack = [key]
        while stack:
            key = stack.pop()
            if key in seen:
                continue
            seen.add(key)
            if key in self.constants:
                continue
            index = self.producer.get(key)
            if index is None:
                return False
            node = self.graph.nodes[index]
            if not node.standard or node.op not in VIEW_OPS | {"Constant"}:
                return False
            stack.extend(k for k in node.inputs if k is not None)
        return True

    def real_uses(self, key: ValueKey) -> list[_Use]:
        """The uses of `key` after following it through views and into If outputs."""
        found: list[_Use] = []
        seen: set[ValueKey] = {key}
        stack: list[tuple[ValueKey, tuple[str, ...]]] = [(key, ())]
        while stack:
            value, path = stack.pop()
            if value in self.graph_outputs:
                found.append(_Use(-1, 0, path))
            for node_index, position in self.branch_outputs.get(value, ()):
                out = self.graph.nodes[node_index].outputs[position]
                if out is not None and out not in seen:
                    seen.add(out)
                    stack.append((out, path + ("If",)))
            if value in self.body_outputs and value not in self.branch_outputs:
                found.append(_Use(-2, 0, path))  # carried or scanned out of a Loop/Scan body
            for node_index, slot in sorted(self.uses.get(value, ()), reverse=True):
                node = self.graph.nodes[node_index]
                if self._is_view_input(node, slot):
                    for out in node.outputs:
                        if out is not None and out not in seen:
                            seen.add(out)
                            stack.append((out, path + (node.op,)))
                else:
                    found.append(_Use(node_index, slot, path))
        found.sort(key=lambda use: (use.node < 0, use.node, use.slot))
        return found

    def sensitive_after(self, node_index: int) -> str | None:
        """The sensitive op the result of an elementwise node feeds right away, if any."""
        node = self.graph.nodes[node_index]
        user = self._downstream(
            node,
            found=lambda user, slot: user.standard and _in_slots(SENSITIVE_SLOTS, user.op, slot),
            through=lambda user, slot: user.standard and user.op in _SENSITIVE_PASS and (user.op == "Concat" or slot == 0),
        )
        if user is None:
            return None
        return f"{node.op} -> {user.op}" + (" denominator" if user.op == "Div" else "")

    def _downstream(
        self,
        node: GraphNode,
        found: Callable[[GraphNode, int], bool],
        through: Callable[[GraphNode, int], bool],
    ) -> GraphNode | None:
        """The first node reading the result of `node` (depth first, through the nodes `through`
        accepts) at an input that `found` accepts."""
        stack = [k for k in node.outputs if k is not None]
        seen = set(stack)
        while stack:
            value = stack.pop()
            for index, slot in self.uses.get(value, ()):
                user = self.graph.nodes[index]
                if found(user, slot):
                    return user
                if through(user, slot):
                    for out in user.outputs:
                        if out is not None and out not in seen:
                            seen.add(out)
                            stack.append(out)
        return None

    def other_learned(self, use: _Use) -> str | None:
        """The learned layer whose result the other operand of an elementwise use carries."""
        node = self.graph.nodes[use.node]
        operands = node.inputs[:1] if node.op == "Div" else node.inputs
        for slot, key in enumerate(operands):
            if slot != use.slot and key is not None and key in self.learned_output:
                return self.learned_output[key]
        return None


def _where(analysis: _Analysis, use: _Use) -> str:
    where = analysis.graph.nodes[use.node].where if use.node >= 0 else ""
    return f" in {where}" if where else ""


def _chain(use: _Use, last: str) -> str:
    return " -> ".join((*use.path, last))


class _Learned(NamedTuple):
    """A use in a learned-parameter slot: `kind` weight, bias or elementwise, and its `what`
    (the slot's label, or for elementwise uses the learned layer the other operand carries)."""

    kind: str
    use: _Use
    what: str


def _classify(analysis: _Analysis, use: _Use) -> _Learned | str:
    """The learned-parameter use `use` is, or the reason (text) why it is none."""
    if use.node == -1:
        return _chain(use, "graph output")
    if use.node == -2:
        return _chain(use, "Loop/Scan body output")
    node = analysis.graph.nodes[use.node]
    op, slot = (node.op, use.slot) if node.standard else (node.op, -1)
    if slot in WEIGHT_SLOTS.get(op, {}):
        return _Learned("weight", use, f"{op} {WEIGHT_SLOTS[op][slot]}")
    if op == "Einsum":
        return _Learned("weight", use, "Einsum operand")
    if op == "Gather" and slot == 0:
        return _Learned("weight", use, "Gather table")
    if slot in BIAS_SLOTS.get(op, {}):
        return _Learned("bias", use, f"{op} {BIAS_SLOTS[op][slot]}")
    if op in _ELEMENTWISE and not (op == "Div" and slot == 1):
        return _Learned("elementwise", use, analysis.other_learned(use) or "")
    what = _label(op, slot) if slot >= 0 and op in _INPUT_NAMES else op
    return f"{'' if use.path else 'feeds '}{_chain(use, what)}{_where(analysis, use)}"


def _constant_reason(analysis: _Analysis, tensor: TensorInfo, learned: list[_Learned]) -> str | None:
    """Why a tensor used elementwise is a constant rather than a bias or scale (rules 4 and 5)."""
    elementwise = [u for u in learned if u.kind == "elementwise"]
    for use in elementwise:
        if not use.what:
            sensitive = analysis.sensitive_after(use.use.node)
            if sensitive is not None:
                return f"reaches {sensitive.split(' -> ')[-1]} ({_chain(use.use, sensitive)})"
    plain = any(not use.what for use in elementwise)
    if elementwise and (tensor.size <= 1 or (plain and tensor.size <= TINY_ELEMENTS)):
        count = f"{tensor.size} element" + ("s" if tensor.size != 1 else "")
        return f"{count}, a constant of {analysis.graph.nodes[elementwise[0].use.node].op}"
    return None


def _learned_decision(analysis: _Analysis, tensor: TensorInfo, learned: list[_Learned]) -> RoleDecision:
    long_axes = sum(1 for d in tensor.shape if d > 1)
    weight_like = len(tensor.shape) >= 2 and tensor.size > TINY_ELEMENTS
    all_weight = all(u.kind == "weight" for u in learned)
    role = TensorRole.WEIGHT if weight_like and (all_weight or long_axes >= 2) else TensorRole.NONWEIGHT
    kind, use, what = learned[0]
    magnitude = analysis.filterbanks.get(use.node) if all_weight else None
    if role == TensorRole.WEIGHT and magnitude is not None and all(u.use.node in analysis.filterbanks for u in learned):
        role = TensorRole.NONWEIGHT
        text = _chain(use, f"{what}, a filterbank whose output reaches {magnitude}")
    elif kind == "weight":
        text = _chain(use, what)
    elif kind == "bias":
        op, name = what.split(" ", 1)
        text = _chain(use, f"{'bias' if name in ('B', 'C', 'bias') else name} of {op}")
    else:
        op = analysis.graph.nodes[use.node].op
        noun = "bias" if op in ("Add", "Sub") else "scale"
        text = _chain(use, f"{noun} of {what} ({op})" if what else f"{noun} ({op})")
    more = f" (+{len(learned) - 1} more use{'s' if len(learned) > 2 else ''})" if len(learned) > 1 else ""
    return RoleDecision(role, f"{role.name.lower()}: {text}{_where(analysis, use)}{more}")


def _decide(analysis: _Analysis, tensor: TensorInfo) -> RoleDecision:
    exact = TensorRole.EXACT
    if tensor.dtype not in FLOAT_DTYPES:
        return RoleDecision(exact, f"exact: {tensor.dtype or 'unsupported'} data")
    label = analysis.taint.get(tensor.key)
    if label is not None:
        direct = any(
            analysis.graph.nodes[i].standard and _label(analysis.graph.nodes[i].op, s) == label
            for i, s in analysis.uses.get(tensor.key, ())
        )
        return RoleDecision(exact, f"exact: {'feeds' if direct else 'reaches'} {label}")
    uses = analysis.real_uses(tensor.key)
    if not uses:
        return RoleDecision(exact, "exact: unused")
    learned: list[_Learned] = []
    for use in uses:
        found = _classify(analysis, use)
        if isinstance(found, str):
            return RoleDecision(exact, f"exact: {found}")
        learned.append(found)
    constant = _constant_reason(analysis, tensor, learned)
    if constant is not None:
        return RoleDecision(exact, f"exact: {constant}")
    return _learned_decision(analysis, tensor, learned)


def decide_roles(graph: ValueGraph, tensors: list[TensorInfo]) -> list[RoleDecision]:
    """(role, reason) of each tensor, in order (see the module docstring for the rules)."""
    analysis = _Analysis(graph, tensors)
    return [_decide(analysis, tensor) for tensor in tensors]


__all__ = [
    "BIAS_SLOTS", "SENSITIVE_SLOTS", "STEERING_SLOTS", "TINY_ELEMENTS", "VIEW_OPS", "WEIGHT_SLOTS",
    "GraphBody", "GraphNode", "RoleDecision", "TensorInfo", "ValueGraph", "decide_roles",
]
