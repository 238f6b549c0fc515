"""Hostile input: mutated and truncated bitstreams end in a clean error or a valid model, never a crash.

CI runs 2 000 cases here; benchmarks/fuzz.py runs 100 000.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nnc_tool
from nnc_tool.bitstream import container

from conftest import SAMPLES

FUZZ_SETTINGS = settings(max_examples=500, deadline=None, derandomize=True,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _stream(filename: str, **options) -> bytes:
    model = nnc_tool.read_model(SAMPLES / filename)
    return nnc_tool.compress_model(model, nnc_tool.EncodeOptions(**options))[0]


STREAMS = {
    "onnx": _stream("lenet.onnx"),
    "state_dict": _stream("mlp_state_dict.pt", lossless=True),
}


def decode_or_reject(data: bytes, tmp_dir: Path | None = None) -> None:
    """The contract: NncError, or a model the format writer can write."""
    try:
        model = nnc_tool.decompress_model(data)
    except nnc_tool.NncError:
        return
    if tmp_dir is not None:
        suffix = {"onnx": ".onnx", "torch-state-dict": ".pt"}.get(model.format, ".bin")
        try:
            nnc_tool.write_model(model, tmp_dir / f"fuzzed{suffix}")
        except nnc_tool.NncError:
            return


@pytest.mark.parametrize("kind", sorted(STREAMS))
@FUZZ_SETTINGS
@given(data=st.data())
def test_mutated_streams_fail_cleanly(kind: str, data) -> None:
    stream = bytearray(STREAMS[kind])
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(stream) - 1))
        action = data.draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        if action == "flip":
            stream[position] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "set":
            stream[position] = data.draw(st.integers(0, 255))
        elif action == "insert":
            stream[position:position] = data.draw(st.binary(min_size=1, max_size=16))
        elif len(stream) > 1:
            del stream[position : position + data.draw(st.integers(1, 16))]
    decode_or_reject(bytes(stream))


@pytest.mark.parametrize("kind", sorted(STREAMS))
@FUZZ_SETTINGS
@given(data=st.data())
def test_truncated_streams_fail_cleanly(kind: str, data) -> None:
    stream = STREAMS[kind]
    cut = data.draw(st.integers(0, len(stream) - 1))
    with pytest.raises(nnc_tool.NncError):
        nnc_tool.decompress_model(stream[:cut])


def _reframed(stream: bytes, unit_index: int, mutate) -> bytes:
    """Mutate one unit's payload and frame it again with a valid CRC, so parsers behind the CRC get exercised."""
    units = list(container.iter_units(stream))
    parts = [container.stream_header()]
    for index, unit in enumerate(units):
        payload = bytes(unit.payload)
        if index == unit_index:
            payload = mutate(payload)
        parts.append(container.frame_unit(unit.type, payload))
    return b"".join(parts)


@pytest.mark.parametrize("kind", sorted(STREAMS))
@settings(max_examples=250, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_payload_mutations_behind_valid_crcs_fail_cleanly(kind: str, data, tmp_path: Path) -> None:
    stream = STREAMS[kind]
    unit_count = len(list(container.iter_units(stream)))
    unit_index = data.draw(st.integers(0, unit_count - 1))

    def mutate(payload: bytes) -> bytes:
        payload = bytearray(payload)
        for _ in range(data.draw(st.integers(1, 4))):
            if not payload:
                break
            position = data.draw(st.integers(0, len(payload) - 1))
            choice = data.draw(st.sampled_from(["flip", "set", "truncate", "extend"]))
            if choice == "flip":
                payload[position] ^= 1 << data.draw(st.integers(0, 7))
            elif choice == "set":
                payload[position] = data.draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]))
            elif choice == "truncate":
                del payload[position:]
            else:
                payload[position:position] = data.draw(st.binary(min_size=1, max_size=8))
        return bytes(payload)

    decode_or_reject(_reframed(stream, unit_index, mutate), tmp_path)


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_pack_unit_mutations_behind_valid_crcs_fail_cleanly(data, tmp_path: Path) -> None:
    """The lossless state_dict stream packs its four biases and fc3.weight (up to 1024 values each)."""
    stream = STREAMS["state_dict"]
    pack_index = [u.type for u in container.iter_units(stream)].index(container.UnitType.PACK)

    def mutate(payload: bytes) -> bytes:
        payload = bytearray(payload)
        for _ in range(data.draw(st.integers(1, 3))):
            position = data.draw(st.integers(0, len(payload) - 1))
            choice = data.draw(st.sampled_from(["flip", "set", "truncate", "extend"]))
            if choice == "flip":
                payload[position] ^= 1 << data.draw(st.integers(0, 7))
            elif choice == "set":
                payload[position] = data.draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]))
            elif choice == "truncate":
                del payload[max(1, position):]
            else:
                payload[position:position] = data.draw(st.binary(min_size=1, max_size=8))
        return bytes(payload)

    decode_or_reject(_reframed(stream, pack_index, mutate), tmp_path)


def test_crc_covers_the_whole_stream() -> None:
    stream = STREAMS["onnx"]
    assert zlib.crc32(stream) != 0
    for position in range(0, len(stream), 97):
        damaged = bytearray(stream)
        damaged[position] ^= 0x01
        with pytest.raises(nnc_tool.BitstreamError):
            nnc_tool.decompress_model(bytes(damaged))
