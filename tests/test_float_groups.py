"""Exact float tensors in regrouped byte planes (nnc_tool/coding/float_groups.py, bitstream 2.2)."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from nnc_tool import compress_model, decompress_model, parallel
from nnc_tool.bitstream import container
from nnc_tool.coding import float_groups, tensors
from nnc_tool.coding.float_groups import decode_float_groups, encode_float_groups, join_planes, split_planes
from nnc_tool.coding.integers import StreamStats
from nnc_tool.errors import BitstreamError
from nnc_tool.model import Model, Tensor, TensorRole
from nnc_tool.quantize.uniform import QuantSettings

RNG = np.random.default_rng(11)
DTYPES = [np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float64),
          np.dtype(">f4"), np.dtype(">f8")]


def _weights(count: int, dtype: np.dtype) -> np.ndarray:
    values = (RNG.standard_normal(count) * 0.05).astype(dtype)
    specials = np.array([np.nan, -np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-30], dtype=np.float64).astype(dtype)
    values[: min(count, len(specials))] = specials[:count]
    return values


def _round_trip(array: np.ndarray) -> np.ndarray:
    payload = encode_float_groups(array)
    return decode_float_groups(memoryview(payload), array.dtype, array.shape, "t")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("count", [0, 1, 5, 1000])
def test_every_bit_comes_back(dtype: np.dtype, count: int) -> None:
    array = _weights(count, dtype)
    back = _round_trip(array)
    assert back.dtype == dtype and back.shape == array.shape
    assert back.tobytes() == array.tobytes()  # NaN payloads and signed zeros included


def test_the_rotation_puts_the_exponent_alone_in_the_top_plane() -> None:
    values = np.array([1.0, -1.0, 2.0, -0.5], np.float32)
    planes = split_planes(values.view(np.uint8).reshape(-1, 4))
    exponents = (values.view(np.uint32) >> 23) & 0xFF
    assert planes[0].tolist() == exponents.tolist()  # the sign is not in plane 0
    assert (planes[1] & 1).tolist() == [0, 1, 0, 1]  # it is bit 0 of plane 1
    rows = np.empty((4, 4), np.uint8)
    join_planes(planes, rows)
    assert rows.view(np.float32).ravel().tolist() == values.tolist()


def test_chunks_are_cut_and_rejoined_in_order(monkeypatch) -> None:
    monkeypatch.setattr(float_groups, "CHUNK_LOG2", 10)
    monkeypatch.setattr(float_groups, "_PARALLEL_BYTES", 0)  # the chunks run on the pool
    array = _weights(10_000, np.dtype(np.float32)).reshape(100, 100)
    payload = encode_float_groups(array)
    assert payload[0] == 10
    stats = StreamStats()
    back = decode_float_groups(memoryview(payload), array.dtype, array.shape, "t", stats)
    assert back.tobytes() == array.tobytes()
    # 10 chunks x 4 planes; the exponent plane is zstd-coded, the low mantissa bytes stored.
    assert sum(stats.methods.values()) == 40 and stats.methods["zstd"] >= 10
    assert stats.side_bytes + stats.payload_bytes == len(payload)


def test_trained_like_weights_shrink_by_their_exponent_redundancy() -> None:
    array = (np.random.default_rng(0).standard_normal(100_000) * 0.05).astype(np.float32)
    payload = encode_float_groups(array)
    # Gaussian weights: exponent plane ~2.4 bits, mantissa and sign ~24 bits: about 1.2x.
    assert len(payload) == 332_394
    bf16 = array.astype(ml_dtypes.bfloat16)
    assert len(encode_float_groups(bf16)) == 132_380  # 1.51x: the 7 mantissa bits and the sign stay


def test_a_plane_that_uses_few_bit_positions_costs_only_those_bits() -> None:
    """Weights kept with 16 mantissa bits and one more (crepe's float32: the low byte is 0 or 128)."""
    values = (np.random.default_rng(1).standard_normal(1 << 16) * 0.05).astype(np.float32)
    bits = values.view(np.uint32) & np.uint32(0xFFFFFF80)
    truncated = bits.view(np.float32)
    stats = StreamStats()
    payload = encode_float_groups(truncated)
    back = decode_float_groups(memoryview(payload), truncated.dtype, truncated.shape, "t", stats)
    assert back.tobytes() == truncated.tobytes()
    assert stats.methods["bits"] == 1
    # The low plane: 1 mask byte + 8192 bytes of bit 7 (zstd's literals would take 1.5 bits per value).
    assert len(payload) < len(encode_float_groups(values)) - 7 * (1 << 16) // 8 + 64


def test_the_bytes_do_not_depend_on_the_threads(monkeypatch) -> None:
    model = Model("safetensors", b"", [Tensor(f"t{i}", _weights(300_000, np.dtype(np.float32)), TensorRole.EXACT)
                                       for i in range(4)])
    settings = QuantSettings(lossless=True)
    threaded, _ = compress_model(model, settings)
    monkeypatch.setattr(parallel, "WORKERS", 1)
    serial, _ = compress_model(model, settings)
    assert threaded == serial
    assert [t.array.tobytes() for t in decompress_model(threaded).tensors] == [t.array.tobytes() for t in model.tensors]


def test_lossless_streams_use_float_groups_and_say_2_2() -> None:
    model = Model("safetensors", b"", [Tensor("w", _weights(5000, np.dtype(np.float32)).reshape(50, 100), TensorRole.WEIGHT)])
    data, reports = compress_model(model, QuantSettings(lossless=True))
    assert data[len(container.MAGIC) : len(container.MAGIC) + 2] == bytes((2, 2))
    assert reports[0].coding == "float_groups"
    lossy, _ = compress_model(model, QuantSettings())
    assert lossy[len(container.MAGIC) : len(container.MAGIC) + 2] == bytes((2, 0))


def test_byte_plane_streams_of_2_1_still_decode(monkeypatch) -> None:
    model = Model("safetensors", b"", [Tensor("w", _weights(5000, np.dtype(np.float16)), TensorRole.EXACT)])
    monkeypatch.setattr(tensors, "exact_coding", lambda dtype: tensors.Coding.BYTE_PLANES)
    old, reports = compress_model(model, QuantSettings(lossless=True))
    monkeypatch.undo()
    assert reports[0].coding == "byte_planes"
    assert decompress_model(old).tensors[0].array.tobytes() == model.tensors[0].array.tobytes()


def _payload_parts(array: np.ndarray) -> tuple[bytes, list[int], bytes]:
    payload = encode_float_groups(array)
    reader_table = payload[1:]
    entries = []
    position = 0
    for _ in range(array.dtype.itemsize):
        value = shift = 0
        while True:
            byte = reader_table[position]
            position += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        entries.append(value)
    return payload[:1], entries, reader_table[position:]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value >= 0x80 else 0))
        value >>= 7
        if not value:
            return bytes(out)


@pytest.mark.parametrize("damage", ["truncated", "lengths", "zstd", "stored length", "reserved method", "huge chunk"])
def test_damaged_payloads_are_refused(damage: str) -> None:
    array = _weights(4096, np.dtype(np.float32))
    head, entries, body = _payload_parts(array)
    if damage == "truncated":
        payload = head + b"".join(map(_varint, entries)) + body[:-1]
    elif damage == "lengths":
        payload = head + b"".join(map(_varint, [entries[0] - 4, entries[1] + 4] + entries[2:])) + body
    elif damage == "zstd":
        assert entries[0] & 3 == 1  # the exponent plane is zstd-coded
        length = entries[0] >> 2
        payload = head + b"".join(map(_varint, entries)) + bytes(length) + body[length:]
    elif damage == "stored length":
        assert entries[3] & 3 == 0
        payload = head + b"".join(map(_varint, entries[:3] + [(entries[3] >> 2) - 1 << 2])) + body[:-1]
    elif damage == "reserved method":
        payload = head + b"".join(map(_varint, entries[:3] + [entries[3] | 3])) + body
    else:
        payload = bytes([40]) + b"".join(map(_varint, entries)) + body
    with pytest.raises(BitstreamError):
        decode_float_groups(memoryview(payload), array.dtype, array.shape, "t")


def test_a_non_float_tensor_in_float_groups_is_refused() -> None:
    tensor = Tensor("w", _weights(16, np.dtype(np.float32)), TensorRole.EXACT)
    payload = bytearray(tensors.encode_tensor(tensor, QuantSettings(lossless=True)))
    position = payload.index(b"w") + 1  # the descriptor follows the name
    payload[position] = (payload[position] & 0x0F) | (8 << 4)  # dtype code 8: int32
    with pytest.raises(BitstreamError, match="float groups"):
        tensors.decode_tensor(bytes(payload))
