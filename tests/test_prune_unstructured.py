"""Weight layouts, unstructured / N:M pruning and channel zeroing."""
from __future__ import annotations

import math
import sys
from functools import lru_cache
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import nnc_tool
from nnc_tool.bench.runner import make_runner, predict
from nnc_tool.formats import onnx_format
from nnc_tool.graph.layout import WeightLayout, weight_layouts
from nnc_tool.model import Model, Tensor, TensorRole
from nnc_tool.prune import PruneConfig, prune
from nnc_tool.prune.channel_zero import zero_channels
from nnc_tool.prune.nm import prune_nm
from nnc_tool.prune.unstructured import GLOBAL_LAYER_CAP, MIN_ELEMENTS, prune_unstructured

from conftest import SAMPLES


@lru_cache(maxsize=None)
def _read(filename: str) -> Model:
    return nnc_tool.read_model(SAMPLES / filename)


def sample(filename: str) -> Model:
    """A fresh copy of a sample model (tests may not share mutable arrays by accident)."""
    model = _read(filename)
    return Model(model.format, model.topology, [Tensor(t.name, t.array.copy(), t.role) for t in model.tensors],
                 dict(model.metadata))


def snapshot(model: Model) -> dict[str, np.ndarray]:
    return {t.name: t.array.copy() for t in model.tensors}


def assert_unchanged(model: Model, before: dict[str, np.ndarray]) -> None:
    for t in model.tensors:
        assert t.array.dtype == before[t.name].dtype
        assert t.array.tobytes() == before[t.name].tobytes(), t.name


def eligible(model: Model) -> list[Tensor]:
    return [t for t in model.tensors if t.role == TensorRole.WEIGHT and t.array.size >= MIN_ELEMENTS]


def zeros(array: np.ndarray) -> int:
    return int(array.size - np.count_nonzero(array))


# ---- an ONNX graph with every layout the module knows (and some it must refuse) ----------------

def _init(name: str, shape: tuple[int, ...], seed: int) -> TensorProto:
    rng = np.random.default_rng(seed)
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def layout_model() -> Model:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])
    x3 = helper.make_tensor_value_info("x3", TensorProto.FLOAT, [3, 5, 16])
    xc = helper.make_tensor_value_info("xc", TensorProto.FLOAT, [1, 16, 4, 4])
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    out_shapes = {"a_out": [16, 2], "w3_out": [3, 5, 8], "ct_out": [1, 8, 6, 6], "shared_out": [2, 16],
                  "add_out": [2, 16], "if_out": [2, 4]}
    outs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in out_shapes.items()]
    then_graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "inner_w"], ["t_out"])], "then",
        [], [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [2, 4])], [_init("inner_w", (16, 4), 10)],
    )
    else_graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "outer_w"], ["e_out"])], "else",
        [], [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [2, 4])],
    )
    nodes = [
        helper.make_node("Gemm", ["x", "gemm_t1"], ["h1"], transB=1),           # [24,16]: out 0, in 1
        helper.make_node("Gemm", ["h1", "gemm_t0"], ["h2"], transB=0),          # [24,16]: out 1, in 0
        helper.make_node("MatMul", ["h2", "mm_second"], ["h3"]),                # [16,12]: out 1, in 0
        helper.make_node("Transpose", ["h3"], ["h3t"], perm=[1, 0]),            # [12,2]
        helper.make_node("MatMul", ["mm_first", "h3t"], ["h4"]),                # [8,12]: out 0, in 1
        helper.make_node("Gemm", ["gemm_a", "h4"], ["a_out"], transA=1),        # [8,16]: out 1, in 0
        helper.make_node("MatMul", ["x3", "mm_batched"], ["w3_out"]),           # [3,16,8]: out 2, in 1
        helper.make_node("ConvTranspose", ["xc", "convt"], ["ct_out"]),         # [16,8,3,3]: out 1, in 0
        helper.make_node("Gemm", ["x", "shared"], ["s1"], transB=1),            # disagreeing consumers
        helper.make_node("Gemm", ["x", "shared"], ["s2"], transB=0),
        helper.make_node("Add", ["s1", "s2"], ["shared_out"]),
        helper.make_node("Add", ["x", "added"], ["add_out"]),                   # no layout
        helper.make_node("If", ["cond"], ["if_out"], name="gate", then_branch=then_graph, else_branch=else_graph),
    ]
    inits = [
        _init("gemm_t1", (24, 16), 1), _init("gemm_t0", (24, 16), 2), _init("mm_second", (16, 12), 3),
        _init("mm_first", (8, 12), 4), _init("gemm_a", (8, 16), 5), _init("mm_batched", (3, 16, 8), 6),
        _init("convt", (16, 8, 3, 3), 7), _init("shared", (16, 16), 8), _init("added", (2, 16), 9),
        _init("outer_w", (16, 4), 11),
    ]
    graph = helper.make_graph(nodes, "layouts", [x, x3, xc, cond], outs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 9
    onnx.checker.check_model(proto, full_check=True)
    return onnx_format.from_proto(proto)


EXPECTED_ONNX = {
    "gemm_t1": WeightLayout(0, 1, (), "Gemm"),
    "gemm_t0": WeightLayout(1, 0, (), "Gemm"),
    "mm_second": WeightLayout(1, 0, (), "MatMul"),
    "mm_first": WeightLayout(0, 1, (), "MatMul"),
    "gemm_a": WeightLayout(1, 0, (), "Gemm"),
    "mm_batched": WeightLayout(2, 1, (), "MatMul"),
    "convt": WeightLayout(1, 0, (2, 3), "ConvTranspose"),
    "gate/then_branch/inner_w": WeightLayout(1, 0, (), "MatMul"),
    "outer_w": WeightLayout(1, 0, (), "MatMul"),
}


def test_onnx_layouts_from_consumers() -> None:
    model = layout_model()
    roles = {t.name: t.role for t in model.tensors}
    assert roles["shared"] == roles["added"] == roles["gate/then_branch/inner_w"] == TensorRole.WEIGHT
    assert weight_layouts(model) == EXPECTED_ONNX  # "shared" (disagreeing) and "added" (Add) omitted


def test_sample_layouts() -> None:
    lenet = weight_layouts(sample("lenet.onnx"))
    assert lenet == {
        "conv1.weight": WeightLayout(0, 1, (2, 3), "Conv"),
        "conv2.weight": WeightLayout(0, 1, (2, 3), "Conv"),
        "fc1.weight": WeightLayout(0, 1, (), "Gemm"),  # exported with transB=1
        "fc2.weight": WeightLayout(0, 1, (), "Gemm"),
    }
    for name in ("resnet", "mobilenet"):
        model = sample(f"{name}.onnx")
        layouts = weight_layouts(model)
        assert set(layouts) == {t.name for t in model.tensors if t.role == TensorRole.WEIGHT}
    torch_layouts = weight_layouts(sample("resnet_state_dict.pt"))
    assert torch_layouts["layer1.conv1.weight"] == WeightLayout(0, 1, (2, 3), "torch")
    assert torch_layouts["fc.weight"] == WeightLayout(0, 1, (), "torch")
    assert "layer1.bn1.weight" not in torch_layouts


# ---- unstructured ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lenet", "resnet", "mobilenet"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_layer_scope_exact_per_tensor(name: str, sparsity: float) -> None:
    model = sample(f"{name}.onnx")
    before = snapshot(model)
    pruned, report = prune(model, PruneConfig(sparsity=sparsity, scope="layer"))
    assert_unchanged(model, before)
    by_name = pruned.tensor_map()
    names = {t.name for t in eligible(model)}
    for t in model.tensors:
        out = by_name[t.name].array
        if t.name not in names:
            assert np.array_equal(out, t.array), t.name  # biases, BN parameters untouched
            continue
        assert zeros(out) == math.floor(sparsity * t.array.size + 0.5), t.name
        kept, dropped = np.abs(t.array[out != 0]), np.abs(t.array[out == 0])
        assert np.array_equal(out[out != 0], t.array[out != 0])
        assert dropped.max() <= kept.min()  # exactly the smallest magnitudes went
    assert report.parameters_before == report.parameters_after
    assert report.zeros_after == sum(zeros(t.array) for t in pruned.tensors if t.role != TensorRole.EXACT)


@pytest.mark.parametrize("name", ["lenet", "resnet", "mobilenet"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7, 0.9])
def test_global_scope_exact_overall_no_layer_wiped(name: str, sparsity: float) -> None:
    model = sample(f"{name}.onnx")
    pruned, _ = prune(model, PruneConfig(sparsity=sparsity, scope="global"))
    by_name = pruned.tensor_map()
    total = sum(t.array.size for t in eligible(model))
    zeroed = sum(zeros(by_name[t.name].array) for t in eligible(model))
    assert zeroed == math.floor(sparsity * total + 0.5)
    for t in eligible(model):
        out = by_name[t.name].array
        assert zeros(out) <= math.floor(GLOBAL_LAYER_CAP * t.array.size), t.name
        assert np.count_nonzero(out) > 0
    for t in model.tensors:
        if t.role != TensorRole.WEIGHT:
            assert np.array_equal(by_name[t.name].array, t.array)


def test_global_cap_binds_and_keeps_total() -> None:
    rng = np.random.default_rng(0)
    spiky = np.full((40, 25), 1e-6, np.float32)
    spiky.ravel()[:10] = 5.0  # 99 % of the layer is negligible next to its RMS
    model = Model("torch-state-dict", b"", [
        Tensor("a.weight", spiky, TensorRole.WEIGHT),
        Tensor("b.weight", rng.standard_normal((50, 40)).astype(np.float32), TensorRole.WEIGHT),
        Tensor("c.weight", rng.standard_normal((30, 30)).astype(np.float32) * 1e-3, TensorRole.WEIGHT),
    ])
    pruned, _ = prune(model, PruneConfig(sparsity=0.6, scope="global"))
    counts = [zeros(t.array) for t in pruned.tensors]
    assert counts[0] == math.floor(GLOBAL_LAYER_CAP * 1000)  # held at the cap
    assert sum(counts) == math.floor(0.6 * 3900 + 0.5)
    assert 0 < counts[2] < 900  # the small-scale layer is not wiped out


def test_ties_small_tensors_and_roles() -> None:
    model = Model("onnx", b"", [
        Tensor("flat", np.ones((8, 8), np.float32), TensorRole.WEIGHT),
        Tensor("tiny", np.arange(1, 13, dtype=np.float32).reshape(3, 4), TensorRole.WEIGHT),
        Tensor("bias", np.zeros(8, np.float32) + 0.01, TensorRole.NONWEIGHT),
        Tensor("shape", np.ones((4, 4), np.float32), TensorRole.EXACT),
    ])
    pruned, report = prune_unstructured(model, PruneConfig(sparsity=0.25), {})
    flat = pruned.tensors[0].array.ravel()
    assert np.array_equal(flat[:16], np.zeros(16)) and np.count_nonzero(flat[16:]) == 48  # lower index first
    assert any(s.startswith("tiny:") for s in report.skipped)
    for i in (1, 2, 3):
        assert pruned.tensors[i].array is model.tensors[i].array  # shared, untouched


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float64])
def test_dtypes_preserved(dtype) -> None:
    base = sample("lenet_state_dict.pt")
    model = Model(base.format, base.topology, [
        Tensor(t.name, t.array.astype(dtype) if t.is_float else t.array, t.role) for t in base.tensors
    ])
    before = snapshot(model)
    layouts = weight_layouts(model)
    results = [
        prune_unstructured(model, PruneConfig(sparsity=0.5), layouts),
        prune_unstructured(model, PruneConfig(sparsity=0.5, scope="global"), layouts),
        prune_nm(model, PruneConfig(method="nm", nm=(2, 4)), layouts),
        prune_nm(model, PruneConfig(method="nm", nm=(2, 4), nm_granularity="kernel"), layouts),
        zero_channels(model, PruneConfig(method="structured", sparsity=0.25), layouts),
    ]
    assert_unchanged(model, before)
    for pruned, _ in results:
        for t, o in zip(model.tensors, pruned.tensors):
            assert o.array.dtype == t.array.dtype and o.array.shape == t.array.shape
    fc1 = results[0][0].tensor_map()["fc1.weight"].array
    assert zeros(fc1) == fc1.size // 2


# ---- N:M -------------------------------------------------------------------------------------

def _rows(array: np.ndarray, layout: WeightLayout) -> np.ndarray:
    """[groups of rows, input] view: the input axis last, every other axis flattened."""
    moved = np.moveaxis(array, layout.in_axis, -1)
    return moved.reshape(-1, moved.shape[-1])


def check_nm(original: np.ndarray, pruned: np.ndarray, layout: WeightLayout, k: int, n: int) -> None:
    src, out = _rows(original.astype(np.float32), layout), _rows(pruned.astype(np.float32), layout)
    assert np.array_equal(out[out != 0], src[out != 0])  # kept weights unchanged
    columns = src.shape[1]
    for start in range(0, columns, n):
        width = min(n, columns - start)
        keep = k if width == n else math.ceil(k * width / n)
        block_src, block_out = np.abs(src[:, start:start + width]), np.abs(out[:, start:start + width])
        nonzero = np.count_nonzero(block_out, axis=1)
        assert (nonzero <= keep).all()
        dense = np.count_nonzero(block_src, axis=1) == width
        assert (nonzero[dense] == keep).all()
        kept_min = np.where(block_out != 0, block_src, np.inf).min(axis=1)
        dropped_max = np.where(block_out == 0, block_src, -np.inf).max(axis=1)
        assert (dropped_max <= kept_min).all()  # the largest magnitudes are the kept ones


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
@pytest.mark.parametrize("filename", ["lenet.onnx", "resnet.onnx", "mobilenet.onnx", "resnet_state_dict.pt"])
def test_nm_pattern_on_samples(filename: str, nm: tuple[int, int]) -> None:
    model = sample(filename)
    before = snapshot(model)
    layouts = weight_layouts(model)
    pruned, report = prune(model, PruneConfig(method="nm", nm=nm))
    assert_unchanged(model, before)
    by_name = pruned.tensor_map()
    checked = 0
    for t in model.tensors:
        if t.role != TensorRole.WEIGHT:
            assert np.array_equal(by_name[t.name].array, t.array)
            continue
        if t.array.shape[layouts[t.name].in_axis] == 1:
            assert any(s.startswith(t.name + ":") for s in report.skipped)  # depthwise
            continue
        check_nm(t.array, by_name[t.name].array, layouts[t.name], *nm)
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
def test_nm_pattern_on_gemm_and_matmul_layouts(nm: tuple[int, int]) -> None:
    model = layout_model()
    pruned, report = prune(model, PruneConfig(method="nm", nm=nm))
    by_name = pruned.tensor_map()
    for name, layout in EXPECTED_ONNX.items():
        check_nm(model.tensor_map()[name].array, by_name[name].array, layout, *nm)
    assert {s.split(":")[0] for s in report.skipped} == {"shared", "added"}
    # a transB=0 weight is grouped down its columns: each column of 24 holds 24*k/n weights
    cols = by_name["gemm_t0"].array
    assert (np.count_nonzero(cols, axis=0) == 24 * nm[0] // nm[1]).all()


def test_nm_partial_group() -> None:
    w = np.arange(1, 1 + 4 * 10, dtype=np.float32).reshape(4, 10)  # 10 inputs: groups 4, 4, 2
    model = Model("torch-state-dict", b"", [Tensor("fc.weight", w, TensorRole.WEIGHT)])
    pruned, _ = prune(model, PruneConfig(method="nm", nm=(1, 4)))
    out = pruned.tensors[0].array
    assert np.count_nonzero(out, axis=1).tolist() == [3, 3, 3, 3]  # 1 + 1 + ceil(1*2/4)
    assert np.array_equal(out[0] != 0, np.array([0, 0, 0, 1, 0, 0, 0, 1, 0, 1], bool))


@pytest.mark.parametrize("nm", [(2, 4), (1, 4)])
def test_nm_kernel_granularity_keeps_whole_kernels(nm: tuple[int, int]) -> None:
    k, n = nm
    model = sample("resnet.onnx")
    layouts = weight_layouts(model)
    pruned, _ = prune(model, PruneConfig(method="nm", nm=nm, nm_granularity="kernel"))
    by_name = pruned.tensor_map()
    for name in ("layer1.conv1.weight", "layer2.conv2.weight", "layer3.conv1.weight"):
        src, out = model.tensor_map()[name].array, by_name[name].array
        kernels_out = np.abs(out).sum(axis=(2, 3))  # [out, in]
        whole = (out == 0).all(axis=(2, 3)) | (out == src).all(axis=(2, 3))
        assert whole.all(), name
        per_group = np.count_nonzero(kernels_out.reshape(src.shape[0], -1, n), axis=2)
        assert (per_group == k).all(), name
        l1 = np.abs(src).sum(axis=(2, 3)).reshape(src.shape[0], -1, n)
        kept = kernels_out.reshape(l1.shape) != 0
        assert (np.where(kept, l1, np.inf).min(-1) >= np.where(kept, -np.inf, l1).max(-1)).all()
    fc_src, fc_out = model.tensor_map()["fc.weight"].array, by_name["fc.weight"].array
    check_nm(fc_src, fc_out, layouts["fc.weight"], k, n)  # no kernel axes: same as weight granularity


# ---- channel zeroing -------------------------------------------------------------------------

@pytest.mark.parametrize("importance", ["l1", "l2", "random", "bn"])
def test_channel_zero_rows_bias_and_batchnorm(importance: str) -> None:
    model = sample("resnet_state_dict.pt")
    before = snapshot(model)
    sparsity = 0.25
    pruned, report = prune(model, PruneConfig(method="structured", sparsity=sparsity, importance=importance))
    assert_unchanged(model, before)
    src, out = model.tensor_map(), pruned.tensor_map()
    assert any("keep their shape" in note for note in report.notes)
    assert (importance == "bn") == any("ranked by l1" in note for note in report.notes)
    assert np.array_equal(out["fc.weight"].array, src["fc.weight"].array)  # the output layer stays
    assert any(s.startswith("fc.weight:") for s in report.skipped)
    pairs = {"stem.0": "stem.1", "layer1.conv1": "layer1.bn1", "layer2.shortcut.0": "layer2.shortcut.1"}
    zeroed_rows = 0
    for t in model.tensors:
        if t.role != TensorRole.WEIGHT or t.name == "fc.weight":
            continue
        rows = out[t.name].array.reshape(t.array.shape[0], -1)
        dead = ~rows.any(axis=1)
        assert dead.sum() == math.floor(sparsity * t.array.shape[0] + 0.5), t.name
        assert np.array_equal(rows[~dead], src[t.name].array.reshape(rows.shape)[~dead])
        zeroed_rows += int(dead.sum())
        prefix = t.name[: -len(".weight")]
        if prefix in pairs:
            bn = pairs[prefix]
            for field in ("weight", "bias", "running_mean"):
                assert (out[f"{bn}.{field}"].array[dead] == 0).all()
                assert np.array_equal(out[f"{bn}.{field}"].array[~dead], src[f"{bn}.{field}"].array[~dead])
            assert np.array_equal(out[f"{bn}.running_var"].array, src[f"{bn}.running_var"].array)
    _, reports = nnc_tool.compress_model(pruned)
    assert sum(r.zero_rows for r in reports) >= zeroed_rows


def test_channel_zero_bias_and_dead_outputs_in_torch() -> None:
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(SAMPLES))
    from architectures import ARCHITECTURES

    for name, probe in (("lenet", "conv1"), ("resnet", "layer1.bn1")):
        model = sample(f"{name}_state_dict.pt")
        pruned, _ = prune(model, PruneConfig(method="structured", sparsity=0.5))
        if name == "lenet":
            bias = pruned.tensor_map()["conv1.bias"].array
            rows = pruned.tensor_map()["conv1.weight"].array.reshape(16, -1)
            assert (bias[~rows.any(axis=1)] == 0).all()
        net = ARCHITECTURES[name]().eval()
        net.load_state_dict({t.name: torch.from_numpy(t.array.copy()) for t in pruned.tensors})
        captured = {}

        def hook(module, inputs, output) -> None:
            captured["out"] = output

        net.get_submodule(probe).register_forward_hook(hook)
        x = torch.from_numpy(np.load(SAMPLES / "digits_test.npz")["x"][:32])
        with torch.no_grad():
            net(x)
        dead = (captured["out"] == 0).all(dim=(0, 2, 3))
        assert int(dead.sum()) >= captured["out"].shape[1] // 2  # zeroed channels output exactly 0


# ---- end to end ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lenet", "resnet"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_pruned_onnx_runs_accurately_and_codes_smaller(tmp_path: Path, name: str, scope: str, digits_test) -> None:
    x, y = digits_test
    model = sample(f"{name}.onnx")
    pruned, report = prune(model, PruneConfig(sparsity=0.5, scope=scope))
    path = tmp_path / f"{name}_pruned.onnx"
    nnc_tool.write_model(pruned, path)
    onnx.checker.check_model(str(path))
    accuracy = 100.0 * float((predict(make_runner(path, "onnx"), x).argmax(1) == y).mean())
    assert accuracy >= 90.0, f"{name} {scope}: {accuracy:.2f} %"
    reread = nnc_tool.read_model(path)
    assert sum(zeros(t.array) for t in reread.tensors) >= report.zeros_after
    assert len(nnc_tool.compress_model(pruned)[0]) < len(nnc_tool.compress_model(model)[0])
