"""The pack unit: many tiny exactly-coded tensors in one unit (bitstream 2.1)."""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

from nnc_tool import api
from nnc_tool.api import compress_model, decompress_model
from nnc_tool.bitstream import container
from nnc_tool.bitstream.primitives import ByteWriter
from nnc_tool.cli import main
from nnc_tool.coding import pack as pack_module
from nnc_tool.coding.pack import PACK_MAX_VALUES, decode_pack, encode_pack
from nnc_tool.coding.report import stream_entropy_report
from nnc_tool.coding.tensors import Coding, encode_tensor, exact_coding
from nnc_tool.errors import BitstreamError
from nnc_tool.model import FLOAT_DTYPES, Model, Tensor, TensorRole
from nnc_tool.quantize.uniform import QuantSettings

RNG = np.random.default_rng(7)
INT64 = np.iinfo(np.int64)


def _tiny_tensors() -> list[Tensor]:
    """Scalars, short vectors and empty tensors of every dtype, with the awkward values exports hold."""
    arrays = [
        np.array(1e-5, np.float32),
        np.array([np.nan, -0.0, np.inf, -np.inf, 1.5], np.float32),
        np.zeros((0,), np.float32),
        np.array(0.5, np.float16),
        np.array([1.0, -2.0, 65504.0], np.float16),
        np.array(3.25, ml_dtypes.bfloat16),
        np.array([1.0, -0.0, 7.5], ml_dtypes.bfloat16),
        np.array(1 / 3, np.float64),
        np.array([INT64.max, INT64.min, INT64.min + 1, -1, 0, 1, 1 << 40], np.int64),
        np.array(-1, np.int64),
        np.zeros((0,), np.int64),
        np.array([0, 2, 3], np.int64),
        np.array(7, np.int32),
        np.array([np.iinfo(np.int32).min, np.iinfo(np.int32).max], np.int32),
        np.array(True),
        np.array([True, False, True]),
        np.zeros((0, 3), np.bool_),
        np.array([np.iinfo(np.uint64).max, 0], np.uint64),
        np.array([-128, 127], np.int8),
    ]
    return [Tensor(f"/model/block{i % 4}/Constant_{i}_output_0", a, TensorRole.EXACT) for i, a in enumerate(arrays)]


def _mixed_model() -> Model:
    """Tiny exact tensors between two large lossy ones, so the pack's positions matter."""
    tiny = _tiny_tensors()
    weight = Tensor("conv.weight", RNG.normal(0, 0.1, (16, 8, 3, 3)).astype(np.float32), TensorRole.WEIGHT)
    table = Tensor("big_exact", np.arange(PACK_MAX_VALUES + 1, dtype=np.int64), TensorRole.EXACT)
    tensors = tiny[:5] + [weight] + tiny[5:12] + [table] + tiny[12:]
    return Model("onnx", b"topology", tensors, {"source": "test"})


def _assert_identical(rebuilt: Model, model: Model, exact_names: set[str]) -> None:
    assert [t.name for t in rebuilt.tensors] == [t.name for t in model.tensors]
    for original, decoded in zip(model.tensors, rebuilt.tensors):
        assert decoded.array.dtype == original.array.dtype and decoded.array.shape == original.array.shape
        assert decoded.role == original.role
        if original.name in exact_names:
            assert decoded.array.tobytes() == original.array.tobytes(), original.name


def test_tiny_tensors_of_every_dtype_round_trip_bit_exactly_in_order() -> None:
    model = _mixed_model()
    data, reports = compress_model(model)
    units = list(container.iter_units(data))
    assert [u.type for u in units] == [container.UnitType.PARAMETER_SET, container.UnitType.TOPOLOGY,
                                       container.UnitType.PACK] + [container.UnitType.DATA] * 2
    assert data[len(container.MAGIC) : len(container.MAGIC) + 2] == bytes((2, 2))  # floats in the pack
    assert [r.packed for r in reports] == [t.array.size <= PACK_MAX_VALUES for t in model.tensors]
    assert sum(r.coded_bytes for r in reports if r.packed) == units[2].size
    _assert_identical(decompress_model(data), model, {t.name for t in model.tensors if t.role == TensorRole.EXACT})


def test_a_2_1_pack_with_float_byte_planes_still_decodes(monkeypatch) -> None:
    model = _mixed_model()
    new, _ = compress_model(model)
    # What a 2.1 encoder wrote: floats in the pack as byte planes, minor version 1.
    monkeypatch.setattr(pack_module, "exact_coding", lambda dtype: Coding.BYTE_PLANES if dtype in FLOAT_DTYPES
                        else exact_coding(dtype))
    monkeypatch.setattr(api, "uses_float_groups", lambda entries: False)
    old, _ = compress_model(model)
    monkeypatch.undo()
    assert old[len(container.MAGIC) + 1] == 1 and new[len(container.MAGIC) + 1] == 2
    assert old != new
    _assert_identical(decompress_model(old), model, {t.name for t in model.tensors if t.role == TensorRole.EXACT})
    assert stream_entropy_report(old)["total_bytes"] == len(old)


def test_lossless_packs_small_float_parameters_too() -> None:
    bias = Tensor("fc.bias", RNG.normal(0, 1, 10).astype(np.float32), TensorRole.NONWEIGHT)
    model = Model("onnx", b"t", [bias, *_tiny_tensors()[:3]])
    data, reports = compress_model(model, QuantSettings(lossless=True))
    assert all(r.packed for r in reports)
    _assert_identical(decompress_model(data), model, {t.name for t in model.tensors})
    # Quantized, the bias keeps a data unit of its own.
    data, reports = compress_model(model)
    assert [r.packed for r in reports] == [False, True, True, True]


def _graph_constants(count: int = 160) -> Model:
    """What a torch.onnx / tf2onnx export is full of: shape vectors, axes, epsilons, 1/N, bounds."""
    tensors = []
    for i in range(count):
        kind = i % 5
        name = f"/encoder/layers.{i // 10}/self_attn/Constant_{i}_output_0"
        if kind == 0:
            array = np.array([1, -1, 8, 64], np.int64)
        elif kind == 1:
            array = np.array(i % 3, np.int64)
        elif kind == 2:
            array = np.array(1e-5, np.float32)
        elif kind == 3:
            array = np.array([INT64.max], np.int64)
        else:
            array = np.array(1 / 64, np.float32)
        tensors.append(Tensor(name, array, TensorRole.EXACT))
    return Model("onnx", b"graph", tensors)


def test_160_tiny_constants_cost_a_fraction_of_their_data_units() -> None:
    model = _graph_constants()
    data, _ = compress_model(model)
    # The 2.0 layout: one data unit per tensor (what the encoder wrote before the pack unit; its
    # float scalars in today's float-groups coding).
    as_data_units = sum(len(container.frame_unit(container.UnitType.DATA, encode_tensor(t, QuantSettings())))
                        for t in model.tensors)
    pack = [u for u in container.iter_units(data) if u.type == container.UnitType.PACK]
    assert len(pack) == 1
    assert as_data_units == 5518
    assert pack[0].size == 415  # 160 tensors in 415 bytes instead of 5518: 5103 bytes (92 %) less
    _assert_identical(decompress_model(data), model, {t.name for t in model.tensors})


def test_streams_without_tiny_tensors_keep_the_2_0_layout() -> None:
    weight = Tensor("w", RNG.normal(0, 0.1, (16, 16)).astype(np.float32), TensorRole.WEIGHT)
    data, _ = compress_model(Model("onnx", b"t", [weight]))
    assert data[len(container.MAGIC) : len(container.MAGIC) + 2] == bytes((2, 0))
    assert [u.type for u in container.iter_units(data)][2:] == [container.UnitType.DATA]


def _with_header(data: bytes, minor: int) -> bytes:
    fixed = container.MAGIC + bytes((2, minor))
    return fixed + zlib.crc32(fixed).to_bytes(4, "little") + data[container.HEADER_SIZE :]


def test_a_pack_unit_in_a_2_0_stream_is_rejected() -> None:
    data, _ = compress_model(_mixed_model())
    with pytest.raises(BitstreamError, match="unknown unit type 4"):
        decompress_model(_with_header(data, 0))


def _pack_payload() -> tuple[bytes, int]:
    tensors = _tiny_tensors()
    return encode_pack(list(enumerate(tensors))), len(tensors)


def test_every_truncation_and_bit_flip_of_a_pack_is_a_bitstream_error() -> None:
    payload, count = _pack_payload()
    for cut in range(len(payload)):
        with pytest.raises(BitstreamError):
            decode_pack(payload[:cut], count)
    undetected = 0
    for position in range(len(payload)):
        for bit in (0, 3, 7):
            corrupted = bytearray(payload)
            corrupted[position] ^= 1 << bit
            try:
                pack = decode_pack(bytes(corrupted), count)
            except BitstreamError:
                continue
            # A flip the format cannot notice (a value, a name character) still decodes to well-formed tensors.
            undetected += 1
            assert len(pack.tensors) == len(pack.positions) <= count
            assert all(0 <= p < count for p in pack.positions)
    assert undetected < 3 * len(payload)


def _crafted(count: int, gaps, descriptors, ranks, dims, names: bytes) -> bytes:
    from nnc_tool.coding.integers import encode_integers

    writer = ByteWriter()
    writer.varint(count)
    for values in (gaps, descriptors, ranks, dims):
        writer.blob(encode_integers(np.asarray(values, np.int64)))
    writer.blob(names)
    return writer.getvalue()


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (_crafted(0, [], [], [], [], b"\x00"), "no tensors"),
        (_crafted(3, [0, 0, 0], [2, 2, 2], [0, 0, 0], [], b"\x00"), "above the limit"),  # count > tensor_count 2
        (_crafted(2, [0, 5], [2, 2], [0, 0], [], b"\x00"), "positions outside"),
        (_crafted(1, [0], [3], [0], [], b"\x00"), "unknown tensor role"),
        (_crafted(1, [0], [2 | 60 << 2], [0], [], b"\x00"), "unknown dtype"),
        (_crafted(1, [0], [2], [33], [1] * 33, b"\x00"), "more than 32 dimensions"),
        (_crafted(1, [0], [2], [2], [1 << 16, 1 << 16], b"\x00"), "above the limit"),
        (_crafted(1, [0], [2], [1], [1 << 20], b"\x00"), "dimension above the limit"),
        (_crafted(1, [0], [2], [0], [], b"\x01" + zlib.compress(b"\x00" * 100)[2:-4]), "trailing|truncated|corrupt"),
        (_crafted(1, [0], [2], [0], [], b"\x07"), "unknown compression"),
    ],
)
def test_hostile_pack_fields_are_refused_before_allocating(payload: bytes, message: str) -> None:
    with pytest.raises(BitstreamError, match=message):
        decode_pack(payload, 2)


def test_a_pack_naming_more_tensors_than_the_stream_holds_is_refused() -> None:
    data, _ = compress_model(_mixed_model())
    parameters_unit = next(container.iter_units(data))
    parameters = container.parse_parameter_set(parameters_unit.payload)
    parameters["tensor_count"] += 1
    unit = container.frame_unit(container.UnitType.PARAMETER_SET, container.parameter_set_payload(parameters))
    tampered = data[: container.HEADER_SIZE] + unit + data[container.HEADER_SIZE + parameters_unit.size :]
    with pytest.raises(BitstreamError, match="truncated"):
        decompress_model(tampered)


def test_info_lists_every_packed_tensor_and_the_entropy_report_adds_up(tmp_path: Path) -> None:
    model = _mixed_model()
    data, _ = compress_model(model)
    path = tmp_path / "m.nnc"
    path.write_bytes(data)
    stream = api.info(path, entropy=True)
    assert stream.size == len(data)
    pack = [u for u in stream.units if u.type == "pack"]
    assert [t.name for t in pack[0].packed] == [t.name for t in model.tensors if t.array.size <= PACK_MAX_VALUES]
    assert pack[0].packed[1].dtype == "float32" and pack[0].packed[1].shape == (5,)
    report = stream.entropy
    assert report["side_info_bytes"] + report["payload_bytes"] == len(data)
    assert [row["coding"] for row in report["tensors"]][0] == "packed"

    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 0, result.output
    assert "pack" in result.output and "packed /model/block1/Constant_1_output_0" in result.output
    result = CliRunner().invoke(main, ["info", "--json", str(path)])
    assert json.loads(result.output)["units"][2]["packed"][0]["coding"] == "packed"


def test_a_corrupt_pack_in_a_file_is_one_line_for_every_command(tmp_path: Path) -> None:
    data, _ = compress_model(_mixed_model())
    pack = list(container.iter_units(data))[2]
    payload = bytearray(pack.payload)
    payload[0] = 0  # a pack of no tensors
    unit = container.frame_unit(container.UnitType.PACK, bytes(payload))
    path = tmp_path / "bad.nnc"
    path.write_bytes(data[: pack.offset] + unit + data[pack.offset + pack.size :])
    for args in (["info", str(path)], ["info", "--entropy", str(path)], ["decode", str(path), "-o", str(tmp_path / "x.onnx")]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2
        assert result.output.strip().splitlines() == [f"nnc: error: {path}: pack unit holds no tensors"]
