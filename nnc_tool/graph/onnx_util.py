"""Small ONNX helpers shared by the graph-rewriting stages (pruning, folding, refitting)."""
from __future__ import annotations

from collections.abc import Iterator

import onnx

# The default ONNX operator domain, under both of its names.
STANDARD_DOMAINS = frozenset({"", "ai.onnx"})


def attributes(node: onnx.NodeProto) -> dict:
    """A node's attributes by name, as Python values."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def topology_proto(topology: bytes) -> onnx.ModelProto:
    """The ModelProto of a Model's stored topology (the graph without its weights)."""
    proto = onnx.ModelProto()
    proto.ParseFromString(topology)
    return proto


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graph-valued attributes of a node (If branches, Loop/Scan bodies)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def name_uses(graph: onnx.GraphProto) -> dict[str, int]:
    """How often each name is read: by the graph's nodes (their subgraphs' nodes included) and
    as a graph output. A weight read once can be rewritten for its one reader."""
    uses: dict[str, int] = {}
    _count_reads(graph, uses)
    for output in graph.output:
        uses[output.name] = uses.get(output.name, 0) + 1
    return uses


def _count_reads(graph: onnx.GraphProto, uses: dict[str, int]) -> None:
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
        for sub in subgraphs(node):
            _count_reads(sub, uses)


def cpu_session(proto: onnx.ModelProto, threads: int = 1, optimization_level=None, initializers: dict | None = None):
    """An onnxruntime CPU session over an in-memory model, quiet and with a fixed thread count.

    `initializers` (name -> array) supply the data of initializers that `proto` declares as
    external (see formats.onnx_format.runtime_proto), so the weights are never serialised.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Fatal only: a failing run raises, and the caller turns that into its one line; onnxruntime's
    # own ERROR log would print a second, coloured copy (a probe the model rejects, for one).
    options.log_severity_level = 4
    if optimization_level is not None:
        options.graph_optimization_level = optimization_level
    if initializers:
        names = list(initializers)
        options.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(initializers[n]) for n in names])
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])

