"""ONNX reader/writer: exact round trips, roles by consumption, external data, damaged input."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnx_factory as factory  # noqa: E402

from nnc_tool.errors import FormatError  # noqa: E402
from nnc_tool.formats import onnx_format  # noqa: E402
from nnc_tool.model import Model, TensorRole  # noqa: E402

BUILDER_NAMES = sorted(factory.BUILDERS)
RUNNABLE = [n for n in BUILDER_NAMES if n not in factory.NOT_RUNNABLE]


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the steering model has a deliberately unused initializer
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _feeds(name: str, path: Path) -> list[dict[str, np.ndarray]]:
    feeds = [factory.sample_inputs(path, seed) for seed in range(3)]
    if name == "build_if_subgraph":  # make sure both branches run
        feeds += [{"x": np.full((1, 4), sign, np.float32)} for sign in (1.0, -1.0)]
    return feeds


def _build(name: str, directory: Path) -> Path:
    builder: Callable[[Path], Path] = factory.BUILDERS[name]
    return builder(directory)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("name", BUILDER_NAMES)
def test_round_trip_is_exact(name: str, tmp_path: Path) -> None:
    src = _build(name, tmp_path / "src")
    model = onnx_format.read(src)
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    onnx_format.write(model, out)

    onnx.checker.check_model(str(out), full_check=True)
    again = onnx_format.read(out)
    assert again.topology == model.topology  # graph, opsets, ir_version, producer, metadata_props
    assert again.metadata == model.metadata
    assert [t.name for t in again.tensors] == [t.name for t in model.tensors]
    for before, after in zip(model.tensors, again.tensors):
        assert _same_bits(before.array, after.array), before.name
        assert before.role == after.role

    original = onnx.load_model(src)
    rebuilt = onnx.load_model(out)
    assert rebuilt.ir_version == original.ir_version
    assert rebuilt.producer_name == original.producer_name == "nnc-tests"
    assert rebuilt.doc_string == original.doc_string
    opsets = [(o.domain, o.version) for o in original.opset_import]
    assert [(o.domain, o.version) for o in rebuilt.opset_import] == opsets
    assert {p.key: p.value for p in rebuilt.metadata_props} == {"author": "nnc tests", "purpose": "round trip"}
    assert [n.op_type for n in rebuilt.graph.node] == [n.op_type for n in original.graph.node]
    assert [t.name for t in rebuilt.graph.initializer] == [t.name for t in original.graph.initializer]

    if name in RUNNABLE:
        for feeds in _feeds(name, src):
            for a, b in zip(_run(src, feeds), _run(out, feeds)):
                assert _same_bits(a, b)


@pytest.mark.parametrize("name", BUILDER_NAMES)
def test_roles_by_consumption(name: str, tmp_path: Path) -> None:
    model = onnx_format.read(_build(name, tmp_path))
    assert {t.name: t.role for t in model.tensors} == factory.EXPECTED_ROLES[name]


def test_dtypes_are_kept(tmp_path: Path) -> None:
    fp16 = onnx_format.read(factory.build_fp16(tmp_path / "a")).tensor_map()
    assert fp16["conv.weight"].array.dtype == np.float16
    assert fp16["flatten.shape"].array.dtype == np.int64
    bf16 = onnx_format.read(factory.build_bf16(tmp_path / "b")).tensor_map()
    assert bf16["lin.weight"].array.dtype == np.dtype(ml_dtypes.bfloat16)
    assert bf16["lin.weight"].dtype == "bfloat16"
    assert bf16["lin.weight"].array.shape == (16, 8)
    loop = onnx_format.read(factory.build_loop(tmp_path / "c")).tensor_map()
    assert loop["loop.cond"].array.dtype == np.bool_ and loop["loop.cond"].array.shape == ()
    for tensor in loop.values():
        assert tensor.array.flags.writeable and tensor.array.flags.c_contiguous


def test_constant_nodes_written_back_as_constants(tmp_path: Path) -> None:
    model = onnx_format.read(factory.build_conv_bn_gemm_constants(tmp_path))
    out = tmp_path / "out.onnx"
    onnx_format.write(model, out)
    proto = onnx.load_model(out)
    assert not proto.graph.initializer
    constants = {n.output[0] for n in proto.graph.node if n.op_type == "Constant"}
    assert constants == set(factory.CONV_BN_GEMM_ROLES)


@pytest.mark.parametrize("name", BUILDER_NAMES)
def test_topology_holds_no_weight_bytes(name: str, tmp_path: Path) -> None:
    model = onnx_format.read(_build(name, tmp_path))
    for tensor in model.tensors:
        if tensor.array.nbytes >= 16:
            assert tensor.array.tobytes()[:16] not in model.topology, tensor.name
    weight_bytes = sum(t.array.nbytes for t in model.tensors)
    if weight_bytes > 10_000:
        assert len(model.topology) * 10 < weight_bytes


def test_subgraph_names_are_unique_and_stable(tmp_path: Path) -> None:
    # A main-graph initializer literally named like the qualified subgraph tensor forces the
    # subgraph one to take a suffix; reading the written model must give the same names.
    src = factory.build_if_subgraph(tmp_path)
    proto = onnx.load_model(src)
    clash = np.arange(16, dtype=np.float32).reshape(4, 4)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(clash, "gate/then_branch/w"))
    crafted = tmp_path / "clash.onnx"
    onnx.save_model(proto, crafted)

    model = onnx_format.read(crafted)
    names = [t.name for t in model.tensors]
    assert len(names) == len(set(names))
    tensors = model.tensor_map()
    assert np.array_equal(tensors["gate/then_branch/w"].array, clash)
    assert tensors["gate/then_branch/w"].role == TensorRole.EXACT  # unconsumed
    assert tensors["gate/then_branch/w#2"].role == TensorRole.WEIGHT
    assert not np.array_equal(tensors["w"].array, tensors["gate/then_branch/w#2"].array)

    out = tmp_path / "out.onnx"
    onnx_format.write(model, out)
    again = onnx_format.read(out)
    assert [t.name for t in again.tensors] == names
    for a, b in zip(model.tensors, again.tensors):
        assert _same_bits(a.array, b.array)


def test_external_data_round_trip(tmp_path: Path) -> None:
    src = factory.build_external_data(tmp_path / "src")
    model = onnx_format.read(src)
    assert model.metadata[onnx_format.META_EXTERNAL_DATA] == "1"

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "X.onnx"
    onnx_format.write(model, out)
    assert sorted(p.name for p in out_dir.iterdir()) == ["X.onnx", "X.onnx.data"]  # no temp files left

    proto = onnx.load_model(out, load_external_data=False)
    locations = {
        t.name: {e.key: e.value for e in t.external_data}.get("location")
        for t in proto.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
    }
    assert "fc.weight" in locations  # conv.weight (864 bytes) is below the 1 KiB threshold, stays inline
    assert set(locations.values()) == {"X.onnx.data"}
    assert out.stat().st_size < 4096  # the weights live in the data file
    onnx.checker.check_model(str(out), full_check=True)

    for feeds in _feeds("build_external_data", src):
        for a, b in zip(_run(src, feeds), _run(out, feeds)):
            assert _same_bits(a, b)
    again = onnx_format.read(out)
    for a, b in zip(model.tensors, again.tensors):
        assert _same_bits(a.array, b.array)


def test_inline_model_writes_single_file(tmp_path: Path) -> None:
    model = onnx_format.read(factory.build_conv_bn_gemm(tmp_path / "src"))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    onnx_format.write(model, out_dir / "m.onnx")
    assert [p.name for p in out_dir.iterdir()] == ["m.onnx"]


def test_missing_external_data_file(tmp_path: Path) -> None:
    src = factory.build_external_data(tmp_path)
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(FormatError) as info:
        onnx_format.read(src)
    assert info.value.path == str(src)
    assert "weights.bin" in str(info.value) and "missing" in str(info.value)


def test_truncated_external_data_file(tmp_path: Path) -> None:
    src = factory.build_external_data(tmp_path)
    data = tmp_path / "weights.bin"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(FormatError) as info:
        onnx_format.read(src)
    assert info.value.path == str(src)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["build_conv_bn_gemm", "build_fp16", "build_if_subgraph", "build_loop", "build_scan"])
def test_small_weight_changes_change_outputs_slightly(name: str, tmp_path: Path) -> None:
    src = _build(name, tmp_path / "src")
    model = onnx_format.read(src)
    rng = np.random.default_rng(7)
    tensors = []
    for tensor in model.tensors:
        array = tensor.array
        if tensor.role == TensorRole.WEIGHT:
            noise = 1e-3 * float(np.abs(array.astype(np.float32)).max()) * rng.standard_normal(array.shape)
            array = (array.astype(np.float32) + noise.astype(np.float32)).astype(array.dtype)
        tensors.append(type(tensor)(tensor.name, array, tensor.role))
    out = tmp_path / "perturbed.onnx"
    onnx_format.write(Model(model.format, model.topology, tensors, dict(model.metadata)), out)
    onnx.checker.check_model(str(out), full_check=True)

    changed = False
    for feeds in _feeds(name, src):
        for a, b in zip(_run(src, feeds), _run(out, feeds)):
            a32, b32 = a.astype(np.float32), b.astype(np.float32)
            scale = float(np.abs(a32).max()) + 1e-6
            assert float(np.abs(a32 - b32).max()) < 0.05 * scale
            changed |= not np.array_equal(a32, b32)
    assert changed


def test_write_rejects_mismatched_tensors_without_leaving_files(tmp_path: Path) -> None:
    model = onnx_format.read(factory.build_conv_bn_gemm(tmp_path / "src"))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    missing = Model(model.format, model.topology, model.tensors[1:], dict(model.metadata))
    with pytest.raises(FormatError, match="missing: conv.weight"):
        onnx_format.write(missing, out_dir / "m.onnx")
    tensors = [t if t.name != "fc.weight" else type(t)(t.name, t.array[:3], t.role) for t in model.tensors]
    with pytest.raises(FormatError, match="fc.weight"):
        onnx_format.write(Model(model.format, model.topology, tensors, {}), out_dir / "m.onnx")
    assert list(out_dir.iterdir()) == []


def test_write_casts_float_precision_back(tmp_path: Path) -> None:
    # A decoder may hand back float32 for an fp16 tensor; the file must keep the declared dtype.
    model = onnx_format.read(factory.build_fp16(tmp_path / "src"))
    widened = [type(t)(t.name, t.array.astype(np.float32) if t.is_float else t.array, t.role) for t in model.tensors]
    out = tmp_path / "out.onnx"
    onnx_format.write(Model(model.format, model.topology, widened, dict(model.metadata)), out)
    again = onnx_format.read(out)
    for a, b in zip(model.tensors, again.tensors):
        assert _same_bits(a.array, b.array)


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.onnx"
    path.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    with pytest.raises(FormatError) as info:
        onnx_format.read(path)
    assert info.value.path == str(path) and "\n" not in str(info.value)


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a model\n")
    with pytest.raises(FormatError):
        onnx_format.read(path)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_truncated_file(fraction: float, tmp_path: Path) -> None:
    src = factory.build_conv_bn_gemm(tmp_path / "src")
    data = src.read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(FormatError) as info:
        onnx_format.read(path)
    assert info.value.path == str(path) and "\n" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="no such file"):
        onnx_format.read(tmp_path / "nope.onnx")


def _loop_with_carried_shape(directory: Path) -> Path:
    """Loop carrying h and a float shape; only the shape's chain reaches a Reshape."""
    from onnx import TensorProto, helper, numpy_helper

    body = helper.make_graph(
        [
            helper.make_node("Cast", ["sh_in"], ["sh_i"], to=TensorProto.INT64),
            helper.make_node("Reshape", ["h_in", "sh_i"], ["r"]),
            helper.make_node("MatMul", ["r", "w"], ["m"]),
            helper.make_node("Tanh", ["m"], ["h_out"]),
            helper.make_node("Identity", ["sh_in"], ["sh_out"]),
            helper.make_node("Identity", ["c_in"], ["c_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("sh_in", TensorProto.FLOAT, [2]),
        ],
        [
            helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("sh_out", TensorProto.FLOAT, [2]),
        ],
    )
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trip", "", "x", "shape0"], ["y", "sh_final"], name="loop", body=body)],
        "carried",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [
            numpy_helper.from_array(np.array(2, np.int64), "trip"),
            numpy_helper.from_array(np.array([1.0, 4.0], np.float32), "shape0"),
            numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", factory.OPSET)])
    model.ir_version = factory.IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    path = directory / "carried.onnx"
    onnx.save_model(model, path)
    return path


def test_loop_carried_values_are_tracked_position_by_position(tmp_path: Path) -> None:
    src = _loop_with_carried_shape(tmp_path)
    model = onnx_format.read(src)
    roles = {t.name: t.role for t in model.tensors}
    assert roles == {"trip": TensorRole.EXACT, "shape0": TensorRole.EXACT, "w": TensorRole.WEIGHT}
    out = tmp_path / "out.onnx"
    onnx_format.write(model, out)
    feeds = {"x": np.ones((1, 4), np.float32)}
    for a, b in zip(_run(src, feeds), _run(out, feeds)):
        assert _same_bits(a, b)


@pytest.mark.parametrize("name", ["build_conv_bn_gemm", "build_conv_bn_gemm_constants"])
def test_oversized_models_switch_to_external_data(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Stand-in for a >= 2 GB model: lower the protobuf limit instead of allocating gigabytes.
    src = _build(name, tmp_path / "src")
    model = onnx_format.read(src)
    assert model.metadata[onnx_format.META_EXTERNAL_DATA] == "0"
    monkeypatch.setattr(onnx_format, "_PROTO_LIMIT", 4096)
    out = tmp_path / "big.onnx"
    onnx_format.write(model, out)
    assert (tmp_path / "big.onnx.data").stat().st_size >= model.tensor_map()["fc.weight"].array.nbytes
    assert out.stat().st_size < 4096
    onnx.checker.check_model(str(out), full_check=True)
    for feeds in _feeds(name, src):
        for a, b in zip(_run(src, feeds), _run(out, feeds)):
            assert _same_bits(a, b)


def test_external_data_outside_model_directory(tmp_path: Path) -> None:
    src = factory.build_external_data(tmp_path / "models")
    proto = onnx.load_model(src, load_external_data=False)
    (tmp_path / "weights.bin").write_bytes((tmp_path / "models" / "weights.bin").read_bytes())
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../weights.bin"
    crafted = tmp_path / "models" / "escape.onnx"
    crafted.write_bytes(proto.SerializeToString())
    with pytest.raises(FormatError) as info:
        onnx_format.read(crafted)
    assert info.value.path == str(crafted)


def test_external_data_is_mapped_not_copied(tmp_path: Path) -> None:
    """Externally stored weights are read-only views of the data file, and coding releases their pages."""
    from nnc_tool.fileio import release_pages

    src = factory.build_external_data(tmp_path / "src")
    tensor = onnx_format.read(src).tensor_map()["fc.weight"]
    assert not tensor.array.flags.writeable and not tensor.array.flags.owndata
    expected = onnx.numpy_helper.to_array(
        next(t for t in onnx.load_model(src).graph.initializer if t.name == "fc.weight")
    )
    np.testing.assert_array_equal(tensor.array, expected)
    release_pages(tensor.array)  # drops pages, never the data
    np.testing.assert_array_equal(tensor.array, expected)


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc to read the resident set")
def test_release_pages_lowers_resident_memory(tmp_path: Path) -> None:
    from nnc_tool.fileio import map_file, release_pages

    data = tmp_path / "w.bin"
    data.write_bytes(np.arange(8 << 20, dtype=np.float32).tobytes())  # 32 MB
    array = np.frombuffer(map_file(data), dtype=np.float32)

    def resident_mb() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6

    before = resident_mb()
    assert float(array.sum()) > 0  # touches every page
    touched = resident_mb()
    release_pages(array.reshape(1024, -1))
    assert touched - before > 24
    assert resident_mb() < touched - 24
    release_pages(np.zeros(10))  # plain memory: nothing to do
