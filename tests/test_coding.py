"""Integer coding, tensor data units, quantization and the unit container."""
from __future__ import annotations

import dataclasses
import math
import zlib

import ml_dtypes
import numpy as np
import pytest

from nnc_tool import BitstreamError, Model, Tensor, TensorRole, compress_model, decompress_model
from nnc_tool.bitstream import container
from nnc_tool.coding.integers import Method, decode_integers, encode_integers
from nnc_tool.coding.tensors import decode_tensor, encode_tensor
from nnc_tool.quantize.uniform import QuantSettings, quantize, step_for_qp

RNG = np.random.default_rng(1234)


def plain(**options) -> QuantSettings:
    """Settings with round-to-nearest quantization (rate-aware rounding off where it exists)."""
    fields = {f.name for f in dataclasses.fields(QuantSettings)}
    if "rdo" in fields:
        options.setdefault("rdo", 0)
    if "kernel_correlation" in fields:
        options.setdefault("kernel_correlation", 0.0)
    return QuantSettings(**options)


def entropy_bytes(values: np.ndarray) -> float:
    _, counts = np.unique(values, return_counts=True)
    p = counts / counts.sum()
    return float(-(counts * np.log2(p)).sum() / 8)


@pytest.mark.parametrize(
    "values",
    [
        np.zeros(0, np.int64),
        np.zeros(1000, np.int64),
        np.array([7]),
        np.array([-3, 5, 0, 2]),
        np.round(RNG.laplace(0, 20, 50_000)).astype(np.int64),
        np.round(RNG.laplace(0, 40_000, 3_000)).astype(np.int64),  # wide alphabet
        np.array([2**62, -(2**62), 0, 1] * 8, dtype=np.int64),  # extreme magnitudes
        RNG.integers(0, 256, 5_000),
    ],
    ids=["empty", "zeros", "single", "tiny", "laplace", "wide", "extreme", "bytes"],
)
def test_integer_round_trip(values: np.ndarray) -> None:
    data = encode_integers(values)
    np.testing.assert_array_equal(decode_integers(data, values.size), values)


def test_binned_coding_is_close_to_entropy() -> None:
    values = np.round(RNG.laplace(0, 20, 200_000)).astype(np.int64)
    data = encode_integers(values)
    assert data[0] & 7 == Method.BINNED
    # within 0.1 % of the empirical entropy plus a few hundred bytes of model
    assert len(data) < entropy_bytes(values) * 1.001 + 300


def test_wide_alphabet_uses_coarse_bins() -> None:
    values = np.round(RNG.laplace(0, 200_000, 4_000)).astype(np.int64)
    data = encode_integers(values)
    assert data[0] & 7 == Method.BINNED
    assert data[0] >> 3 <= 4  # a few mantissa bits per bin, the rest raw
    assert len(data) < values.size * 2.53  # ~20 bits/value of information, far below 8 bytes raw


def test_constant_array_costs_a_few_bytes() -> None:
    assert len(encode_integers(np.full(1_000_000, 5))) <= 2


def test_step_follows_nnc_convention() -> None:
    qps = np.arange(-100, 40)
    np.testing.assert_allclose(step_for_qp(qps), 2.0 ** (qps / 4.0), rtol=1e-7)
    assert step_for_qp(-38) == np.float32(2.0**-9.5)


def test_quantize_is_mid_tread_with_bounded_error() -> None:
    weights = RNG.normal(0, 0.1, (32, 16, 3, 3)).astype(np.float32)
    q = quantize(weights, TensorRole.WEIGHT, plain(qp=-30))
    step = float(2.0**-7.5)
    assert q.levels.dtype == np.int32
    assert np.abs(q.levels * np.float32(step) - weights).max() <= step / 2 * (1 + 1e-5)
    # values within half a step of zero map to level 0
    assert (q.levels[np.abs(weights) < step / 2 * 0.999] == 0).all()


def test_per_channel_steps_follow_channel_ranges() -> None:
    weights = RNG.normal(0, 1, (4, 64)).astype(np.float32) * np.array([1.0, 0.1, 0.01, 1.0], np.float32)[:, None]
    q = quantize(weights, TensorRole.WEIGHT, QuantSettings(qp=-30, per_channel=True))
    assert q.steps.shape == (4,)
    assert q.steps[2] < q.steps[1] < q.steps[0]
    assert q.qps[0] == -30


def test_bits_mode_uses_the_range() -> None:
    weights = RNG.normal(0, 1, (8, 8)).astype(np.float32)
    q = quantize(weights, TensorRole.WEIGHT, QuantSettings(bits=4))
    assert np.abs(q.levels).max() == 7


def test_nonfinite_tensor_falls_back_to_lossless() -> None:
    values = np.array([[1.0, np.nan], [np.inf, 0.5]], np.float32)
    payload = encode_tensor(Tensor("x", values, TensorRole.WEIGHT), QuantSettings())
    restored = decode_tensor(payload).array
    assert restored.tobytes() == values.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.float64])
def test_quantized_tensor_keeps_dtype_and_error_bound(dtype) -> None:
    values = RNG.normal(0, 0.2, (16, 9)).astype(dtype)
    settings = QuantSettings(qp=-36)
    restored = decode_tensor(encode_tensor(Tensor("w", values, TensorRole.WEIGHT), settings)).array
    assert restored.dtype == np.dtype(dtype)
    assert restored.shape == values.shape
    half_step = 2.0**-9 / 2
    tolerance = half_step + np.abs(values.astype(np.float64)).max() * float(ml_dtypes.finfo(dtype).eps)
    assert np.abs(restored.astype(np.float64) - values.astype(np.float64)).max() <= tolerance


@pytest.mark.parametrize(
    "values",
    [
        np.arange(-5, 50, dtype=np.int64).reshape(5, 11),
        np.array([True, False, True]),
        np.array([0, 2**63 - 1, 5], dtype=np.uint64),
        np.array([2**64 - 1, 0], dtype=np.uint64),
        np.array(3.5, dtype=np.float32),
        RNG.normal(0, 1, (3, 4)).astype(ml_dtypes.bfloat16),
    ],
)
def test_exact_tensors_are_bit_exact(values: np.ndarray) -> None:
    restored = decode_tensor(encode_tensor(Tensor("t", values, TensorRole.EXACT), QuantSettings())).array
    assert restored.dtype == values.dtype and restored.shape == values.shape
    assert restored.tobytes() == values.tobytes()


def test_zero_rows_are_skipped_and_restored() -> None:
    weights = RNG.normal(0, 0.1, (64, 32)).astype(np.float32)
    weights[::2] = 0.0
    dense = weights.copy()
    dense[::2] = 1e-9  # not zero, but quantizes to zero: rows count as zero after quantization
    payload = encode_tensor(Tensor("w", weights, TensorRole.WEIGHT), plain())
    restored = decode_tensor(payload).array
    assert (restored[::2] == 0).all()
    assert np.abs(restored - weights).max() <= 2.0**-9.5 / 2 * 1.0001
    from nnc_tool.bitstream.primitives import ByteReader
    from nnc_tool.coding.tensors import read_header

    assert read_header(ByteReader(payload)).zero_rows == 32


def _sample_model() -> Model:
    return Model(
        "safetensors",
        b'{"layout": "test"}' * 4,
        [
            Tensor("conv.weight", RNG.normal(0, 0.1, (8, 4, 3, 3)).astype(np.float32), TensorRole.WEIGHT),
            Tensor("conv.bias", RNG.normal(0, 0.1, 8).astype(np.float32), TensorRole.NONWEIGHT),
            Tensor("steps", np.array([3, 1, 4], np.int64), TensorRole.EXACT),
        ],
        {"source": "unit test"},
    )


def test_stream_round_trip_and_determinism() -> None:
    model = _sample_model()
    first, reports = compress_model(model)
    second, _ = compress_model(model)
    assert first == second
    assert sum(r.coded_bytes for r in reports) + len(container.stream_header()) < len(first)
    rebuilt = decompress_model(first)
    assert rebuilt.format == model.format and rebuilt.topology == model.topology and rebuilt.metadata == model.metadata
    assert [t.name for t in rebuilt.tensors] == [t.name for t in model.tensors]
    assert np.array_equal(rebuilt.tensors[2].array, model.tensors[2].array)


def test_lossless_stream_is_bit_exact() -> None:
    model = _sample_model()
    data, _ = compress_model(model, QuantSettings(lossless=True))
    for original, rebuilt in zip(model.tensors, decompress_model(data).tensors):
        assert rebuilt.array.tobytes() == original.array.tobytes()


def test_every_truncation_is_detected() -> None:
    data, _ = compress_model(_sample_model())
    for cut in range(0, len(data), max(1, len(data) // 97)):
        with pytest.raises(BitstreamError):
            decompress_model(data[:cut])


def test_every_single_bit_flip_is_detected() -> None:
    data = bytearray(compress_model(_sample_model())[0])
    for position in range(0, len(data), max(1, len(data) // 131)):
        corrupted = bytearray(data)
        corrupted[position] ^= 1 << (position % 8)
        with pytest.raises(BitstreamError):
            decompress_model(bytes(corrupted))


def test_unknown_version_is_rejected() -> None:
    data = bytearray(compress_model(_sample_model())[0])
    data[len(container.MAGIC)] = 9
    data[len(container.MAGIC) + 2 : container.HEADER_SIZE] = zlib.crc32(data[: len(container.MAGIC) + 2]).to_bytes(4, "little")
    with pytest.raises(BitstreamError, match="version 9"):
        decompress_model(bytes(data))


def test_data_unit_decodes_on_its_own() -> None:
    model = _sample_model()
    data, _ = compress_model(model, plain(nonweight_qp=-75))
    units = list(container.iter_units(data))
    # The tiny exact "steps" tensor goes into the pack unit, right after the topology.
    assert [u.type for u in units] == [container.UnitType.PARAMETER_SET, container.UnitType.TOPOLOGY,
                                       container.UnitType.PACK] + [container.UnitType.DATA] * 2
    bias = decode_tensor(units[4].payload)
    assert bias.name == "conv.bias" and bias.array.shape == (8,)
    assert math.isclose(float(np.abs(bias.array - model.tensors[1].array).max()), 0.0, abs_tol=1e-5)
