"""Data-driven channel importance for structured pruning of ONNX graphs.

The channel analysis of structured pruning yields `MaskSite`s: a channel group (name, size C) and
the ONNX values whose axis 1 carries its C channels, such that multiplying every listed value by a
per-channel 0/1 mask emulates removing those channels. This module measures, on calibration
inputs, how much each channel matters:

* `MaskedRunner` - one onnxruntime session over a copy of the model in which every site's values
  are multiplied by a mask graph input, so any combination of channel masks is evaluated without
  rebuilding the session. Masks may also be given per sample ([B, C]), which is how many
  coalitions are evaluated in one call (calibration copies stacked along the batch axis).
* `activation_importance` - mean |activation| per channel.
* `shapley_importance` - each channel's Shapley value within its site, estimated by (antithetic,
  truncated) permutation sampling.
* `sensitivity_allocation` - how many channels each site loses, from measured distortion curves.

Value function. The game of a site is v(S) = -D(S), where D(S) is the distortion of the network's
first output when only the channels in S are kept (all other sites unmasked): by default the mean
squared error of the output (the logits) against the unpruned model's output on the calibration
data, averaged over samples and output elements (metric="mse"). metric="kl" uses instead the mean
KL divergence KL(softmax(reference) || softmax(pruned)) over the last axis. MSE is the default
because it needs no assumption that the output is a vector of class logits. v(all) = 0, so the
Shapley values of a site sum to v(all) - v(empty) = D(empty).

Evaluation cost. For each site a "suffix" session is built holding only the nodes that depend on
the site's mask; the values entering it from the rest of the graph are computed once (for the
stacked calibration copies) and fed to every call, so coalitions of late layers cost only the
late layers. Models with a fixed batch size or with control flow fall back to the full session.
"""
from __future__ import annotations

import heapq
import zlib
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from ..graph.onnx_util import subgraphs
from ..inputs import ModelInputs

__all__ = [
    "MaskSite",
    "MaskedRunner",
    "activation_importance",
    "shapley_importance",
    "sensitivity_allocation",
]

# Samples per onnxruntime call when coalitions are stacked (calibration copies x coalitions).
MAX_BATCH_SAMPLES = 4096
# Model inputs as rows along the batch axis, by input name (what every run here feeds).
Rows = dict[str, np.ndarray]
METRICS = ("mse", "kl")
DEFAULT_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class MaskSite:
    """A prunable channel group: `size` channels on axis 1 of each value in `values`."""

    name: str
    size: int
    values: list[str]


# --------------------------------------------------------------------------------------------
# The masked model


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Replace `old` by `new` wherever a node of `graph` (or of its subgraphs) reads it."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for sub in subgraphs(node):
            _rename_uses(sub, old, new)


class _Namer:
    def __init__(self, graph: onnx.GraphProto):
        self.taken = {v.name for v in (*graph.input, *graph.output, *graph.value_info, *graph.initializer)}
        for node in graph.node:
            self.taken.update(node.input)
            self.taken.update(node.output)

    def __call__(self, hint: str) -> str:
        name, i = hint, 0
        while name in self.taken:
            i += 1
            name = f"{hint}_{i}"
        self.taken.add(name)
        return name


def _value_types(proto: onnx.ModelProto) -> dict[str, tuple[int, int | None]]:
    """value name -> (elem_type, rank or None), from shape inference where it succeeds."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - custom ops etc.: fall back to what the file states
        inferred = proto
    out: dict[str, tuple[int, int | None]] = {}
    g = inferred.graph
    for vi in (*g.value_info, *g.input, *g.output):
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type"):
            out[vi.name] = (tt.elem_type, len(tt.shape.dim) if tt.HasField("shape") else None)
    for init in g.initializer:
        out[init.name] = (init.data_type, len(init.dims))
    return out


class MaskedRunner:
    """One onnxruntime session over a copy of the model in which each site's values are
    multiplied by a per-site mask graph input (float32 [B, C], B = 1 or the batch size; reshaped
    to [B, C, 1, ...] and broadcast inside the graph), so any combination of channel masks can be
    evaluated without rebuilding the session. All consumers of a masked value (incl. graph
    outputs) read the masked version.

    `run(inputs, masks, extra_outputs)` returns the first graph output, then the extra outputs
    (value names of the original graph; a masked value is returned masked). `masks` maps site
    names to [C] (one mask for the whole batch) or [len(inputs), C] (one mask per sample); sites
    not given are all ones.

    With all-ones masks the output is bit-identical to the original model's under
    ORT_ENABLE_EXTENDED optimization; under the default ORT_ENABLE_ALL (about 3x faster here) the
    NCHWc layout pass treats the inserted Mul nodes differently, which changes results by float
    rounding (~1e-7 relative). The estimators compare against this runner's own all-ones output.
    """

    def __init__(self, proto: onnx.ModelProto, sites: list[MaskSite], threads: int = 1, *,
                 optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        self.sites = list(sites)
        self.threads = threads
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise ValueError("mask sites must have distinct names")
        graph = proto.graph
        initializers = {i.name for i in graph.initializer}
        real_inputs = [i for i in graph.input if i.name not in initializers]
        if not real_inputs:
            raise ValueError("MaskedRunner needs a model with at least one input")
        if not graph.output:
            raise ValueError("the model has no output")
        self.input_names = [i.name for i in real_inputs]
        self.input_name = real_inputs[0].name
        self.output_name = graph.output[0].name
        dims = real_inputs[0].type.tensor_type.shape.dim
        self.fixed_batch = dims[0].dim_value if dims and dims[0].HasField("dim_value") else None
        self.input_dtype = helper.tensor_dtype_to_np_dtype(real_inputs[0].type.tensor_type.elem_type or TensorProto.FLOAT)
        self.input_dtypes = {
            i.name: helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type or TensorProto.FLOAT) for i in real_inputs
        }

        self.proto = self._build(proto)
        self._types = _value_types(self.proto)
        self._options = ort.SessionOptions()
        self._options.intra_op_num_threads = threads
        self._options.inter_op_num_threads = 1
        self._options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._options.graph_optimization_level = optimization
        self._options.log_severity_level = 3
        self._sessions: dict[tuple[str, ...], ort.InferenceSession] = {}
        self._suffixes: dict[str, _Suffix | None] = {}
        self._ones = {s.name: np.ones((1, s.size), np.float32) for s in self.sites}
        self.calls = 0  # onnxruntime calls made so far (all sessions)
        self._session(())

    # -- building --------------------------------------------------------------------------

    def _build(self, original: onnx.ModelProto) -> onnx.ModelProto:
        proto = onnx.ModelProto()
        proto.CopyFrom(original)
        graph = proto.graph
        types = _value_types(proto)
        fresh = _Namer(graph)
        producers: dict[str, tuple[int, int]] = {}
        for ni, node in enumerate(graph.node):
            for oi, name in enumerate(node.output):
                if name:
                    producers[name] = (ni, oi)
        graph_inputs = {i.name for i in graph.input}
        initializers = {i.name: i for i in graph.initializer}

        self.mask_inputs: dict[str, str] = {}
        head: list[onnx.NodeProto] = []  # nodes that go first (mask reshapes, masks of inputs)
        after: dict[int, list[onnx.NodeProto]] = {}  # producer node index -> nodes that follow it
        reshaped: dict[tuple[str, int | None, int], str] = {}
        new_inputs: list[onnx.ValueInfoProto] = []
        masked_by: dict[str, tuple[onnx.NodeProto, list]] = {}

        for site in self.sites:
            if site.size < 1:
                raise ValueError(f"site {site.name!r} has no channels")
            if not site.values:
                raise ValueError(f"site {site.name!r} lists no values")
            mask = fresh(f"nnc_mask/{site.name}")
            self.mask_inputs[site.name] = mask
            new_inputs.append(helper.make_tensor_value_info(mask, TensorProto.FLOAT, ["mask_batch", site.size]))
            for value in site.values:
                if value not in producers and value not in graph_inputs and value not in initializers:
                    raise ValueError(f"site {site.name!r}: no value {value!r} in the graph")
                elem, rank = types.get(value, (TensorProto.FLOAT, None))
                elem = elem or TensorProto.FLOAT
                if rank is not None and rank < 2:
                    raise ValueError(f"site {site.name!r}: value {value!r} has rank {rank}, needs axis 1")
                is_input = value in graph_inputs and value not in masked_by
                raw = value if is_input else fresh(f"{value}/nnc_unmasked")
                nodes: list[onnx.NodeProto] = []
                key = (mask, rank, elem)
                if rank is not None and key in reshaped:
                    factor = reshaped[key]
                else:
                    factor = self._mask_factor(graph, fresh, mask, site.size, rank, elem, raw, head, nodes)
                    if rank is not None:
                        reshaped[key] = factor
                mul_name = fresh(f"{value}/nnc_mask_mul")
                if value in masked_by:  # masked by an earlier site too: multiply once more
                    prev, where = masked_by[value]
                    out = prev.output[0]
                    prev.output[0] = raw
                elif value in producers:
                    ni, oi = producers[value]
                    graph.node[ni].output[oi] = raw
                    where, out = after.setdefault(ni, []), value
                elif is_input:
                    # a model input keeps its name: its readers are pointed at the masked copy
                    if any(o.name == value for o in graph.output):
                        raise ValueError(f"site {site.name!r}: value {value!r} is both a model input and output")
                    out = fresh(f"{value}/nnc_masked")
                    _rename_uses(graph, value, out)
                    where = head
                else:
                    initializers[value].name = raw
                    where, out = head, value
                where.extend(nodes)
                mul = helper.make_node("Mul", [raw, factor], [out], name=mul_name)
                where.append(mul)
                masked_by[value] = (mul, where)

        # Producer entries rewritten above point at Mul nodes now; rebuild the node list in order.
        nodes = list(head)
        for ni, node in enumerate(graph.node):
            nodes.append(node)
            nodes.extend(after.get(ni, []))
        del graph.node[:]
        graph.node.extend(nodes)
        graph.input.extend(new_inputs)
        return proto

    @staticmethod
    def _mask_factor(graph, fresh, mask, size, rank, elem, raw, head, nodes) -> str:
        """Nodes turning mask [B, C] into a factor broadcastable against a value of `rank`."""
        factor = fresh(f"{mask}/r{rank}")
        if rank is not None:
            shape = fresh(f"{mask}/shape{rank}")
            graph.initializer.append(numpy_helper.from_array(np.array([-1, size] + [1] * (rank - 2), np.int64), shape))
            out_nodes = head
            reshape_in = [mask, shape]
        else:  # rank unknown before running: build [-1, C, 1, ...] from the value's own shape
            out_nodes = nodes
            lead = fresh(f"{mask}/lead")
            two = fresh(f"{mask}/two")
            graph.initializer.append(numpy_helper.from_array(np.array([-1, size], np.int64), lead))
            graph.initializer.append(numpy_helper.from_array(np.array([2], np.int64), two))
            shp, rnk, rest, ones, shape = (fresh(f"{raw}/{s}") for s in ("shape", "rank", "rest", "ones", "target"))
            nodes += [
                helper.make_node("Shape", [raw], [shp]),
                helper.make_node("Shape", [shp], [rnk]),
                helper.make_node("Sub", [rnk, two], [rest]),
                helper.make_node("ConstantOfShape", [rest], [ones], value=helper.make_tensor("one", TensorProto.INT64, [1], [1])),
                helper.make_node("Concat", [lead, ones], [shape], axis=0),
            ]
            reshape_in = [mask, shape]
        if elem == TensorProto.FLOAT:
            out_nodes.append(helper.make_node("Reshape", reshape_in, [factor]))
        else:
            flat = fresh(f"{factor}/f32")
            out_nodes.append(helper.make_node("Reshape", reshape_in, [flat]))
            out_nodes.append(helper.make_node("Cast", [flat], [factor], to=elem))
        return factor

    def _session(self, extra: tuple[str, ...]) -> ort.InferenceSession:
        key = tuple(dict.fromkeys(e for e in extra if e != self.output_name and e not in {o.name for o in self.proto.graph.output}))
        session = self._sessions.get(key)
        if session is None:
            proto = self.proto
            if key:
                proto = onnx.ModelProto()
                proto.CopyFrom(self.proto)
                for name in key:
                    if name not in self._types:
                        known = {o for n in proto.graph.node for o in n.output} | {i.name for i in proto.graph.initializer}
                        if name not in known:
                            raise ValueError(f"no value {name!r} in the graph")
                    elem = self._types.get(name, (TensorProto.FLOAT, None))[0] or TensorProto.FLOAT
                    proto.graph.output.append(helper.make_tensor_value_info(name, elem, None))
            session = ort.InferenceSession(proto.SerializeToString(), self._options, providers=["CPUExecutionProvider"])
            self._sessions[key] = session
        return session

    def _mask_feeds(self, masks: dict[str, np.ndarray] | None, batch: int) -> dict[str, np.ndarray]:
        feeds = {}
        masks = masks or {}
        unknown = set(masks) - set(self._ones)
        if unknown:
            raise ValueError(f"unknown mask sites: {', '.join(sorted(unknown))}")
        for site in self.sites:
            m = masks.get(site.name)
            if m is None:
                m = self._ones[site.name]
            else:
                m = np.asarray(m, np.float32)
                if m.ndim == 1:
                    m = m[None, :]
                if m.ndim != 2 or m.shape[1] != site.size or m.shape[0] not in (1, batch):
                    raise ValueError(f"mask of site {site.name!r} must be [{site.size}] or [{batch}, {site.size}], got {m.shape}")
            feeds[self.mask_inputs[site.name]] = np.ascontiguousarray(m)
        return feeds

    # -- running ---------------------------------------------------------------------------

    def rows(self, inputs: Rows | np.ndarray | ModelInputs) -> Rows:
        """Inputs as rows by input name in the model's dtypes: a bare array is the one input's."""
        if isinstance(inputs, ModelInputs):
            if not inputs.in_rows:
                raise ValueError("data-driven pruning needs inputs laid out in rows along the batch axis")
            inputs = inputs.arrays
        elif not isinstance(inputs, dict):
            inputs = {self.input_name: inputs}
        return {n: np.asarray(a, self.input_dtypes.get(n, a.dtype)) for n, a in inputs.items()}

    def run(self, inputs: Rows | np.ndarray | ModelInputs, masks: dict[str, np.ndarray] | None = None,
            extra_outputs: Iterable[str] = ()) -> list[np.ndarray]:
        """First graph output, then `extra_outputs`, for `inputs` (rows by input name, or one
        input's array) under `masks`."""
        inputs = self.rows(inputs)
        n = _count(inputs)
        extra = tuple(extra_outputs)
        names = [self.output_name, *extra]
        session = self._session(extra)
        feeds = self._mask_feeds(masks, n)
        b = self.fixed_batch
        if b is None or n == b:
            self.calls += 1
            return session.run(names, {**inputs, **feeds})
        # fixed batch size: run in chunks of b (the last one padded), slicing per-sample masks
        parts: list[list[np.ndarray]] = []
        for start in range(0, n, b):
            chunk = _slice(inputs, start, start + b)
            pad = b - _count(chunk)
            if pad:
                chunk = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in chunk.items()}
            cf = {}
            for k, m in feeds.items():
                if m.shape[0] == n and n != 1:
                    m = m[start : start + b]
                    if pad:
                        m = np.concatenate([m, np.repeat(m[-1:], pad, axis=0)])
                cf[k] = m
            self.calls += 1
            out = session.run(names, {**chunk, **cf})
            parts.append([o[: b - pad] for o in out])
        return [np.concatenate([p[i] for p in parts]) for i in range(len(names))]

    # -- suffix sessions (private: used by the estimators) ------------------------------------

    def _suffix(self, site_name: str) -> _Suffix | None | bool:
        """Session holding only the nodes downstream of a site's mask; False if the output does
        not depend on the site; None if no suffix can be cut (then use the full session)."""
        if site_name in self._suffixes:
            return self._suffixes[site_name]
        result = self._cut_suffix(site_name)
        self._suffixes[site_name] = result
        return result

    def _cut_suffix(self, site_name: str):
        if self.fixed_batch is not None:
            return None
        graph = self.proto.graph
        if any(True for n in graph.node for _ in subgraphs(n)) or self.proto.functions:
            return None
        mask = self.mask_inputs[site_name]
        mask_names = set(self.mask_inputs.values())
        # other sites' masks are fixed (ones) here: nodes reading only them count as constants
        const = {i.name for i in graph.initializer} | (mask_names - {mask})
        const_nodes: dict[str, onnx.NodeProto] = {}
        tainted = {mask}
        suffix_nodes = []
        for node in graph.node:
            dyn = [i for i in node.input if i and i not in const]
            if not dyn:
                const.update(o for o in node.output if o)
                for o in node.output:
                    const_nodes[o] = node
            elif any(i in tainted for i in dyn):
                suffix_nodes.append(node)
                tainted.update(o for o in node.output if o)
        if self.output_name not in tainted:
            return False
        produced = set(tainted)
        boundary: list[str] = []
        masks_used: list[str] = []
        needed_const: set[str] = set()
        for node in suffix_nodes:
            for i in node.input:
                if i in mask_names:
                    if i not in masks_used:
                        masks_used.append(i)
                elif not i or i in produced:
                    continue
                elif i in const and i not in mask_names:
                    needed_const.add(i)
                elif i not in boundary:
                    boundary.append(i)
        # constant-producing nodes the suffix reads, transitively
        const_list: list[onnx.NodeProto] = []
        stack = [c for c in needed_const if c in const_nodes]
        seen_nodes: set[int] = set()
        init_names = {i.name for i in graph.initializer}
        needed_inits = {c for c in needed_const if c in init_names}
        while stack:
            node = const_nodes[stack.pop()]
            if id(node) in seen_nodes:
                continue
            seen_nodes.add(id(node))
            const_list.append(node)
            for i in node.input:
                if i in const_nodes:
                    stack.append(i)
                elif i in init_names:
                    needed_inits.add(i)
                elif i in mask_names and i not in masks_used:
                    masks_used.append(i)
        order = {id(n): k for k, n in enumerate(graph.node)}
        const_list.sort(key=lambda n: order[id(n)])
        # the model input itself may enter the suffix directly: feed it rather than fetching it
        inputs = []
        for name in boundary:
            elem = self._types.get(name, (TensorProto.FLOAT, None))[0] or TensorProto.FLOAT
            inputs.append(helper.make_tensor_value_info(name, elem, None))
        mask_vis = {i.name: i for i in graph.input}
        sub = helper.make_graph(
            const_list + suffix_nodes,
            f"{graph.name}_suffix",
            inputs + [mask_vis[m] for m in masks_used],
            [graph.output[0]],
            [i for i in graph.initializer if i.name in needed_inits],
        )
        model = helper.make_model(sub, opset_imports=list(self.proto.opset_import))
        model.ir_version = self.proto.ir_version
        session = ort.InferenceSession(model.SerializeToString(), self._options, providers=["CPUExecutionProvider"])
        site_of_mask = {v: k for k, v in self.mask_inputs.items()}
        return _Suffix(session, boundary, [site_of_mask[m] for m in masks_used], mask)


@dataclass
class _Suffix:
    session: ort.InferenceSession
    boundary: list[str]  # values computed by the rest of the graph, fed to the suffix
    sites: list[str]  # sites whose masks the suffix reads (incl. its own)
    mask: str  # the mask input of the site the suffix belongs to


# --------------------------------------------------------------------------------------------
# Distortion of coalitions


def _distortion(out: np.ndarray, ref: np.ndarray, metric: str) -> np.ndarray:
    """out [G, N, ...] vs ref [N, ...] -> distortion per group [G]."""
    g = out.shape[0]
    if metric == "mse":
        d = out.astype(np.float64) - ref.astype(np.float64)[None]
        return (d * d).reshape(g, -1).mean(axis=1)
    ref64 = ref.astype(np.float64)
    logp = ref64 - ref64.max(axis=-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=-1, keepdims=True))
    out64 = out.astype(np.float64)
    logq = out64 - out64.max(axis=-1, keepdims=True)
    logq -= np.log(np.exp(logq).sum(axis=-1, keepdims=True))
    kl = (np.exp(logp)[None] * (logp[None] - logq)).sum(axis=-1)
    return kl.reshape(g, -1).mean(axis=1)


class _Coalitions:
    """Distortion D(mask) of one site's channel masks (other sites unmasked), several masks
    per onnxruntime call: calibration copies stacked on the batch axis, one mask per sample."""

    def __init__(self, runner: MaskedRunner, site: MaskSite, calibration: Rows | np.ndarray | ModelInputs, ref: np.ndarray,
                 metric: str, max_batch: int = MAX_BATCH_SAMPLES):
        self.runner, self.site, self.ref, self.metric = runner, site, ref, metric
        self.calib = runner.rows(calibration)
        self.n = _count(self.calib)
        self.group = 1 if runner.fixed_batch is not None else max(1, max_batch // self.n)
        self.suffix = runner._suffix(site.name)
        self.evaluated = 0
        self._feeds: dict[str, np.ndarray] | None = None
        self._feeds_g = 0

    def _prefix_feeds(self, g: int) -> dict[str, np.ndarray]:
        """Values entering the suffix, for g stacked calibration copies (computed once per g)."""
        if self._feeds is None or self._feeds_g != g:
            stacked = _tile(self.calib, g)
            fetch = [b for b in self.suffix.boundary if b not in stacked]
            outs = self.runner.run(stacked, extra_outputs=fetch)[1:] if fetch else []
            feeds = dict(zip(fetch, outs))
            feeds.update({name: rows for name, rows in stacked.items() if name in self.suffix.boundary})
            for s in self.suffix.sites:
                if s != self.site.name:
                    feeds[self.runner.mask_inputs[s]] = self.runner._ones[s]
            self._feeds, self._feeds_g = feeds, g
        return self._feeds

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        masks = np.asarray(masks, np.float32).reshape(-1, self.site.size)
        k = len(masks)
        if self.suffix is False:
            return np.zeros(k)
        self.evaluated += k
        out = np.empty(k)
        g = min(self.group, k)
        for start in range(0, k, g):
            chunk = masks[start : start + g]
            real = len(chunk)
            if real < g:  # pad to the stacked size the prefix values were computed for
                chunk = np.concatenate([chunk, np.ones((g - real, self.site.size), np.float32)])
            per_sample = np.repeat(chunk, self.n, axis=0) if g > 1 or self.n == 1 else chunk
            if self.suffix is None:
                y = self.runner.run(_tile(self.calib, g), {self.site.name: per_sample})[0]
            else:
                feeds = dict(self._prefix_feeds(g))
                feeds[self.suffix.mask] = per_sample
                self.runner.calls += 1
                y = self.suffix.session.run([self.runner.output_name], feeds)[0]
            y = y.reshape((g, self.n) + y.shape[1:])[:real]
            out[start : start + real] = _distortion(y, self.ref, self.metric)
        return out


def _count(rows: Rows) -> int:
    return len(next(iter(rows.values())))


def _slice(rows: Rows, start: int, stop: int) -> Rows:
    return {k: v[start:stop] for k, v in rows.items()}


def _tile(rows: Rows, copies: int) -> Rows:
    """`copies` copies of every input's rows, one after the other along the batch axis."""
    return {k: np.tile(v, (copies,) + (1,) * (v.ndim - 1)) for k, v in rows.items()}


def _reference(runner: MaskedRunner, calibration: Rows | np.ndarray | ModelInputs) -> np.ndarray:
    return runner.run(calibration)[0]


def _check(sites: list[MaskSite], calibration: Rows | np.ndarray | ModelInputs, metric: str = "mse") -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}")
    if len(calibration) == 0:
        raise ValueError("calibration data is empty")


# --------------------------------------------------------------------------------------------
# Importance measures


def activation_importance(proto: onnx.ModelProto, sites: list[MaskSite], calibration: Rows | np.ndarray | ModelInputs,
                          *, threads: int = 1, batch: int = 1024) -> dict[str, np.ndarray]:
    """Per site: mean |activation| per channel (over samples and all positions) of each of the
    site's values, summed over the values. Higher = more important."""
    _check(sites, calibration)
    runner = MaskedRunner(proto, sites, threads)
    values = list(dict.fromkeys(v for s in sites for v in s.values))
    sums = {v: None for v in values}
    counts = dict.fromkeys(values, 0)
    rows = runner.rows(calibration)
    for start in range(0, len(calibration), batch):
        outs = runner.run(_slice(rows, start, start + batch), extra_outputs=values)[1:]
        for v, a in zip(values, outs):
            axes = tuple(i for i in range(a.ndim) if i != 1)
            s = np.abs(a).sum(axis=axes, dtype=np.float64)
            sums[v] = s if sums[v] is None else sums[v] + s
            counts[v] += a.size // a.shape[1]
    result = {}
    for site in sites:
        total = np.zeros(site.size)
        for v in site.values:
            if sums[v].shape != (site.size,):
                raise ValueError(f"site {site.name!r}: value {v!r} has {sums[v].shape[0]} channels, expected {site.size}")
            total += sums[v] / counts[v]
        result[site.name] = total
    return result


def _site_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _shapley_site(coal: _Coalitions, size: int, permutations: int, rng: np.random.Generator,
                  truncation: float, antithetic: bool, min_coalition: int = 0) -> np.ndarray:
    """Permutation-sampling estimate of the Shapley values of one site's channels.

    A permutation is walked as a removal order, from the full set down: D[p, k] is the distortion
    with only the first k channels of permutation p kept, evaluated for k = C-1, C-2, ... (several
    k of several permutations per onnxruntime call). Once the kept coalition is within
    `truncation` * D(empty) of the empty set, the channels still kept get marginal 0."""
    d_empty = float(coal(np.zeros((1, size)))[0])
    if size == 1 or d_empty == 0.0:
        return np.full(size, d_empty)  # one player takes all; or nothing matters
    P = permutations
    perms = np.empty((P, size), np.int64)
    for p in range(P):
        perms[p] = perms[p - 1][::-1] if antithetic and p % 2 == 1 else rng.permutation(size)
    rank = np.argsort(perms, axis=1)  # rank[p, c] = position of channel c in permutation p
    D = np.full((P, size + 1), np.nan)
    D[:, 0], D[:, size] = d_empty, 0.0
    stop = max(1, min(min_coalition, size - 1))  # smallest kept coalition evaluated
    nxt = np.full(P, size - 1, np.int64)  # next prefix length to evaluate, going down
    done = nxt < stop
    eps = truncation * d_empty
    while not done.all():
        act = np.flatnonzero(~done)
        step = max(1, coal.group // len(act))
        ks = [np.arange(nxt[p], max(nxt[p] - step, stop - 1), -1) for p in act]
        rp = np.concatenate([np.full(len(k), p) for p, k in zip(act, ks)])
        rk = np.concatenate(ks)
        D[rp, rk] = coal((rank[rp] < rk[:, None]).astype(np.float32))
        for p, k in zip(act, ks):
            nxt[p] = k[-1] - 1
            if truncation > 0:
                hit = np.flatnonzero(np.abs(D[p, k] - d_empty) <= eps)
                if hit.size:  # as bad as removing everything: the rest add ~0
                    D[p, : k[hit[0]]] = D[p, k[hit[0]]]
                    nxt[p] = 0
            done[p] = nxt[p] < stop
    marginal = D[:, :-1] - D[:, 1:]  # v(S + c) - v(S) for the channel at each position
    if min_coalition <= 1:
        phi = np.zeros(size)
        np.add.at(phi, perms, marginal)
        return phi / P
    # Restricted to kept coalitions of at least `min_coalition` channels: average each channel's
    # marginal over the permutations that reached it; one never reached counts as most important.
    reached = np.arange(size)[None, :] >= stop
    total, count = np.zeros(size), np.zeros(size)
    np.add.at(total, perms[:, stop:], marginal[:, stop:])
    np.add.at(count, perms, reached.repeat(P, axis=0))
    phi = np.where(count > 0, total / np.maximum(count, 1), np.inf)
    return np.where(np.isfinite(phi), phi, np.max(phi[np.isfinite(phi)], initial=d_empty))


def shapley_importance(proto: onnx.ModelProto, sites: list[MaskSite], calibration: Rows | np.ndarray | ModelInputs,
                       permutations: int, seed: int, *, truncation: float = 1e-3, antithetic: bool = True,
                       metric: str = "mse", threads: int = 1, stats: dict | None = None,
                       min_kept_fraction: float = 0.0) -> dict[str, np.ndarray]:
    """Per site: each channel's Shapley value in the game v(S) = -D(S) of keeping only the
    channels S of that site (other sites unmasked), D = distortion of the first output vs the
    unpruned model (`metric`, see the module doc). Estimated from `permutations` permutations
    per site (seeded per site name; with `antithetic` the odd ones are the reversals of the even
    ones). Each permutation is walked as a removal order from the full set and truncated once the
    remaining coalition's distortion is within `truncation` * D(empty) of the empty set's (the
    channels still kept then get marginal 0). Values sum to D(empty) = v(all) - v(empty) (within
    `truncation` * D(empty)). Higher = more important.

    With `min_kept_fraction` f > 0 the value is restricted to kept coalitions of at least
    f * C channels (each permutation's removal walk stops there): pruning only ever decides
    among coalitions near the size it keeps, and marginals measured in nearly empty layers
    (which dominate the plain Shapley average) rank channels badly for that decision.

    `stats`, if given, receives the number of coalitions evaluated and onnxruntime calls."""
    _check(sites, calibration, metric)
    if permutations < 1:
        raise ValueError("permutations must be at least 1")
    runner = MaskedRunner(proto, sites, threads)
    ref = _reference(runner, calibration)
    result, evaluated = {}, 0
    for site in sites:
        coal = _Coalitions(runner, site, calibration, ref, metric)
        min_coalition = int(np.floor(min_kept_fraction * site.size))
        result[site.name] = _shapley_site(coal, site.size, permutations, _site_rng(seed, site.name), truncation,
                                          antithetic, min_coalition)
        evaluated += coal.evaluated
    if stats is not None:
        stats.update(coalitions=evaluated, calls=runner.calls)
    return result


# --------------------------------------------------------------------------------------------
# Allocation


def _lower_hull(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower convex hull of points sorted by x."""
    hx, hy = [], []
    for px, py in zip(x, y):
        while len(hx) >= 2 and (hy[-1] - hy[-2]) * (px - hx[-2]) >= (py - hy[-2]) * (hx[-1] - hx[-2]):
            hx.pop()
            hy.pop()
        hx.append(px)
        hy.append(py)
    return np.array(hx, float), np.array(hy, float)


def sensitivity_allocation(proto: onnx.ModelProto, sites: list[MaskSite], scores: dict[str, np.ndarray],
                           calibration: Rows | np.ndarray | ModelInputs, sparsity: float, *, fractions: Iterable[float] = DEFAULT_FRACTIONS,
                           channel_params: dict[str, float] | None = None, metric: str = "mse", threads: int = 1,
                           curves: dict | None = None) -> dict[str, int]:
    """How many channels to remove from each site so that round(sparsity * total channels) are
    removed in all, keeping at least one channel per site.

    Each site's distortion curve D_s(k) (its k lowest-scoring channels masked, the others sites
    unmasked) is measured at k = round(f * C) for f in `fractions` and at k = C - 1, made monotone
    and convex (lower hull; D_s(0) = 0) and interpolated; then channels are removed one at a time
    from the site whose next removal increases distortion least - per channel, or per parameter
    if `channel_params` gives the parameters one channel of each site carries. `curves`, if
    given, receives {site: (k measured, D measured)}."""
    _check(sites, calibration, metric)
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError("sparsity must lie in [0, 1]")
    total = sum(s.size for s in sites)
    target = round(sparsity * total)
    capacity = sum(s.size - 1 for s in sites)
    if target > capacity:
        raise ValueError(f"cannot remove {target} of {total} channels while keeping one per site (at most {capacity})")
    alloc = {s.name: 0 for s in sites}
    if target == 0:
        return alloc
    runner = MaskedRunner(proto, sites, threads)
    ref = _reference(runner, calibration)
    fr = np.asarray(list(fractions), float)
    dist: dict[str, np.ndarray] = {}
    for site in sites:
        C = site.size
        if C == 1:
            dist[site.name] = np.zeros(1)
            continue
        sc = np.asarray(scores[site.name], float)
        if sc.shape != (C,):
            raise ValueError(f"scores of site {site.name!r} must have shape ({C},)")
        order = np.argsort(sc, kind="stable")
        ks = np.unique(np.concatenate([np.clip(np.round(fr * C), 1, C - 1), [C - 1]]).astype(np.int64))
        rank = np.empty(C, np.int64)
        rank[order] = np.arange(C)
        masks = (rank[None, :] >= ks[:, None]).astype(np.float32)  # the k lowest-scoring masked
        d = _Coalitions(runner, site, calibration, ref, metric)(masks)
        if curves is not None:
            curves[site.name] = (ks.copy(), d.copy())
        x = np.concatenate([[0], ks]).astype(float)
        y = np.maximum.accumulate(np.concatenate([[0.0], np.maximum(d, 0.0)]))
        hx, hy = _lower_hull(x, y)
        dist[site.name] = np.interp(np.arange(C), hx, hy)  # D_s(k), k = 0 .. C-1
    weight = {s.name: float((channel_params or {}).get(s.name, 1.0)) or 1.0 for s in sites}
    heap = []
    for i, site in enumerate(sites):
        if site.size > 1:
            c = dist[site.name]
            heapq.heappush(heap, ((c[1] - c[0]) / weight[site.name], i))
    for _ in range(target):
        _, i = heapq.heappop(heap)
        site = sites[i]
        r = alloc[site.name] = alloc[site.name] + 1
        if r < site.size - 1:
            c = dist[site.name]
            heapq.heappush(heap, ((c[r + 1] - c[r]) / weight[site.name], i))
    return alloc
