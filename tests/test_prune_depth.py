"""Depth pruning (nnc_tool.prune.depth): removing whole residual branches from ONNX graphs.

Measurements behind the score (digits samples, 256 calibration samples, test KL/accuracy on the
450 held-out test images; BN = downstream BatchNorm statistics re-estimated):

    unit            entropy  KL bypassed  KL bypassed+BN (2-fold CV)  test acc after removal (+BN)
    resnet layer1    0.723     2.600          0.0852                   0.942
    resnet layer2    0.789     1.010          0.0857                   0.953
    resnet layer3    0.820     0.170          -  (no BN downstream)     0.964
    mobilenet block3 0.455     1.703          0.2196                   0.887
    mobilenet block5 0.431     0.878          -                        0.738

Ranking by entropy alone or by plain bypass distortion removes mobilenet block5 first (test
accuracy 0.738); ranking by the distortion that removal really costs once BatchNorms are
re-estimated removes block3 (0.887). On resnet every distortion-based ranking removes layer1
then layer3 (0.942, then 0.831). The entropy therefore only breaks near-ties:
score = KL x (1 + entropy / 4).

Run with ``pytest -s`` to see the printed accuracy and latency numbers.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from nnc_tool.formats import onnx_format
from nnc_tool.model import Model, TensorRole
from nnc_tool.prune import depth
from nnc_tool.prune.config import PruneConfig

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
CALIB = np.load(SAMPLES / "digits_calib.npz")["x"]


@lru_cache(maxsize=None)
def _sample(name: str) -> Model:
    return onnx_format.read(SAMPLES / f"{name}.onnx")


@lru_cache(maxsize=None)
def _pruned(name: str, sparsity: float):
    return depth.prune_depth_onnx(_sample(name), PruneConfig(method="depth", sparsity=sparsity, calibration=CALIB))


def _session(proto: onnx.ModelProto, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _params(model: Model) -> int:
    return sum(t.array.size for t in model.tensors if t.role in (TensorRole.WEIGHT, TensorRole.NONWEIGHT) and t.is_float)


def _removed(report) -> list[str]:
    """Names of the removed units in removal order (from the report's step notes)."""
    steps = [re.match(r"step (\d+): removed (\S+)", note) for note in report.notes]
    return [m.group(2) for m in steps if m]


# --------------------------------------------------------------------------------------------
# Sample models


@pytest.mark.parametrize("name,units", [("resnet", 3), ("mobilenet", 2)])
@pytest.mark.parametrize("sparsity", [0.34, 0.5, 0.99])
def test_sample_models_valid_smaller_runnable(name: str, units: int, sparsity: float) -> None:
    model = _sample(name)
    pruned, report = _pruned(name, sparsity)
    expected = int(np.floor(sparsity * units + 0.5))
    assert len(_removed(report)) == expected >= 1
    assert sorted(c.name for c in report.layers if c.after == 0) == sorted(_removed(report))
    assert len(report.layers) == units and all(c.before == 1 for c in report.layers)

    before, after = onnx_format.to_proto(model), onnx_format.to_proto(pruned)
    onnx.checker.check_model(after, full_check=True)
    assert len(after.graph.node) < len(before.graph.node)
    assert sum(n.op_type == "Add" for n in after.graph.node) == units - expected
    assert report.parameters_before == _params(model) > report.parameters_after == _params(pruned)
    assert pruned.parameter_count < model.parameter_count
    assert pruned.metadata == model.metadata
    # No orphans: every initializer is read by some node.
    read = {i for n in after.graph.node for i in n.input}
    assert all(t.name in read for t in after.graph.initializer)

    session = _session(after)
    for batch in (1, 32):
        (logits,) = session.run(None, {"input": CALIB[:batch]})
        assert logits.shape == (batch, 10) and np.all(np.isfinite(logits))


def test_sparsity_one_is_rejected_by_config() -> None:
    # PruneConfig restricts sparsity to [0, 1); 0.99 is used above to remove every unit.
    with pytest.raises(ValueError):
        PruneConfig(method="depth", sparsity=1.0, calibration=CALIB)


@pytest.mark.parametrize("name", ["resnet", "mobilenet"])
def test_removed_units_are_the_lowest_scoring(name: str) -> None:
    _, report = _pruned(name, 0.99)
    order = _removed(report)
    proto, seeds = onnx_format.to_proto(_sample(name)), set()
    evaluator = depth._Evaluator(proto, CALIB)
    for step, removed_name in enumerate(order):
        units, failures = depth._measure(proto, depth._find_units(proto).units, evaluator, seeds)
        assert failures == {}
        best = min(units, key=lambda u: u.score)
        assert best.name == removed_name, f"step {step}: removed {removed_name}, lowest score {best.name}"
        assert all(best.score <= u.score for u in units)
        proto, rewired = depth._remove_unit(proto, best)
        seeds |= rewired
    # Parameters removed = parameters inside the removed branches.
    units = {u.name: u for u in depth._find_units(onnx_format.to_proto(_sample(name))).units}
    _, one = _pruned(name, 0.34)
    (first,) = _removed(one)
    assert one.parameters_before - one.parameters_after == units[first].parameters


def test_scores_in_notes() -> None:
    _, report = _pruned("resnet", 0.34)
    unit_notes = [n for n in report.notes if n.startswith("unit ")]
    assert len(unit_notes) == 3
    assert all("entropy" in n and "distortion bypassed" in n and "score" in n for n in unit_notes)
    assert report.skipped == []


@pytest.mark.parametrize("name", ["resnet", "mobilenet"])
def test_sparsity_zero_changes_nothing(name: str) -> None:
    model = _sample(name)
    pruned, report = depth.prune_depth_onnx(model, PruneConfig(method="depth", sparsity=0.0, calibration=CALIB))
    assert pruned.topology == model.topology
    assert [t.name for t in pruned.tensors] == [t.name for t in model.tensors]
    assert all(np.array_equal(a.array, b.array) for a, b in zip(pruned.tensors, model.tensors))
    assert report.parameters_after == report.parameters_before
    assert all(c.after == c.before == 1 for c in report.layers) and report.layers
    assert _removed(report) == []


def test_model_without_residual_adds_is_unchanged() -> None:
    model = _sample("lenet")
    pruned, report = depth.prune_depth_onnx(model, PruneConfig(method="depth", sparsity=0.5, calibration=CALIB))
    assert pruned is model
    assert report.parameters_after == report.parameters_before == _params(model)
    assert report.layers == []
    assert any("no removable units" in n for n in report.notes)


def test_dispatcher_routes_depth() -> None:
    pytest.importorskip("nnc_tool.graph.layout")  # the dispatcher needs it for every method
    from nnc_tool.prune import prune

    pruned, report = prune(_sample("resnet"), PruneConfig(method="depth", sparsity=0.34, calibration=CALIB))
    assert report.method == "depth" and report.parameters_after < report.parameters_before


# --------------------------------------------------------------------------------------------
# Synthetic graphs


def _f32(rng: np.random.Generator, *shape: int, scale: float = 0.3) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _graph_model(nodes, inits: dict[str, np.ndarray], outputs: list[tuple[str, list]]) -> Model:
    graph = helper.make_graph(
        nodes,
        "synthetic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in outputs],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto, full_check=True)
    return onnx_format.from_proto(proto, {"origin": "test"})


def _conv(name: str, x: str, out: str, rng, inits, c_in: int = 4, c_out: int = 4):
    inits[f"{name}.w"] = _f32(rng, c_out, c_in, 3, 3)
    inits[f"{name}.b"] = _f32(rng, c_out, scale=0.1)
    return helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [out], name=name, pads=[1, 1, 1, 1])


def _head(x: str, rng, inits, channels: int = 4) -> list:
    inits["fc.w"] = _f32(rng, 5, channels)
    inits["fc.b"] = _f32(rng, 5, scale=0.1)
    return [
        helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["y"], name="fc", transB=1),
    ]


def _calib(seed: int = 0, n: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4, 8, 8)).astype(np.float32)


def test_branch_with_different_shape_is_not_removed() -> None:
    """r1 = x + relu(conv(x)) is removable; r2 = r1 + pool(relu(conv(r1))) broadcasts a [N,4,1,1]
    branch onto the [N,4,8,8] shortcut, and r3 = pool(r2) + relu(conv(r2)) would shrink the sum to
    [N,4,1,1] without its [N,4,8,8] branch: neither may be removed."""
    rng, inits = np.random.default_rng(0), {}
    nodes = [
        _conv("c1", "x", "a1", rng, inits),
        helper.make_node("Relu", ["a1"], ["b1"], name="relu1"),
        helper.make_node("Add", ["x", "b1"], ["r1"], name="add_ok"),
        _conv("c2", "r1", "a2", rng, inits),
        helper.make_node("Relu", ["a2"], ["b2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["b2"], ["p2"], name="pool2"),
        helper.make_node("Add", ["r1", "p2"], ["r2"], name="add_broadcast_branch"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p3"], name="pool3"),
        _conv("c3", "r2", "a3", rng, inits),
        helper.make_node("Relu", ["a3"], ["b3"], name="relu3"),
        helper.make_node("Add", ["p3", "b3"], ["r3"], name="add_broadcast_shortcut"),
        *_head("r3", rng, inits),
    ]
    model = _graph_model(nodes, inits, [("y", ["N", 5])])
    pruned, report = depth.prune_depth_onnx(model, PruneConfig(method="depth", sparsity=0.99, calibration=_calib()))
    assert _removed(report) == ["add_ok"]
    assert [c.name for c in report.layers] == ["add_ok"]
    skipped = {s.split(":")[0]: s for s in report.skipped}
    assert set(skipped) == {"add_broadcast_branch", "add_broadcast_shortcut"}
    assert "differs from shortcut shape" in skipped["add_broadcast_branch"]
    assert "differs from shortcut shape" in skipped["add_broadcast_shortcut"]
    proto = onnx_format.to_proto(pruned)
    onnx.checker.check_model(proto, full_check=True)
    names = {n.name for n in proto.graph.node}
    assert {"add_broadcast_branch", "add_broadcast_shortcut", "c2", "c3"} <= names
    assert not names & {"add_ok", "c1", "relu1"}
    assert "c1.w" not in {t.name for t in pruned.tensors}
    assert _session(proto).run(None, {"x": _calib(1, 3)})[0].shape == (3, 5)


def test_shared_branch_value_and_graph_output_sum() -> None:
    """A branch value read outside the branch is not single-exit; a residual whose sum is a graph
    output is bypassed with an Identity so the output keeps its name."""
    rng, inits = np.random.default_rng(1), {}
    nodes = [
        _conv("c1", "x", "a1", rng, inits),
        helper.make_node("Relu", ["a1"], ["b1"], name="relu1"),
        helper.make_node("Add", ["x", "b1"], ["r1"], name="add_shared"),
        helper.make_node("ReduceMax", ["a1"], ["side"], name="side", keepdims=0),  # reads a1 too
        _conv("c2", "r1", "a2", rng, inits),
        helper.make_node("Relu", ["a2"], ["b2"], name="relu2"),
        helper.make_node("Add", ["b2", "r1"], ["r2"], name="add_out"),
    ]
    model = _graph_model(nodes, inits, [("r2", ["N", 4, 8, 8]), ("side", [])])
    pruned, report = depth.prune_depth_onnx(model, PruneConfig(method="depth", sparsity=0.99, calibration=_calib()))
    assert _removed(report) == ["add_out"]
    assert any(s.startswith("add_shared") and "not single-exit" in s for s in report.skipped)
    proto = onnx_format.to_proto(pruned)
    onnx.checker.check_model(proto, full_check=True)
    ops = {n.name: n for n in proto.graph.node}
    assert ops["add_out"].op_type == "Identity" and list(ops["add_out"].input) == ["r1"]
    assert "c2" not in ops and "relu2" not in ops
    x = _calib(2, 5)
    r2, side = _session(proto).run(None, {"x": x})
    r1 = _session(onnx_format.to_proto(model)).run(["r2"], {"x": x})[0]  # shapes only
    assert r2.shape == r1.shape and side.shape == ()


def test_constant_shared_with_the_branch_is_kept() -> None:
    """Exporters share Constant nodes; one read inside and outside a branch stays after removal,
    one read only inside goes with the branch."""
    rng, inits = np.random.default_rng(4), {}
    half = numpy_helper.from_array(np.array(0.5, np.float32), "half")
    own = numpy_helper.from_array(np.array(2.0, np.float32), "own")
    nodes = [
        helper.make_node("Constant", [], ["k"], name="const_k", value=half),
        helper.make_node("Constant", [], ["k2"], name="const_own", value=own),
        _conv("c1", "x", "a1", rng, inits),
        helper.make_node("Relu", ["a1"], ["b1"], name="relu1"),
        helper.make_node("Mul", ["b1", "k"], ["m1"], name="mul_in"),
        helper.make_node("Mul", ["m1", "k2"], ["m2"], name="mul_own"),
        helper.make_node("Add", ["x", "m2"], ["r1"], name="add"),
        helper.make_node("Mul", ["r1", "k"], ["r2"], name="mul_out"),
        *_head("r2", rng, inits),
    ]
    model = _graph_model(nodes, inits, [("y", ["N", 5])])
    (unit,) = depth._find_units(onnx_format.to_proto(model)).units
    assert unit.parameters == 4 * 4 * 9 + 4 + 1  # c1 weight and bias, 'own'; not the shared 'k'
    pruned, report = depth.prune_depth_onnx(model, PruneConfig(method="depth", sparsity=0.99, calibration=_calib()))
    assert _removed(report) == ["add"]
    proto = onnx_format.to_proto(pruned)
    onnx.checker.check_model(proto, full_check=True)
    names = {n.name for n in proto.graph.node}
    assert "const_k" in names and "mul_out" in names
    assert not names & {"const_own", "c1", "relu1", "mul_in", "mul_own", "add"}
    # The report counts learned parameters (roles weight/non-weight); the scalar 'own' is an exact
    # constant (formats/onnx_roles: 1 element used elementwise), so only c1's weight and bias count.
    assert report.parameters_before - report.parameters_after == unit.parameters - 1
    assert _session(proto).run(None, {"x": _calib(5, 2)})[0].shape == (2, 5)


def test_conv_shortcut_keeps_lighter_path_and_nested_units() -> None:
    """Both sides of add_proj are single-entry single-exit paths from r0 (3x3 conv branch vs 1x1
    conv shortcut): the heavier one is the branch. add_inner sits inside add_outer's branch; once
    the outer branch goes, the inner unit goes with it."""
    rng, inits = np.random.default_rng(2), {}
    inits["s.w"] = _f32(rng, 4, 4, 1, 1)
    nodes = [
        _conv("stem", "x", "r0", rng, inits),
        _conv("b1", "r0", "t1", rng, inits),
        helper.make_node("Relu", ["t1"], ["u1"], name="b1relu"),
        _conv("b2", "u1", "t2", rng, inits),
        helper.make_node("Conv", ["r0", "s.w"], ["s"], name="short"),
        helper.make_node("Add", ["t2", "s"], ["r1"], name="add_proj"),
        # outer: r2 = r1 + g(r1), with g containing its own residual add_inner
        _conv("o1", "r1", "o1y", rng, inits),
        helper.make_node("Relu", ["o1y"], ["o1r"], name="o1relu"),
        _conv("i1", "o1r", "i1y", rng, inits),
        helper.make_node("Relu", ["i1y"], ["i1r"], name="i1relu"),
        helper.make_node("Add", ["o1r", "i1r"], ["inner"], name="add_inner"),
        helper.make_node("Add", ["r1", "inner"], ["r2"], name="add_outer"),
        *_head("r2", rng, inits),
    ]
    model = _graph_model(nodes, inits, [("y", ["N", 5])])
    search = depth._find_units(onnx_format.to_proto(model))
    units = {u.name: u for u in search.units}
    assert set(units) == {"add_proj", "add_inner", "add_outer"}
    assert units["add_proj"].shortcut == "s" and units["add_proj"].entry == "r0"
    assert sorted(units["add_outer"].nodes) == sorted(["o1", "o1relu", "i1", "i1relu", "add_inner"])
    # Removing the outer unit takes the inner one with it.
    without_outer, rewired = depth._remove_unit(onnx_format.to_proto(model), units["add_outer"])
    assert rewired == {"gap"}
    assert {u.name for u in depth._find_units(without_outer).units} == {"add_proj"}
    assert not {"o1", "i1", "add_inner", "add_outer"} & {n.name for n in without_outer.graph.node}
    assert not {"o1.w", "i1.w"} & {t.name for t in without_outer.graph.initializer}

    pruned, report = depth.prune_depth_onnx(model, PruneConfig(method="depth", sparsity=0.99, calibration=_calib()))
    proto = onnx_format.to_proto(pruned)
    onnx.checker.check_model(proto, full_check=True)
    assert not any(n.op_type == "Add" for n in proto.graph.node)
    assert len(_removed(report)) <= 3  # removing add_outer may take add_inner with it
    assert all(c.after == 0 for c in report.layers)
    assert _session(proto).run(None, {"x": _calib(3, 2)})[0].shape == (2, 5)


def test_shapes_unknown_statically_are_checked_at_run_time() -> None:
    """Reshape to a computed shape hides the branch shapes from shape inference: the unit whose
    branch really has the shortcut's shape is removed, the one that broadcasts [N,4,1,1] is not."""
    rng, inits = np.random.default_rng(3), {}
    inits["zero"], inits["two"] = np.array([0], np.int64), np.array([2], np.int64)
    inits["ones2"] = np.array([1, 1], np.int64)
    nodes = [
        helper.make_node("Shape", ["x"], ["sx"], name="shape1"),
        helper.make_node("Abs", ["sx"], ["sx_abs"], name="abs1"),  # hides the values from data propagation
        _conv("c1", "x", "a1", rng, inits),
        helper.make_node("Relu", ["a1"], ["b1"], name="relu1"),
        helper.make_node("Reshape", ["b1", "sx_abs"], ["d1"], name="reshape1"),
        helper.make_node("Add", ["x", "d1"], ["r1"], name="add_dynamic_ok"),
        helper.make_node("Shape", ["r1"], ["sr"], name="shape2"),
        helper.make_node("Slice", ["sr", "zero", "two"], ["nc"], name="slice2"),
        helper.make_node("Concat", ["nc", "ones2"], ["pool_shape_raw"], name="concat2", axis=0),
        helper.make_node("Abs", ["pool_shape_raw"], ["pool_shape"], name="abs2"),
        _conv("c2", "r1", "a2", rng, inits),
        helper.make_node("Relu", ["a2"], ["b2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["b2"], ["p2"], name="pool2"),
        helper.make_node("Reshape", ["p2", "pool_shape"], ["d2"], name="reshape2"),
        helper.make_node("Add", ["r1", "d2"], ["r2"], name="add_dynamic_broadcast"),
        *_head("r2", rng, inits),
    ]
    model = _graph_model(nodes, inits, [("y", ["N", 5])])
    units = {u.name: u for u in depth._find_units(onnx_format.to_proto(model)).units}
    assert units["add_dynamic_ok"].runtime_shape_check
    pruned, report = depth.prune_depth_onnx(model, PruneConfig(method="depth", sparsity=0.99, calibration=_calib()))
    assert _removed(report) == ["add_dynamic_ok"]
    assert any(s.startswith("add_dynamic_broadcast") and "run time" in s for s in report.skipped)
    proto = onnx_format.to_proto(pruned)
    onnx.checker.check_model(proto, full_check=True)
    assert _session(proto).run(None, {"x": _calib(4, 1)})[0].shape == (1, 5)
