"""Structured (channel) pruning of ONNX graphs: dependency analysis, physical removal, refit."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from nnc_tool.formats import onnx_format
from nnc_tool.graph.onnx_channels import ChannelGroup, analyse_channels
from nnc_tool.prune.config import PruneConfig
from nnc_tool.prune.structured import (
    allocate,
    channel_scores,
    choose_channels,
    prune_structured_onnx,
    remove_channels,
    weight_parameter_count,
)

OPSET = 17


# ---- helpers ---------------------------------------------------------------------------------------
def _session(proto: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = _session(proto)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _accuracy(proto: onnx.ModelProto, data: tuple[np.ndarray, np.ndarray]) -> float:
    x, y = data
    return float(np.mean(_run(proto, x).argmax(axis=1) == y) * 100)


def _structured(sparsity: float = 0.5, **kwargs) -> PruneConfig:
    """Exact channel counts (channel_multiple=1) unless a test asks for rounding."""
    kwargs.setdefault("channel_multiple", 1)
    return PruneConfig(method="structured", sparsity=sparsity, **kwargs)


def _check_valid(proto: onnx.ModelProto, shape: tuple[int, ...] = (1, 8, 8)) -> None:
    """Passes the full checker and runs at batch 1 and 32 with finite outputs."""
    onnx.checker.check_model(proto, full_check=True)
    rng = np.random.default_rng(0)
    for batch in (1, 32):
        out = _run(proto, rng.random((batch, *shape), dtype=np.float32))
        assert out.shape[0] == batch and np.all(np.isfinite(out))


def _groups_by_name(proto: onnx.ModelProto) -> dict[str, ChannelGroup]:
    return {g.name: g for g in analyse_channels(proto)}


def _masked(proto: onnx.ModelProto, group: ChannelGroup, removed: np.ndarray) -> onnx.ModelProto:
    """`proto` with the group's mask values multiplied by a 0/1 channel mask (the emulated removal)."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    del graph.value_info[:]
    ranks = {}
    inferred = onnx.shape_inference.infer_shapes(proto)
    for value in list(inferred.graph.value_info) + list(inferred.graph.input):
        ranks[value.name] = len(value.type.tensor_type.shape.dim)
    nodes = list(graph.node)
    for value in group.mask_values:
        mask = np.ones(group.size, np.float32)
        mask[removed] = 0
        mask = mask.reshape((1, group.size) + (1,) * (ranks[value] - 2))
        const, masked = f"{value}__mask", f"{value}__masked"
        graph.initializer.append(numpy_helper.from_array(mask, const))
        for node in nodes:
            for i, name in enumerate(node.input):
                if name == value:
                    node.input[i] = masked
        position = next((i for i, n in enumerate(nodes) if value in n.output), -1) + 1
        nodes.insert(position, helper.make_node("Mul", [value, const], [masked]))
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def _prune_groups(proto: onnx.ModelProto, fraction: float = 0.5, seed: int = 0, masked_only: bool = False):
    """Remove a random `fraction` of every prunable group; returns (groups, removal, pruned, kept)."""
    groups = analyse_channels(proto)
    rng = np.random.default_rng(seed)
    removal = {}
    for group in groups:
        if group.prunable and (group.mask_values or not masked_only):
            count = max(1, min(group.size - 1, int(round(fraction * group.size))))
            removal[group.name] = np.sort(rng.choice(group.size, count, replace=False))
    pruned, kept = remove_channels(proto, groups, removal)
    return groups, removal, pruned, kept


def _assert_emulation_exact(proto: onnx.ModelProto, shape: tuple[int, ...]) -> None:
    """Physically removing channels == masking each group's mask values in the original."""
    _check_valid(_prune_groups(proto)[2], shape)
    groups, removal, pruned, _ = _prune_groups(proto, masked_only=True)
    assert removal
    masked = proto
    for group in groups:
        if group.name in removal:
            masked = _masked(masked, group, removal[group.name])
    x = np.random.default_rng(1).random((4, *shape), dtype=np.float32)
    np.testing.assert_allclose(_run(pruned, x), _run(masked, x), rtol=1e-4, atol=1e-4)


# ---- small graphs built with onnx.helper -------------------------------------------------------------
_RNG = np.random.default_rng(42)


def _w(name: str, *shape: int, scale: float = 0.3) -> onnx.TensorProto:
    return numpy_helper.from_array((_RNG.standard_normal(shape) * scale).astype(np.float32), name)


def _bn(prefix: str, channels: int) -> list[onnx.TensorProto]:
    return [
        numpy_helper.from_array((1 + 0.2 * _RNG.standard_normal(channels)).astype(np.float32), f"{prefix}.scale"),
        numpy_helper.from_array((0.1 * _RNG.standard_normal(channels)).astype(np.float32), f"{prefix}.bias"),
        numpy_helper.from_array((0.1 * _RNG.standard_normal(channels)).astype(np.float32), f"{prefix}.mean"),
        numpy_helper.from_array((0.5 + _RNG.random(channels)).astype(np.float32), f"{prefix}.var"),
    ]


def _bn_node(prefix: str, x: str, y: str) -> onnx.NodeProto:
    return helper.make_node(
        "BatchNormalization",
        [x, f"{prefix}.scale", f"{prefix}.bias", f"{prefix}.mean", f"{prefix}.var"],
        [y],
        name=prefix,
    )


def _graph_model(nodes, inits, channels: int = 3, out: int = 10) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _head(x: str, channels: int) -> tuple[list, list]:
    """GlobalAveragePool -> Flatten -> Gemm(10)."""
    nodes = [
        helper.make_node("GlobalAveragePool", [x], ["head.pool"]),
        helper.make_node("Flatten", ["head.pool"], ["head.flat"], axis=1),
        helper.make_node("Gemm", ["head.flat", "head.w", "head.b"], ["y"], transB=1, name="head"),
    ]
    return nodes, [_w("head.w", 10, channels), _w("head.b", 10, scale=0.1)]


def concat_model() -> onnx.ModelProto:
    """Two conv branches concatenated on channels, BN over the concatenation, a conv reading it."""
    nodes = [
        helper.make_node("Conv", ["x", "a.w", "a.b"], ["a"], pads=[1, 1, 1, 1], name="a"),
        helper.make_node("Relu", ["a"], ["a.r"]),
        helper.make_node("Conv", ["x", "b.w"], ["b"], pads=[1, 1, 1, 1], name="b"),
        helper.make_node("LeakyRelu", ["b"], ["b.r"], alpha=0.1),
        helper.make_node("Concat", ["a.r", "b.r"], ["cat"], axis=1),
        _bn_node("cat.bn", "cat", "cat.n"),
        helper.make_node("HardSwish", ["cat.n"], ["cat.h"]),
        helper.make_node("Conv", ["cat.h", "c.w"], ["c"], name="c"),
        helper.make_node("Relu", ["c"], ["c.r"]),
    ]
    head_nodes, head_inits = _head("c.r", 6)
    inits = [_w("a.w", 8, 3, 3, 3), _w("a.b", 8), _w("b.w", 4, 3, 3, 3), *_bn("cat.bn", 12), _w("c.w", 6, 12, 1, 1)]
    return _graph_model(nodes + head_nodes, inits + head_inits)


def grouped_model() -> onnx.ModelProto:
    """A grouped conv (2 groups of 4) and a depthwise conv with channel multiplier 2."""
    nodes = [
        helper.make_node("Conv", ["x", "a.w"], ["a"], pads=[1, 1, 1, 1], name="a"),
        helper.make_node("Relu", ["a"], ["a.r"]),
        helper.make_node("Conv", ["a.r", "g.w", "g.b"], ["g"], pads=[1, 1, 1, 1], group=2, name="g"),
        helper.make_node("Clip", ["g", "lo", "hi"], ["g.r"]),
        helper.make_node("Conv", ["g.r", "dw.w"], ["dw"], pads=[1, 1, 1, 1], group=8, name="dw"),
        _bn_node("dw.bn", "dw", "dw.n"),
        helper.make_node("Relu", ["dw.n"], ["dw.r"]),
        helper.make_node("Conv", ["dw.r", "pw.w"], ["pw"], name="pw"),
        helper.make_node("Sigmoid", ["pw"], ["pw.r"]),
    ]
    head_nodes, head_inits = _head("pw.r", 6)
    inits = [
        _w("a.w", 8, 3, 3, 3),
        _w("g.w", 8, 4, 3, 3),
        _w("g.b", 8),
        numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
        _w("dw.w", 16, 1, 3, 3),
        *_bn("dw.bn", 16),
        _w("pw.w", 6, 16, 1, 1),
    ]
    return _graph_model(nodes + head_nodes, inits + head_inits)


def reshape_model() -> onnx.ModelProto:
    """Conv -> PRelu -> MaxPool -> Pad -> Resize -> Reshape[-1, C*H*W] -> MatMul + bias -> Gemm."""
    nodes = [
        helper.make_node("Conv", ["x", "a.w", "a.b"], ["a"], pads=[1, 1, 1, 1], name="a"),
        helper.make_node("PRelu", ["a", "a.slope"], ["a.r"]),
        helper.make_node("MaxPool", ["a.r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Pad", ["p", "pads"], ["pp"], mode="constant"),
        helper.make_node("AveragePool", ["pp"], ["ap"], kernel_shape=[3, 3]),
        helper.make_node("Resize", ["ap", "", "scales"], ["up"], mode="nearest"),
        helper.make_node("Dropout", ["up"], ["d"]),
        helper.make_node("Reshape", ["d", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "m.w"], ["m"], name="m"),
        helper.make_node("Add", ["m", "m.b"], ["m.a"]),
        helper.make_node("Tanh", ["m.a"], ["m.r"]),
        helper.make_node("Gemm", ["m.r", "head.w", "head.b"], ["y"], name="head"),
    ]
    inits = [
        _w("a.w", 6, 3, 3, 3),
        _w("a.b", 6),
        numpy_helper.from_array(np.full((6, 1, 1), 0.2, np.float32), "a.slope"),
        numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
        numpy_helper.from_array(np.array([1.0, 1.0, 2.0, 2.0], np.float32), "scales"),
        numpy_helper.from_array(np.array([-1, 6 * 8 * 8], np.int64), "shape"),
        _w("m.w", 384, 12, scale=0.05),
        _w("m.b", 12),
        _w("head.w", 12, 10),
        _w("head.b", 10),
    ]
    return _graph_model(nodes, inits)


def zoo_model() -> onnx.ModelProto:
    """Many channel-wise ops in a row: norms, reductions, resize, softmax, quantization, where, sum, squeeze..."""
    f = lambda v, n: numpy_helper.from_array(np.array(v, np.float32), n)
    i = lambda v, n: numpy_helper.from_array(np.array(v, np.int64), n)
    nodes = [
        helper.make_node("Conv", ["x", "a.w"], ["a"], pads=[1, 1, 1, 1], name="a"),
        helper.make_node("InstanceNormalization", ["a", "in.s", "in.b"], ["a.n"]),
        helper.make_node("Softplus", ["a.n"], ["a.s"]),
        helper.make_node("ReduceMean", ["a.s"], ["a.m"], axes=[3], keepdims=1),
        helper.make_node("Resize", ["a.m", "", "scales"], ["a.u"], mode="nearest"),
        helper.make_node("Softmax", ["a.u"], ["a.sm"], axis=3),
        helper.make_node("LayerNormalization", ["a.sm", "ln.s", "ln.b"], ["a.ln"], axis=-1),
        helper.make_node("QuantizeLinear", ["a.ln", "q.s", "q.z"], ["a.q"]),
        helper.make_node("DequantizeLinear", ["a.q", "q.s", "q.z"], ["a.dq"]),
        helper.make_node("Transpose", ["a.dq"], ["a.t"], perm=[0, 1, 3, 2]),
        helper.make_node("ConvTranspose", ["a.t", "t.w", "t.b"], ["t"], strides=[2, 2], name="t"),
        helper.make_node("AveragePool", ["t"], ["t.p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Slice", ["t.p", "st", "en", "ax"], ["t.s"]),
        helper.make_node("Greater", ["t.s", "zero"], ["t.c"]),
        helper.make_node("Mul", ["t.s", "tenth"], ["t.m"]),
        helper.make_node("Where", ["t.c", "t.s", "t.m"], ["t.w2"]),
        helper.make_node("Sum", ["t.w2", "t.off", "t.s"], ["t.sum"]),
        helper.make_node("Div", ["t.sum", "t.div"], ["t.d"]),
        helper.make_node("GlobalMaxPool", ["t.d"], ["g"]),
        helper.make_node("Squeeze", ["g", "sq"], ["g.s"]),
        helper.make_node("Gemm", ["g.s", "m.w", "m.b"], ["m"], name="m"),
        helper.make_node("Elu", ["m"], ["m.e"]),
        helper.make_node("Unsqueeze", ["m.e", "sq"], ["m.u"]),
        helper.make_node("Conv", ["m.u", "o.w", "o.b"], ["o"], name="o"),
        helper.make_node("Flatten", ["o"], ["y"]),
    ]
    inits = [
        _w("a.w", 8, 3, 3, 3), _w("in.s", 8), _w("in.b", 8), f([1, 1, 1, 8], "scales"),
        f(np.ones(8), "ln.s"), f(np.zeros(8), "ln.b"), f(0.02, "q.s"),
        numpy_helper.from_array(np.array(128, np.uint8), "q.z"),
        _w("t.w", 8, 5, 2, 2), _w("t.b", 5), i([0], "st"), i([8], "en"), i([2], "ax"), f(0, "zero"), f(0.1, "tenth"),
        _w("t.off", 1, 5, 1, 1), f(np.full((5, 1, 1), 2.0), "t.div"), i([2, 3], "sq"), _w("m.w", 5, 7), _w("m.b", 7),
        _w("o.w", 10, 7, 1, 1), _w("o.b", 10),
    ]
    return _graph_model(nodes, inits)


def unanalysable_model(op: str) -> onnx.ModelProto:
    """conv 'a' (8 channels) whose channels go through a Transpose or a Split; conv 'b' prunable."""
    nodes = [
        helper.make_node("Conv", ["x", "a.w"], ["a"], pads=[1, 1, 1, 1], name="a"),
        helper.make_node("Relu", ["a"], ["a.r"]),
    ]
    if op == "Transpose":
        nodes += [
            helper.make_node("Transpose", ["a.r"], ["t"], perm=[0, 1, 3, 2]),  # harmless: keeps axis 1
            helper.make_node("Transpose", ["t"], ["t2"], perm=[0, 2, 3, 1]),  # moves the channels
            helper.make_node("Transpose", ["t2"], ["mid"], perm=[0, 3, 1, 2]),
        ]
    else:
        nodes += [
            helper.make_node("Split", ["a.r", "split"], ["s1", "s2"], axis=1),
            helper.make_node("Add", ["s1", "s2"], ["half"]),
            helper.make_node("Concat", ["half", "half"], ["mid"], axis=1),
        ]
    nodes += [
        helper.make_node("Conv", ["mid", "b.w"], ["b"], name="b"),
        helper.make_node("Relu", ["b"], ["b.r"]),
        helper.make_node("Conv", ["b.r", "c.w"], ["c"], name="c"),
    ]
    head_nodes, head_inits = _head("c", 6)
    inits = [_w("a.w", 8, 3, 3, 3), _w("b.w", 12, 8, 1, 1), _w("c.w", 6, 12, 1, 1)]
    if op == "Split":
        inits.append(numpy_helper.from_array(np.array([4, 4], np.int64), "split"))
    return _graph_model(nodes + head_nodes, inits + head_inits)


# ---- analysis -----------------------------------------------------------------------------------------
def test_resnet_residual_groups(samples_dir):
    proto = onnx.load(samples_dir / "resnet.onnx")
    groups = _groups_by_name(proto)
    stem = groups["stem.0.weight"]
    assert stem.prunable
    assert {p.tensor for p in stem.producers if p.kind == "weight"} == {"stem.0.weight", "layer1.conv2.weight"}
    readers = {"layer1.conv1.weight", "layer2.conv1.weight", "layer2.shortcut.0.weight"}
    assert {c.tensor for c in stem.consumers} == readers
    block2 = groups["layer2.conv2.weight"]
    assert {p.tensor for p in block2.producers if p.kind == "weight"} == {
        "layer2.conv2.weight",
        "layer2.shortcut.0.weight",
    }
    assert not groups["fc.weight"].prunable and "logits" in groups["fc.weight"].reason
    assert not groups["input"].prunable

    # all convs feeding one Add chain lose the same channels, and their readers lose the same inputs
    _, removal, pruned, kept = _prune_groups(proto)
    assert np.array_equal(kept[("stem.0.weight", 0)], kept[("layer1.conv2.weight", 0)])
    assert np.array_equal(kept[("stem.0.weight", 0)], kept[("layer2.shortcut.0.weight", 1)])
    assert np.array_equal(kept[("stem.1.running_var", 0)], kept[("layer1.bn2.weight", 0)])
    assert np.array_equal(kept[("layer2.conv2.weight", 0)], kept[("layer2.shortcut.0.weight", 0)])
    assert np.array_equal(kept[("layer2.conv2.weight", 0)], kept[("layer3.conv1.weight", 1)])
    _check_valid(pruned)


def test_mobilenet_depthwise_and_se_groups(samples_dir):
    proto = onnx.load(samples_dir / "mobilenet.onnx")
    groups = _groups_by_name(proto)
    trunk = groups["block3.expand.weight"]
    weights = {p.tensor for p in trunk.producers if p.kind == "weight"}
    assert weights == {"block3.expand.weight", "block3.dw.weight", "block3.se.fc2.weight"}  # SE output couples
    assert {c.tensor for c in trunk.consumers} == {"block3.se.fc1.weight", "block3.project.weight"}
    squeeze = groups["block3.se.fc1.weight"]  # the SE's own channels are a group of their own
    assert squeeze.prunable and squeeze.size == 12
    assert [c.tensor for c in squeeze.consumers] == ["block3.se.fc2.weight"]
    residual = groups["block2.pw.weight"]
    assert {"block2.pw.weight", "block3.project.weight", "block4.dw.weight"} <= {p.tensor for p in residual.producers}

    _, removal, pruned, kept = _prune_groups(proto)
    arrays = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    for node in pruned.graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type == "Conv" and "dw" in node.input[1]:
            assert group == arrays[node.input[1]].shape[0] > 1  # depthwise: group attribute follows the channels
    assert arrays["block3.se.fc1.weight"].shape[0] == 12 - len(removal["block3.se.fc1.weight"])
    trunk_kept, squeeze_kept = arrays["block3.expand.weight"].shape[0], arrays["block3.se.fc1.weight"].shape[0]
    assert arrays["block3.se.fc2.weight"].shape == (trunk_kept, squeeze_kept, 1, 1)
    _check_valid(pruned)


@pytest.mark.parametrize("name", ["mlp", "lenet", "resnet", "mobilenet"])
def test_removal_equals_masking_on_samples(samples_dir, name):
    """mask_values are where a 0/1 mask emulates the removal exactly (importance code relies on it)."""
    proto = onnx.load(samples_dir / f"{name}.onnx")
    assert all(g.mask_values for g in analyse_channels(proto) if g.prunable)
    _assert_emulation_exact(proto, (1, 8, 8))


@pytest.mark.parametrize("builder", [concat_model, grouped_model, reshape_model, zoo_model])
def test_odd_graphs_prune_validly(builder):
    proto = builder()
    groups = analyse_channels(proto)
    assert all(g.prunable for g in groups if g.producers and "graph output" not in g.reason), [
        (g.name, g.reason) for g in groups if not g.prunable
    ]
    _assert_emulation_exact(proto, (3, 8, 8))


def test_zoo_groups():
    groups = _groups_by_name(zoo_model())
    assert [g.name for g in groups.values() if g.prunable] == ["a.w", "t.w", "m.w"]
    kinds = {(p.tensor, p.kind) for p in groups["t.w"].producers}
    assert {("t.w", "weight"), ("t.b", "bias"), ("t.off", "const"), ("t.div", "const")} <= kinds
    assert ("ln.s", "bias") not in kinds and all(p.tensor != "ln.s" for p in groups["a.w"].producers)


def test_concat_offsets_and_grouped_conv_blocks():
    groups = _groups_by_name(concat_model())
    a, b = groups["a.w"], groups["b.w"]
    # BN + HardSwish after the Concat: no value holds exactly one branch's channels where the
    # conv reads them, so no mask can emulate the removal (data-driven importance falls back)
    assert a.mask_values == [] and b.mask_values == [] and groups["c.w"].mask_values == ["head.flat"]
    assert ("cat.bn.scale", 0, 0, 1) == tuple(next(p for p in a.producers if p.tensor == "cat.bn.scale")[:4])
    assert ("cat.bn.scale", 0, 8, 1) == tuple(next(p for p in b.producers if p.tensor == "cat.bn.scale")[:4])
    assert ("c.w", 1, 8, 1) == tuple(b.consumers[0][:4])

    groups = _groups_by_name(grouped_model())
    trunk = groups["a.w"]  # conv a -> grouped conv (2 groups of 4 in, 4 out) -> depthwise x2
    assert trunk.size == 2  # only whole conv groups can go
    blocks = {p.tensor: p.block for p in trunk.producers}
    assert blocks["a.w"] == 4 and blocks["g.w"] == 4 and blocks["dw.w"] == 8 and blocks["dw.bn.scale"] == 8
    assert [(c.tensor, c.block) for c in trunk.consumers] == [("pw.w", 8)]
    _, removal, pruned, _ = _prune_groups(grouped_model())
    convs = {n.name: n for n in pruned.graph.node}
    assert next(a.i for a in convs["g"].attribute if a.name == "group") == 1
    assert next(a.i for a in convs["dw"].attribute if a.name == "group") == 4


def test_reshape_constant_is_adjusted():
    proto = reshape_model()
    group = _groups_by_name(proto)["a.w"]
    assert [(f.tensor, f.index, f.block) for f in group.shape_fixes] == [("shape", 1, 64)]
    assert ("m.w", 0, 0, 64) == tuple(group.consumers[0][:4])
    _, removal, pruned, _ = _prune_groups(proto)
    shape = next(numpy_helper.to_array(t) for t in pruned.graph.initializer if t.name == "shape")
    assert shape.tolist() == [-1, (6 - len(removal["a.w"])) * 64]


@pytest.mark.parametrize("op", ["Transpose", "Split"])
def test_unanalysable_pattern_is_skipped(op):
    proto = unanalysable_model(op)
    groups = _groups_by_name(proto)
    assert not groups["a.w"].prunable and op in groups["a.w"].reason
    assert groups["b.w"].prunable
    model = onnx_format.from_proto(proto, {})
    pruned, report = prune_structured_onnx(model, _structured(0.5))
    assert any(s.startswith("a.w:") and op in s for s in report.skipped)
    assert [c.name for c in report.layers] == ["b.w", "c.w"]
    result = onnx_format.to_proto(pruned)
    _check_valid(result, (3, 8, 8))
    shapes = {t.name: tuple(t.dims) for t in result.graph.initializer}
    assert shapes["a.w"] == (8, 3, 3, 3) and shapes["b.w"] == (6, 8, 1, 1)


def _blocking_model(pattern: str) -> onnx.ModelProto:
    """conv a (5 channels) -> `pattern` -> 'mid' -> conv b (4 channels) -> head."""
    inits = [_w("a.w", 5, 3, 1, 1), _w("b.w", 4, 5, 1, 1)]
    nodes = [helper.make_node("Conv", ["x", "a.w"], ["a"], name="a")]
    if pattern == "shape":  # shape-steering use: the channel count feeds a Reshape
        nodes += [
            helper.make_node("Shape", ["a"], ["a.shape"]),
            helper.make_node("Reshape", ["a", "a.shape"], ["mid"]),
        ]
    elif pattern == "gather":
        inits.append(numpy_helper.from_array(np.array([4, 3, 2, 1, 0], np.int64), "perm"))
        nodes.append(helper.make_node("Gather", ["a", "perm"], ["mid"], axis=1))
    elif pattern == "input":  # a residual Add with the graph input couples the channels to it
        inits = [_w("a.w", 3, 3, 1, 1), _w("b.w", 4, 3, 1, 1)]
        nodes.append(helper.make_node("Add", ["a", "x"], ["mid"]))
    elif pattern == "shared":  # a.w also used by another conv whose channels go elsewhere
        nodes += [
            helper.make_node("Conv", ["x", "a.w"], ["a2"], name="a2"),
            helper.make_node("Mul", ["a", "a"], ["sq"]),
            helper.make_node("Concat", ["sq", "a2"], ["cat"], axis=1),
            helper.make_node("Conv", ["cat", "ab.w"], ["mid"], name="ab"),
        ]
        inits.append(_w("ab.w", 5, 10, 1, 1))
    elif pattern == "if":
        then = helper.make_graph(
            [helper.make_node("Relu", ["a"], ["t"])], "then", [],
            [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)],
        )
        other = helper.make_graph(
            [helper.make_node("Neg", ["a"], ["e"])], "else", [],
            [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)],
        )
        inits.append(numpy_helper.from_array(np.array(True), "cond"))
        nodes.append(helper.make_node("If", ["cond"], ["mid"], then_branch=then, else_branch=other))
    nodes += [helper.make_node("Conv", ["mid", "b.w"], ["b"], name="b")]
    head_nodes, head_inits = _head("b", 4)
    return _graph_model(nodes + head_nodes, inits + head_inits)


@pytest.mark.parametrize(
    "pattern,why",
    [("shape", "Shape"), ("gather", "Gather"), ("input", "graph input"), ("shared", "a.w"), ("if", "subgraph")],
)
def test_blocking_patterns(pattern, why):
    proto = _blocking_model(pattern)
    groups = _groups_by_name(proto)
    assert not groups["a.w"].prunable and why in groups["a.w"].reason, groups["a.w"].reason
    assert groups["b.w"].prunable
    pruned, report = prune_structured_onnx(onnx_format.from_proto(proto, {}), _structured(0.5))
    _check_valid(onnx_format.to_proto(pruned), (3, 8, 8))
    assert any(s.startswith("a.w:") for s in report.skipped)


def test_graph_output_and_subgraph_uses_block():
    nodes = [
        helper.make_node("Conv", ["x", "a.w"], ["a"], name="a"),
        helper.make_node("Conv", ["a", "b.w"], ["feat"], name="b"),
        helper.make_node("GlobalAveragePool", ["feat"], ["p"]),
        helper.make_node("Flatten", ["p"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("a", TensorProto.FLOAT, None),
        ],
        [_w("a.w", 5, 3, 1, 1), _w("b.w", 4, 5, 1, 1)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    groups = _groups_by_name(model)
    assert not groups["a.w"].prunable and "graph output 'a'" in groups["a.w"].reason
    assert not groups["b.w"].prunable and "graph output 'y'" in groups["b.w"].reason


# ---- refit building blocks ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "strides,pads,dilations,group",
    [((1, 1), (1, 1, 1, 1), (1, 1), 1), ((2, 1), (0, 1, 2, 0), (1, 2), 1), ((2, 2), (1, 1, 1, 1), (1, 1), 4)],
)
def test_im2col_matches_conv(strides, pads, dilations, group):
    from nnc_tool.prune.refit import im2col

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 7, 6)).astype(np.float32)
    w = rng.standard_normal((8, 4 // group, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], strides=strides, pads=pads, dilations=dilations, group=group)
    graph = helper.make_graph(
        [node], "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    expected = _run(model, x)
    cols = im2col(x, (3, 3), list(strides), list(pads), list(dilations))
    k = 4 // group
    parts = [
        cols.reshape(cols.shape[0], group, -1)[:, j] @ w[j * 2 : (j + 1) * 2].reshape(2, -1).T for j in range(group)
    ] if group > 1 else [cols @ w.reshape(8, -1).T]
    got = np.concatenate(parts, axis=1)
    assert k * 9 * group == cols.shape[1]
    np.testing.assert_allclose(got, np.moveaxis(expected, 1, -1).reshape(-1, 8), rtol=1e-4, atol=1e-4)


def test_refit_repairs_damaged_layers():
    """Refit of a conv, a depthwise conv and a Gemm recovers the original function."""
    from nnc_tool.prune.refit import refit_pruned

    original = grouped_model()
    damaged = onnx.ModelProto()
    damaged.CopyFrom(original)
    rng = np.random.default_rng(5)
    for tensor in damaged.graph.initializer:
        if tensor.name in ("g.w", "dw.w", "head.w"):
            array = numpy_helper.to_array(tensor)
            noisy = array + 0.3 * rng.standard_normal(array.shape).astype(np.float32)
            tensor.CopyFrom(numpy_helper.from_array(noisy, tensor.name))
    calibration = rng.random((64, 3, 8, 8), dtype=np.float32)
    repaired, notes = refit_pruned(original, damaged, ["g", "dw", "head"], {}, calibration, ridge=1e-6)
    onnx.checker.check_model(repaired, full_check=True)
    x = rng.random((16, 3, 8, 8), dtype=np.float32)
    reference = _run(original, x)
    before = np.mean((_run(damaged, x) - reference) ** 2)
    after = np.mean((_run(repaired, x) - reference) ** 2)
    assert after < 1e-3 * before, (before, after, notes)


# ---- pruning the sample models ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet", "mobilenet", "mlp", "lenet"])
def test_prune_samples_l1(samples_dir, name):
    model = onnx_format.read(samples_dir / f"{name}.onnx")
    original = onnx_format.to_proto(model)
    pruned, report = prune_structured_onnx(model, _structured(0.5, importance="l1"))
    proto = onnx_format.to_proto(pruned)
    _check_valid(proto)
    fraction = weight_parameter_count(proto) / weight_parameter_count(original)
    print(f"{name}: conv/linear weights kept {fraction:.3f}")
    if name in ("resnet", "mobilenet"):
        assert fraction <= 0.55
    else:
        assert fraction < 0.75
    assert report.parameters_after < report.parameters_before
    assert all(change.after == change.before - round(0.5 * change.before) for change in report.layers)
    assert any("logits" in s for s in report.skipped)


def test_refit_improves_resnet(samples_dir, digits_test):
    model = onnx_format.read(samples_dir / "resnet.onnx")
    with np.load(samples_dir / "digits_calib.npz") as data:
        calibration = data["x"]
    plain, _ = prune_structured_onnx(model, _structured(0.5))
    refit, report = prune_structured_onnx(model, _structured(0.5, calibration=calibration, refit=True))
    original_acc = _accuracy(onnx_format.to_proto(model), digits_test)
    plain_acc = _accuracy(onnx_format.to_proto(plain), digits_test)
    refit_acc = _accuracy(onnx_format.to_proto(refit), digits_test)
    print(f"resnet 50 %: original {original_acc:.2f} %, pruned {plain_acc:.2f} %, pruned + refit {refit_acc:.2f} %")
    print(report.notes)
    assert refit_acc >= plain_acc
    assert refit_acc >= original_acc - 5.0
    assert any(n.startswith("refit:") for n in report.notes)
    _check_valid(onnx_format.to_proto(refit))


@pytest.mark.parametrize("importance", ["bn", "random", "l2"])
def test_other_importances(samples_dir, importance):
    model = onnx_format.read(samples_dir / "resnet.onnx")
    pruned, report = prune_structured_onnx(model, _structured(0.3, importance=importance, seed=3))
    _check_valid(onnx_format.to_proto(pruned))
    assert report.layers and all(c.after < c.before for c in report.layers)


def test_bn_importance_falls_back_without_batchnorm(samples_dir):
    model = onnx_format.read(samples_dir / "mlp.onnx")
    pruned, report = prune_structured_onnx(model, _structured(0.3, importance="bn"))
    assert any("bn importance" in n and "l1" in n for n in report.notes)
    _check_valid(onnx_format.to_proto(pruned))


def test_random_importance_is_seeded(samples_dir):
    proto = onnx.load(samples_dir / "resnet.onnx")
    groups = [g for g in analyse_channels(proto) if g.prunable]
    first = channel_scores(proto, groups, _structured(importance="random", seed=7))
    again = channel_scores(proto, groups, _structured(importance="random", seed=7))
    other = channel_scores(proto, groups, _structured(importance="random", seed=8))
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not all(np.array_equal(first[k], other[k]) for k in first)


def test_global_allocation(samples_dir):
    proto = onnx.load(samples_dir / "mobilenet.onnx")
    groups = [g for g in analyse_channels(proto) if g.prunable]
    config = _structured(0.5, allocation="global")
    counts = allocate(proto, groups, channel_scores(proto, groups, config), config)
    total = sum(g.size for g in groups)
    assert sum(counts.values()) == round(0.5 * total)
    assert all(0 <= counts[g.name] < g.size for g in groups)
    model = onnx_format.read(samples_dir / "mobilenet.onnx")
    pruned, _ = prune_structured_onnx(model, config)
    _check_valid(onnx_format.to_proto(pruned))


def test_choose_channels_takes_lowest():
    chosen = choose_channels({"g": np.array([0.5, 0.1, 0.9, 0.2])}, {"g": 2, "h": 0})
    assert chosen == {"g": chosen["g"]} and chosen["g"].tolist() == [1, 3]


def test_sparsity_zero_changes_nothing(samples_dir):
    model = onnx_format.read(samples_dir / "resnet.onnx")
    pruned, report = prune_structured_onnx(model, _structured(0.0))
    assert [t.name for t in pruned.tensors] == [t.name for t in model.tensors]
    assert all(np.array_equal(a.array, b.array) for a, b in zip(pruned.tensors, model.tensors))
    assert pruned.topology == model.topology
    assert report.parameters_after == report.parameters_before
    assert all(c.before == c.after for c in report.layers)


def test_constant_node_weights(tmp_path):
    """Weights held in Constant nodes are sliced in place."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import onnx_factory

    model = onnx_format.read(onnx_factory.build_conv_bn_gemm_constants(tmp_path))
    pruned, report = prune_structured_onnx(model, _structured(0.5))
    proto = onnx_format.to_proto(pruned)
    onnx.checker.check_model(proto, full_check=True)
    arrays = {t.name: t.array for t in pruned.tensors}
    assert arrays["conv.weight"].shape == (4, 3, 3, 3) and arrays["fc.weight"].shape == (10, 256)
    out = _run(proto, np.random.default_rng(0).random((1, 3, 8, 8), dtype=np.float32))
    assert out.shape == (1, 10)


def test_data_driven_importance(samples_dir):
    with np.load(samples_dir / "digits_calib.npz") as data:
        calibration = data["x"][:64]
    model = onnx_format.read(samples_dir / "resnet.onnx")
    pruned, _ = prune_structured_onnx(
        model, _structured(0.5, importance="activation", calibration=calibration, refit=False)
    )
    _check_valid(onnx_format.to_proto(pruned))


def test_data_driven_importance_falls_back_without_mask_site():
    calibration = np.random.default_rng(0).random((32, 3, 8, 8), dtype=np.float32)
    model = onnx_format.from_proto(concat_model(), {})
    pruned, report = prune_structured_onnx(
        model, _structured(0.5, importance="activation", calibration=calibration, refit=False)
    )
    assert any("activation importance unavailable for 2 group(s)" in n for n in report.notes)
    _check_valid(onnx_format.to_proto(pruned), (3, 8, 8))


@pytest.mark.parametrize("name", ["resnet", "mobilenet"])
def test_default_settings_keep_channel_multiples_and_halve_the_weights(samples_dir, name):
    model = onnx_format.read(samples_dir / f"{name}.onnx")
    pruned, report = prune_structured_onnx(model, PruneConfig(method="structured", sparsity=0.5))
    proto = onnx_format.to_proto(pruned)
    _check_valid(proto)
    before, after = weight_parameter_count(onnx_format.to_proto(model)), weight_parameter_count(proto)
    assert after <= 0.55 * before
    weights = {i.name: i for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Conv" and node.input[1] in weights:
            out_channels = weights[node.input[1]].dims[0]
            original = next(t for t in model.tensors if t.name == node.input[1]).array.shape[0]
            assert out_channels % 8 == 0 or original < 8 or out_channels == original, (node.input[1], out_channels)
