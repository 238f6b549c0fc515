"""Reading and writing PyTorch (state_dict, TorchScript, torch.export) and safetensors files."""
from __future__ import annotations

import collections
import io
import json
import lzma
import math
import shutil
import struct
import sys
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch_factory as tf  # noqa: E402

from nnc_tool.errors import FormatError  # noqa: E402
from nnc_tool.formats import FORMATS, detect_format, read_model  # noqa: E402
from nnc_tool.formats import safetensors_format, torch_format  # noqa: E402
from nnc_tool.model import Model, TensorRole  # noqa: E402

# torch 2.13 marks TorchScript deprecated; we still have to read and write it.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")

STATE_DICT_BUILDERS = ["state_dict", "state_dict_legacy", "state_dict_fp16", "state_dict_bf16", "checkpoint", "tied_state_dict"]
SAFETENSORS_BUILDERS = ["safetensors", "safetensors_fp16", "safetensors_bf16"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every factory file, built once per module (export takes a second or two)."""
    directory = tmp_path_factory.mktemp("torch_models")
    return {key: builder(directory) for key, (builder, _) in tf.BUILDERS.items()}


def roundtrip(path: Path, out_dir: Path, model: Model | None = None) -> Path:
    model = read_model(path) if model is None else model
    out = out_dir / f"out_{path.name}"
    FORMATS[model.format].write(model, out)
    return out


def load_sd(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tree(a: Any, b: Any, where: str = "") -> None:
    """Same container types, key order, dtypes, shapes and values all the way down."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), where
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}/{key}")
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), where
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}/{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def assert_one_line_error(excinfo: pytest.ExceptionInfo[FormatError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# --------------------------------------------------------------------------- state_dicts


@pytest.mark.parametrize("key", STATE_DICT_BUILDERS)
def test_state_dict_roundtrip_is_identical(files: dict[str, Path], tmp_path: Path, key: str) -> None:
    original = files[key]
    out = roundtrip(original, tmp_path)
    assert_same_tree(load_sd(original), load_sd(out))
    # The legacy (pre-zip) layout stays legacy so old readers keep working.
    assert (original.read_bytes()[:4] == b"PK\x03\x04") == (out.read_bytes()[:4] == b"PK\x03\x04")
    # And our own reading of the output gives exactly the same Model tensors.
    first, second = read_model(original), read_model(out)
    assert first.topology == second.topology
    for a, b in zip(first.tensors, second.tensors, strict=True):
        assert (a.name, a.role, a.array.dtype, a.array.shape) == (b.name, b.role, b.array.dtype, b.array.shape)
        assert a.array.tobytes() == b.array.tobytes()


def test_unusual_checkpoint_values_roundtrip(tmp_path: Path) -> None:
    big = torch.arange(20.0)
    weight = torch.nn.Parameter(torch.randn(3, 3))
    checkpoint = {
        "param": weight,
        "alias": weight,
        "grad": torch.randn(2, requires_grad=True),
        "transposed": torch.randn(3, 4).t(),
        "head": big[:10],
        "tail": big[10:],
        "empty": torch.zeros(0, 3),
        "u16": torch.tensor([1, 65535], dtype=torch.uint16),
        "mask": torch.tensor([True, False]),
        "f64": torch.randn(2, 2, dtype=torch.float64),
        "scalar": torch.tensor(3.5),
        3: "int key",
        2.5: "float key",
        None: "none key",
        (1, "x"): "tuple key",
        "set": {1, 2},
        "bytes": b"\x00\x01",
        "complex": 1 + 2j,
        "size": torch.Size([1, 2]),
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "inf": float("inf"),
        "huge": 2**70,
        "nested": [[{"k.x": torch.ones(2)}]],
    }
    path = tmp_path / "odd.pt"
    torch.save(checkpoint, path)
    model = read_model(path)
    assert "alias" not in model.tensor_map() and "nested/0/0/k.x" in model.tensor_map()
    assert model.tensor_map()["u16"].role == TensorRole.EXACT
    assert model.tensor_map()["transposed"].array.shape == (4, 3)
    original, written = load_sd(path), load_sd(roundtrip(path, tmp_path))
    assert_same_tree(original, written)
    assert type(written["param"]) is torch.nn.Parameter and written["grad"].requires_grad
    assert written["alias"].data_ptr() == written["param"].data_ptr()


def test_state_dict_loads_into_model(files: dict[str, Path], tmp_path: Path) -> None:
    model = tf.make_cnn()
    model.load_state_dict(load_sd(roundtrip(files["state_dict"], tmp_path)))
    reference = tf.make_cnn()
    x = tf.example_input()
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_state_dict_roles_names_and_arrays(files: dict[str, Path]) -> None:
    model = read_model(files["state_dict"])
    assert model.format == "torch-state-dict"
    state = tf.make_cnn().state_dict()
    assert [t.name for t in model.tensors] == list(state.keys())
    roles = {t.name: t.role for t in model.tensors}
    assert roles["conv1.weight"] == roles["fc.weight"] == TensorRole.WEIGHT
    assert roles["conv1.bias"] == roles["bn1.weight"] == roles["bn1.running_var"] == TensorRole.NONWEIGHT
    assert roles["bn1.num_batches_tracked"] == TensorRole.EXACT
    for tensor in model.tensors:
        assert tensor.array.flags.c_contiguous and tensor.array.flags.owndata
        np.testing.assert_array_equal(tensor.array, state[tensor.name].numpy())


@pytest.mark.parametrize(("key", "dtype"), [("state_dict_fp16", np.float16), ("state_dict_bf16", ml_dtypes.bfloat16)])
def test_half_precision_dtypes_are_kept(files: dict[str, Path], key: str, dtype: Any) -> None:
    model = read_model(files[key])
    floats = [t for t in model.tensors if t.role != TensorRole.EXACT]
    assert floats and all(t.array.dtype == np.dtype(dtype) for t in floats)
    state = load_sd(files[key])
    weight = model.tensor_map()["conv2.weight"].array
    # Bit patterns must match exactly: bfloat16 never goes through float32.
    assert weight.view(np.int16).tobytes() == state["conv2.weight"].view(torch.int16).numpy().tobytes()


def test_checkpoint_structure_and_names(files: dict[str, Path]) -> None:
    model = read_model(files["checkpoint"])
    names = [t.name for t in model.tensors]
    assert len(names) == len(set(names))
    assert "model/conv1.weight" in names and "extra.stats/mean.value" in names
    assert any(name.startswith("optimizer/state/0/exp_avg") for name in names)
    # Plain values live in the JSON topology, not in tensors.
    header, _ = torch_format._unpack_topology(files["checkpoint"], model.topology)
    text = json.dumps(header["root"])
    for fragment in ('"epoch"', '"note"', '"a.b"', '"lr"'):
        assert fragment in text


def test_tied_weights_stay_shared(files: dict[str, Path], tmp_path: Path) -> None:
    model = read_model(files["tied_state_dict"])
    assert [t.name for t in model.tensors] == ["embed.weight", "norm.weight", "norm.bias"]
    out = roundtrip(files["tied_state_dict"], tmp_path)
    state = load_sd(out)
    assert state["head.weight"].data_ptr() == state["embed.weight"].data_ptr()
    assert state["embed_head_rows"].untyped_storage().data_ptr() == state["embed.weight"].untyped_storage().data_ptr()
    assert torch.equal(state["embed_head_rows"], state["embed.weight"][:10])


def test_changed_values_are_written(files: dict[str, Path], tmp_path: Path) -> None:
    model = read_model(files["tied_state_dict"])
    embed = model.tensor_map()["embed.weight"]
    embed.array = np.full_like(embed.array, 0.25)
    state = load_sd(roundtrip(files["tied_state_dict"], tmp_path, model))
    for key in ("embed.weight", "head.weight", "embed_head_rows"):
        assert bool((state[key] == 0.25).all()), key


def test_write_refuses_wrong_tensors(files: dict[str, Path], tmp_path: Path) -> None:
    model = read_model(files["state_dict"])
    out = tmp_path / "bad.pt"
    model.tensors[0].array = model.tensors[0].array[:1]
    with pytest.raises(FormatError, match="shape"):
        torch_format.write(model, out)
    model.tensors.pop(0)
    with pytest.raises(FormatError, match="missing"):
        torch_format.write(model, out)
    assert list(tmp_path.iterdir()) == []  # nothing half written


# --------------------------------------------------------------------------- archives


@pytest.mark.parametrize("key", ["torchscript", "torch_export"])
def test_archive_roundtrip_runs_identically(files: dict[str, Path], tmp_path: Path, key: str) -> None:
    original, out = files[key], roundtrip(files[key], tmp_path)
    x = tf.example_input()
    with torch.no_grad():
        if key == "torchscript":
            before, after = torch.jit.load(original)(x), torch.jit.load(out)(x)
            extra = {"notes.txt": ""}
            torch.jit.load(out, _extra_files=extra)
            assert extra["notes.txt"] == b"seeded test model"
        else:
            before, after = torch.export.load(original).module()(x), torch.export.load(out).module()(x)
    assert torch.equal(before, after)
    assert torch.equal(after, tf.make_cnn()(x).detach())


@pytest.mark.parametrize(("key", "kind"), [("torchscript", "torchscript"), ("torch_export", "torch-export")])
def test_archive_tensors_roles_and_topology(files: dict[str, Path], key: str, kind: str) -> None:
    model = read_model(files[key])
    assert model.format == kind
    state = tf.make_cnn().state_dict()
    got = model.tensor_map()
    assert set(got) == set(state)
    for name, tensor in state.items():
        np.testing.assert_array_equal(got[name].array, tensor.numpy())
    assert got["conv2.weight"].role == TensorRole.WEIGHT
    assert got["bn2.running_mean"].role == TensorRole.NONWEIGHT
    assert got["bn2.num_batches_tracked"].role == TensorRole.EXACT
    weight_bytes = sum(t.array.nbytes for t in model.tensors)
    assert model.parameter_count >= 50_000
    assert len(lzma.compress(model.topology)) < 0.2 * weight_bytes


def test_torchscript_topology_holds_no_weights(files: dict[str, Path]) -> None:
    model = read_model(files["torchscript"])
    _, blob = torch_format._unpack_topology(files["torchscript"], model.topology)
    module = torch.jit.load(io.BytesIO(blob))
    assert all(not t.any() for t in module.state_dict().values())


def test_torch_export_topology_holds_no_weights(files: dict[str, Path]) -> None:
    model = read_model(files["torch_export"])
    _, blob = torch_format._unpack_topology(files["torch_export"], model.topology)
    program = torch.export.load(io.BytesIO(blob))
    assert all(not t.any() for t in program.state_dict.values())


@pytest.mark.parametrize("key", ["tied_torchscript", "tied_torch_export"])
def test_archive_tied_weights(files: dict[str, Path], tmp_path: Path, key: str) -> None:
    model = read_model(files[key])
    assert [t.name for t in model.tensors] == ["embed.weight", "norm.weight", "norm.bias"]
    embed = model.tensor_map()["embed.weight"]
    embed.array = embed.array * 2
    out = roundtrip(files[key], tmp_path, model)
    module = torch.jit.load(out) if key == "tied_torchscript" else torch.export.load(out).module()
    reference = tf.make_tied_lm()
    with torch.no_grad():
        reference.embed.weight.mul_(2)
        assert torch.equal(module(tf.example_tokens()), reference(tf.example_tokens()))
    state = module.state_dict()
    assert torch.equal(state["head.weight"], state["embed.weight"])


def test_torch_export_constants_are_exact(tmp_path: Path) -> None:
    class WithConstant(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.register_buffer("mask", torch.tensor([1.0, 0.0, 1.0, 0.0]), persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * self.mask

    torch.manual_seed(0)
    module, x = WithConstant().eval(), torch.randn(2, 4)
    path = tmp_path / "const.pt2"
    torch.export.save(torch.export.export(module, (x,)), path)
    model = read_model(path)
    assert model.tensor_map()["mask"].role == TensorRole.EXACT
    out = roundtrip(path, tmp_path)
    with torch.no_grad():
        assert torch.equal(torch.export.load(out).module()(x), module(x))


# --------------------------------------------------------------------------- safetensors


@pytest.mark.parametrize("key", SAFETENSORS_BUILDERS)
def test_safetensors_roundtrip_is_byte_identical(files: dict[str, Path], tmp_path: Path, key: str) -> None:
    from safetensors import safe_open

    model = read_model(files[key])
    assert model.format == "safetensors"
    out = roundtrip(files[key], tmp_path, model)
    assert out.read_bytes() == files[key].read_bytes()
    with safe_open(str(files[key]), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "source": "tests.torch_factory"}
        names = list(f.keys())
        assert sorted(t.name for t in model.tensors) == sorted(names)
        for tensor in model.tensors:
            expected = f.get_tensor(tensor.name)
            assert list(expected.shape) == list(tensor.array.shape)
            assert tensor.array.tobytes() == expected.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
            assert tensor.array.flags.owndata
    assert json.loads(model.topology)["__metadata__"]["source"] == "tests.torch_factory"


def test_safetensors_dtypes_and_roles(files: dict[str, Path]) -> None:
    tensors = read_model(files["safetensors_bf16"]).tensor_map()
    assert tensors["conv1.weight"].array.dtype == np.dtype(ml_dtypes.bfloat16)
    assert tensors["conv1.weight"].role == TensorRole.WEIGHT
    assert tensors["bn1.bias"].role == TensorRole.NONWEIGHT
    assert tensors["bn1.num_batches_tracked"].role == TensorRole.EXACT
    assert tensors["bn1.num_batches_tracked"].array.shape == ()


def test_safetensors_changed_values(files: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    model = read_model(files["safetensors_fp16"])
    target = model.tensor_map()["fc.weight"]
    target.array = np.ones_like(target.array)
    out = roundtrip(files["safetensors_fp16"], tmp_path, model)
    loaded = load_file(out)
    assert loaded["fc.weight"].dtype == torch.float16 and bool((loaded["fc.weight"] == 1).all())
    assert torch.equal(loaded["conv1.weight"], load_file(files["safetensors_fp16"])["conv1.weight"])


def test_safetensors_key_order_kept(tmp_path: Path) -> None:
    # A hand-written header whose key order is neither alphabetical nor by offset.
    header = {
        "zeta": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
        "__metadata__": {"k": "v"},
        "alpha": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]},
    }
    text = json.dumps(header).encode()
    data = np.array([7], np.int64).tobytes() + np.array([1.5, -2], np.float32).tobytes()
    path = tmp_path / "order.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    model = read_model(path)
    assert [t.name for t in model.tensors] == ["zeta", "alpha"]
    np.testing.assert_array_equal(model.tensors[0].array, [1.5, -2])
    assert roundtrip(path, tmp_path).read_bytes() == path.read_bytes()


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    ("key", "suffix"),
    [
        ("state_dict", ".bin"),
        ("state_dict_legacy", ".ckpt"),
        ("checkpoint", ".pth"),
        ("torchscript", ".pth"),
        ("torch_export", ".pt"),
        ("safetensors", ".bin"),
    ],
)
def test_detect_format_ignores_suffix(files: dict[str, Path], tmp_path: Path, key: str, suffix: str) -> None:
    disguised = tmp_path / f"model{suffix}"
    shutil.copyfile(files[key], disguised)
    expected = tf.BUILDERS[key][1]
    assert detect_format(disguised) == expected
    assert read_model(disguised).format == expected


@pytest.mark.parametrize("key", ["tied_state_dict", "torchscript", "torch_export", "safetensors", "checkpoint"])
def test_written_files_are_detected(files: dict[str, Path], tmp_path: Path, key: str) -> None:
    assert detect_format(roundtrip(files[key], tmp_path)) == tf.BUILDERS[key][1]


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("legacy", [False, True])
def test_pickled_module_is_refused(tmp_path: Path, legacy: bool) -> None:
    path = tf.build_pickled_module(tmp_path)
    if legacy:
        torch.save(tf.make_cnn(), path, _use_new_zipfile_serialization=False)
    assert detect_format(path) == "torch-state-dict"
    with pytest.raises(FormatError) as excinfo:
        read_model(path)
    message = assert_one_line_error(excinfo)
    assert "unpickle" in message and "weights_only" in message and "SmallCNN" in message


def _truncated(source: Path, directory: Path, fraction: float = 0.5) -> Path:
    data = source.read_bytes()
    path = directory / f"truncated_{source.name}"
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


@pytest.mark.parametrize(
    ("key", "kind"),
    [
        ("state_dict", "torch-state-dict"),
        ("state_dict_legacy", "torch-state-dict"),
        ("torchscript", "torchscript"),
        ("torch_export", "torch-export"),
    ],
)
@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.99])
def test_truncated_torch_files(files: dict[str, Path], tmp_path: Path, key: str, kind: str, fraction: float) -> None:
    path = _truncated(files[key], tmp_path, fraction)
    with pytest.raises(FormatError) as excinfo:
        torch_format.read(path, kind)
    assert_one_line_error(excinfo)


@pytest.mark.parametrize("kind", torch_format.KINDS)
@pytest.mark.parametrize("content", [b"\x80\x02garbage" * 50, b"PK\x03\x04" + bytes(range(256)) * 4, bytes(1000), b"\x00"])
def test_garbage_torch_files(tmp_path: Path, kind: str, content: bytes) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(FormatError) as excinfo:
        torch_format.read(path, kind)
    assert_one_line_error(excinfo)


def test_wrong_kind_is_refused(files: dict[str, Path]) -> None:
    with pytest.raises(FormatError):
        torch_format.read(files["torchscript"], "torch-state-dict")
    with pytest.raises(FormatError):
        torch_format.read(files["state_dict"], "torchscript")
    with pytest.raises(FormatError):
        torch_format.read(files["torchscript"], "torch-export")


@pytest.mark.parametrize("fraction", [0.001, 0.3, 0.999])
def test_truncated_safetensors(files: dict[str, Path], tmp_path: Path, fraction: float) -> None:
    path = _truncated(files["safetensors"], tmp_path, fraction)
    with pytest.raises(FormatError) as excinfo:
        safetensors_format.read(path)
    assert_one_line_error(excinfo)


def _st(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


@pytest.mark.parametrize(
    "content",
    [
        struct.pack("<Q", 2**40) + b"{}",  # header length beyond the file
        struct.pack("<Q", 2**64 - 1) + b"{}" * 10,  # absurd header length
        b"\x05\x00",  # shorter than the length field
        _st(b"not json"),
        _st(b"[]"),  # JSON, but not an object
        _st(b"\xff\xfe{}"),  # not UTF-8
        _st(b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', bytes(8)),  # data cut short
        _st(b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}', bytes(8)),  # offsets vs shape
        _st(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', bytes(8)),  # trailing bytes
        _st(b'{"a":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}', bytes(8)),  # unsupported dtype
        _st(b'{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}', bytes(1)),  # bad shape
        _st(b'{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}', bytes(3)),
        _st(b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', bytes(1)),
        _st(b'{"a":{"dtype":"U8","shape":[1]}}', bytes(1)),  # no offsets
    ],
)
def test_damaged_safetensors(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(FormatError) as excinfo:
        safetensors_format.read(path)
    assert_one_line_error(excinfo)


def test_topology_from_another_format_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    model = read_model(files["safetensors"])
    model.format = "torch-state-dict"
    with pytest.raises(FormatError):
        torch_format.write(model, tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []


def test_ordered_dict_metadata_is_kept(files: dict[str, Path], tmp_path: Path) -> None:
    state = load_sd(roundtrip(files["state_dict"], tmp_path))
    assert isinstance(state, collections.OrderedDict)
    assert state._metadata["bn1"]["version"] == 2
