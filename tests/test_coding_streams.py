"""Integer-stream methods, models, names, compressed side units, hostile input and entropy reports."""
from __future__ import annotations

import dataclasses
import zlib

import constriction
import numpy as np
import pytest

from nnc_tool import BitstreamError, Model, Tensor, TensorRole, compress_model, decompress_model
from nnc_tool.bitstream import container
from nnc_tool.bitstream.primitives import ByteReader, ByteWriter
from nnc_tool.coding import integers
from nnc_tool.coding.integers import Method, StreamStats, decode_integers, encode_integers, estimated_bits, value_bits
from nnc_tool.coding.names import TOKENS, read_name, tokenize, write_name
from nnc_tool.coding.report import describe_entropy_report, stream_entropy_report
from nnc_tool.coding.tensors import decode_tensor, encode_tensor, read_header
from nnc_tool.quantize.uniform import QuantSettings

RNG = np.random.default_rng(2024)


def plain(**options) -> QuantSettings:
    """Settings with round-to-nearest quantization (rate-aware rounding off where it exists)."""
    if "rdo" in {f.name for f in dataclasses.fields(QuantSettings)}:
        options.setdefault("rdo", 0)
    return QuantSettings(**options)


def nm_prune(weights: np.ndarray, keep: int, group: int, axis: int = 1) -> np.ndarray:
    """Zero all but the `keep` largest of every `group` consecutive values along `axis`."""
    moved = np.moveaxis(weights.copy(), axis, -1)
    lines = moved.reshape(-1, group)
    drop = np.argsort(np.abs(lines), axis=1)[:, : group - keep]
    np.put_along_axis(lines, drop, 0, axis=1)
    return np.moveaxis(lines.reshape(moved.shape), -1, axis)


def every_plan_round_trips(values: np.ndarray, shape: tuple[int, ...]) -> dict[int, int]:
    """Build the stream of every method the planner considers; all must decode exactly."""
    sizes = {}
    for plan in integers._plan(values.ravel().astype(np.int64), shape):
        data = plan.build()
        np.testing.assert_array_equal(decode_integers(data, shape), values.ravel())
        sizes[data[0] & 7] = len(data)
        assert abs(plan.cost - len(data)) <= 8, "the planner's estimate is within an ANS word or two"
    return sizes


# --- methods -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        np.round(RNG.laplace(0, 3, (32, 16, 3, 3))).astype(np.int64),
        np.round(RNG.laplace(0, 500, (40, 25))).astype(np.int64),
        nm_prune(np.round(RNG.normal(0, 20, (16, 12, 3, 3))).astype(np.int64), 2, 4),
        RNG.integers(-(2**40), 2**40, (7, 50)),
        np.where(RNG.random((30, 30)) < 0.9, 0, RNG.integers(1, 4, (30, 30))),
    ],
    ids=["laplace", "wide", "nm24", "huge", "sparse-positive"],
)
def test_every_method_round_trips(values: np.ndarray) -> None:
    sizes = every_plan_round_trips(values, values.shape)
    assert Method.FIXED in sizes  # the others are only planned when they can be smaller
    assert len(encode_integers(values)) == min(sizes.values())


def test_large_sparse_vector_round_trips() -> None:
    values = np.where(RNG.random(600_000) < 0.7, 0, RNG.integers(-50, 50, 600_000))
    data = encode_integers(values)
    np.testing.assert_array_equal(decode_integers(data, values.shape), values)


def test_nm_sparsity_uses_patterns() -> None:
    weights = nm_prune(np.round(RNG.normal(0, 20, (64, 32, 3, 3))).astype(np.int64), 2, 4)
    data = encode_integers(weights)
    assert data[0] & 7 == Method.PATTERN
    layout = data[1]
    assert layout & 31 == 1 and (layout >> 5) + 2 in (4, 8)  # groups along the input axis
    sizes = every_plan_round_trips(weights, weights.shape)
    assert sizes[Method.PATTERN] < 0.93 * sizes[Method.BINNED]


@pytest.mark.parametrize("shape", [(5, 7), (3, 10, 2), (9,), (2, 1, 11)])
@pytest.mark.parametrize("group", [2, 3, 4, 8, 9])
def test_pattern_layouts_round_trip(shape: tuple[int, ...], group: int) -> None:
    values = np.where(RNG.random(shape) < 0.6, 0, RNG.integers(-9, 10, shape))
    values.ravel()[0] = 3
    flat = values.ravel().astype(np.int64)
    histogram = integers._histogram(flat, int(flat.min()), int(flat.max()))
    nonzero = histogram[0] != 0
    nz_values = histogram[0][nonzero] - (histogram[0][nonzero] > 0)
    model = integers._best_value_model(nz_values, histogram[1][nonzero])
    for axis in range(len(shape)):
        sig = (values != 0)
        patterns, _ = integers._patterns(sig, axis, group)
        cost, r, k, codes = integers._pattern_table_cost(np.bincount(patterns, minlength=1 << group))
        data = integers._build_pattern(flat, shape, axis, group, r, k, codes, model)
        np.testing.assert_array_equal(decode_integers(data, shape), flat)


@pytest.mark.parametrize("b", [0, 1, 3, 7, 12, 30])
def test_every_bin_width_round_trips(b: int) -> None:
    extremes = [2**61, -(2**61) + 3] if b <= 7 else [2**15, -(2**15) + 3]  # keep the alphabet <= 65536
    values = np.concatenate([np.round(RNG.laplace(0, 2000, 3000)), [0, 1, -1], extremes]).astype(np.int64)
    magnitudes = np.abs(values)
    bins, shift = integers.bin_of(magnitudes, b)
    signed = np.where(values < 0, -bins, bins)
    lo, hi = int(signed.min()), int(signed.max())
    assert hi - lo + 1 <= integers.MAX_ALPHABET
    counts = np.bincount(signed - lo)
    model = integers._score(0, b, lo, counts, int(shift.sum()), 3)
    data = integers._build_binned(values, model)
    stats = StreamStats()
    np.testing.assert_array_equal(decode_integers(data, values.size, stats), values)
    assert stats.payload_bytes <= stats.ideal_bits / 8 + 4


def test_bins_invert() -> None:
    magnitudes = np.concatenate([np.arange(5000), RNG.integers(0, 2**62, 5000)]).astype(np.int64)
    for b in (0, 2, 9):
        bins, shift = integers.bin_of(magnitudes, b)
        base, base_shift = integers.bin_base(bins, b)
        np.testing.assert_array_equal(shift, base_shift)
        assert ((magnitudes - base) >> shift == 0).all() and (magnitudes >= base).all()


def test_model_weights_match_constriction() -> None:
    """quantized_weights reproduces constriction's model, so estimates and reports are exact."""
    for size in (2, 17, 900):
        counts = (RNG.pareto(1.0, size) * (RNG.random(size) < 0.7) * 1000).round()
        counts[0] += 1
        symbols = RNG.choice(size, 30_000, p=counts / counts.sum())
        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(symbols.astype(np.int32), constriction.stream.model.Categorical(counts, perfect=False))
        weights = integers.quantized_weights(counts)
        assert weights.sum() == 1 << 24 and weights.min() >= 1
        ideal = float(integers.code_lengths(weights)[symbols].sum())
        assert -2 <= coder.num_valid_bits() - ideal <= 40


def test_count_codes_keep_r_significant_bits() -> None:
    counts = np.array([0, 1, 2, 3, 7, 8, 100, 1000, 12345, 2**31])
    for r in range(8):
        values = integers.count_value(integers.count_code(counts, r), r)
        assert (values[counts == 0] == 0).all()
        assert (np.abs(values - counts) <= counts / 2 ** (r + 1) + 0.5).all()


def test_estimates_and_rates() -> None:
    values = np.round(RNG.laplace(0, 6, (48, 40))).astype(np.int64)
    assert abs(estimated_bits(values) - 8 * len(encode_integers(values))) <= 64
    bits = value_bits(values, -3, 3)
    assert bits.shape == (7,) and bits[3] == bits.min()  # zero is the likeliest level
    assert value_bits(RNG.integers(0, 256, 4000), 0, 255) is None  # fixed-width wins


def test_integer_streams_are_deterministic_and_stats_add_up() -> None:
    values = nm_prune(np.round(RNG.normal(0, 9, (16, 8, 3, 3))).astype(np.int64), 1, 2)
    first, second = encode_integers(values), encode_integers(values)
    assert first == second
    stats = StreamStats()
    decode_integers(first, values.shape, stats)
    assert stats.side_bytes + stats.payload_bytes == len(first)
    assert stats.empirical_bits <= stats.ideal_bits + 1e-6


# --- hostile integer streams -------------------------------------------------------------


def _stream(*parts: bytes) -> bytes:
    return b"".join(parts)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        bytes([7]),  # unknown method
        bytes([Method.FIXED | (31 << 3), 65, 0]),  # width above 64
        bytes([Method.FIXED | (31 << 3), 3, 0]),  # escaped width that fits the head
        bytes([Method.FIXED | (8 << 3), 0, 1, 2]),  # too few bytes for 4 values of 8 bits
        bytes([Method.BINNED | (31 << 3), 0, 0, 0]),  # b above 30
        bytes([Method.BINNED, 0, 0, 0xFF, 0xFF, 0x07]),  # alphabet above 65536
        bytes([Method.BINNED, 0, 0, 1, 0x80]),  # count table with a reserved bit
        bytes([Method.BINNED, 0, 0, 1, 0, 0, 0]),  # all-zero count table
        bytes([Method.BINNED, 0, 0, 1, 0, 0x0A]),  # count table truncated
        bytes([Method.BINNED, 0, 0, 1, 0, 0x40, 1, 2, 3, 4]),  # ANS data left over / corrupt
        bytes([Method.PATTERN, 5]),  # axis beyond ndim
        bytes([3]) + b"\x00" * 10,
    ],
)
def test_hostile_integer_streams_are_rejected(data: bytes) -> None:
    with pytest.raises(BitstreamError):
        decode_integers(data, (4,))


def test_pattern_padding_bits_are_rejected() -> None:
    values = np.array([[1, 0, 2]], dtype=np.int64)  # one line of 3 along axis 1, group 4: position 3 is padding
    pattern_counts = np.zeros(16, dtype=np.int64)
    pattern_counts[0b1101] = 1  # claims position 3 (padding) is non-zero
    codes = integers.count_code(pattern_counts, 2)
    model = integers._score(0, 2, -1, np.array([0, 1, 1]), 0, 2)
    writer = ByteWriter()
    writer.u8(Method.PATTERN | (model.b << 3))
    writer.u8(1 | ((4 - 2) << 5))
    integers._write_table(writer, codes, 2, integers._table_bytes(codes)[1])
    integers._write_value_model(writer, model)
    ans = integers._AnsWriter()
    ans.categorical(np.array([0b1101]), integers.count_value(codes, 2))
    ans.categorical(np.array([0, 1, 1]), integers.count_value(model.codes, model.r))
    writer.raw(ans.getvalue())
    with pytest.raises(BitstreamError, match="beyond the end of a line"):
        decode_integers(writer.getvalue(), values.shape)


def _mutations(payload: bytes, rng: np.random.Generator, count: int):
    for _ in range(count):
        data = bytearray(payload)
        kind = rng.integers(0, 3)
        if kind == 0:
            data[rng.integers(0, len(data))] ^= 1 << rng.integers(0, 8)
        elif kind == 1:
            data = data[: rng.integers(0, len(data))]
        else:
            data[rng.integers(0, len(data))] = rng.integers(0, 256)
        yield bytes(data)


def test_damaged_data_units_fail_cleanly() -> None:
    """Mutated payloads (CRC bypassed) decode or raise BitstreamError: never anything else."""
    weights = RNG.normal(0, 0.1, (8, 8, 3, 3)).astype(np.float32)
    tensors = [
        Tensor("conv.weight", weights, TensorRole.WEIGHT),
        Tensor("nm.weight", nm_prune(weights, 2, 4), TensorRole.WEIGHT),
        Tensor("b", RNG.normal(0, 1, 24).astype(np.float32), TensorRole.NONWEIGHT),
        Tensor("i", RNG.integers(-300, 300, (5, 9)).astype(np.int16), TensorRole.EXACT),
        Tensor("h", RNG.normal(0, 1, (4, 6)).astype(np.float16), TensorRole.EXACT),
        Tensor("mask", RNG.random(20) > 0.5, TensorRole.EXACT),
    ]
    rng = np.random.default_rng(7)
    for tensor in tensors:
        for settings in (plain(), plain(per_channel=True), plain(bits=5)):
            for data in _mutations(encode_tensor(tensor, settings), rng, 40):
                try:
                    decode_tensor(data)
                except BitstreamError:
                    pass


# --- data units ----------------------------------------------------------------------------


def test_data_unit_header_is_compact() -> None:
    weights = RNG.normal(0, 0.1, (16, 8, 3, 3)).astype(np.float32)
    payload = encode_tensor(Tensor("layer1.0.conv1.weight", weights, TensorRole.WEIGHT), plain(qp=-38))
    reader = ByteReader(payload)
    header = read_header(reader)
    assert header.name == "layer1.0.conv1.weight" and header.qps.tolist() == [-38]
    # tokenised name (9) + descriptor + ndim + 4 dims + flags + QP
    assert reader.position <= 9 + 1 + 1 + 4 + 1 + 1


@pytest.mark.parametrize("per_channel", [False, True])
def test_per_channel_qps_round_trip(per_channel: bool) -> None:
    weights = RNG.normal(0, 1, (12, 20)).astype(np.float32) * np.geomspace(0.01, 1, 12, dtype=np.float32)[:, None]
    settings = plain(qp=-30, per_channel=per_channel)
    payload = encode_tensor(Tensor("w", weights, TensorRole.WEIGHT), settings)
    header = read_header(ByteReader(payload))
    assert header.qps.size == (12 if per_channel else 1)
    restored = decode_tensor(payload).array
    steps = header.steps if per_channel else np.full(12, header.steps[0])
    assert (np.abs(restored - weights) <= steps[:, None] / 2 * 1.0001).all()


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.bool_])
def test_integer_tensors_round_trip(dtype) -> None:
    info = np.iinfo(dtype) if dtype != np.bool_ else None
    if info is None:
        values = RNG.random((6, 7)) > 0.3
    else:
        values = RNG.integers(info.min, int(info.max) + 1, (6, 7), dtype=np.int64 if dtype != np.uint64 else np.uint64).astype(dtype)
    restored = decode_tensor(encode_tensor(Tensor("t", values, TensorRole.EXACT), QuantSettings())).array
    assert restored.dtype == values.dtype and restored.tobytes() == values.tobytes()


# --- names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["", "w", "layer1.0.conv1.weight", "block3.expand_bn.running_mean", "onnx::Conv_123", "encoder.layer.7.attention.self.query.weight",
     "Gewichte.ä", "名前.weight", "x" * 300, "\x00\x7f", ".weight.weight.bias"],
)
def test_names_round_trip(name: str) -> None:
    writer = ByteWriter()
    write_name(writer, name)
    data = writer.getvalue()
    reader = ByteReader(data)
    assert read_name(reader) == name and reader.remaining == 0
    assert len(data) <= len(name.encode("utf-8")) + 3


def test_token_table_is_fixed() -> None:
    # The table is part of the bitstream format: changing it breaks every existing stream.
    assert len(TOKENS) == 128
    assert zlib.crc32("\n".join(TOKENS).encode()) == 0xBD2430B8
    assert len(tokenize("block3.expand_bn.running_mean")) == 7


# --- side units ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "topology",
    [b"", b"x", bytes(range(256)) * 40, b'{"layout": "test"}' * 300, RNG.integers(0, 256, 5000, dtype=np.uint8).tobytes()],
)
def test_topology_compression_round_trips(topology: bytes) -> None:
    payload = container.topology_payload(topology)
    assert container.parse_topology(memoryview(payload)) == topology
    assert len(payload) <= len(topology) + 1


def test_side_units_reject_bad_compression() -> None:
    topology = b"".join(b"node%d:%s;" % (i, bytes(RNG.integers(97, 123, 6, dtype=np.uint8))) for i in range(400))
    lzma2 = container.topology_payload(topology)
    assert lzma2[0] == container.Compression.LZMA2
    for bad in (lzma2[:1] + bytes([40]) + lzma2[2:], lzma2[:-3], lzma2 + b"\x00", bytes([9]) + topology, bytes([1]) + b"\xff\xff"):
        with pytest.raises(BitstreamError):
            container.parse_topology(memoryview(bad))
    with pytest.raises(BitstreamError, match="size limit"):
        container.parse_topology(memoryview(lzma2), limit=100)
    parameters = {"format": "onnx", "tensor_count": 3, "settings": {"qp": -38}}
    assert container.parse_parameter_set(memoryview(container.parameter_set_payload(parameters))) == parameters


# --- whole streams -----------------------------------------------------------------------


def _model() -> Model:
    weights = RNG.normal(0, 0.1, (32, 16, 3, 3)).astype(np.float32)
    return Model(
        "safetensors",
        b'{"layout": "test"}' * 8,
        [
            Tensor("features.0.conv.weight", weights, TensorRole.WEIGHT),
            Tensor("features.1.conv.weight", nm_prune(weights, 2, 4), TensorRole.WEIGHT),
            Tensor("features.0.bn.bias", RNG.normal(0, 0.1, 32).astype(np.float32), TensorRole.NONWEIGHT),
            Tensor("num_batches_tracked", np.array(7, np.int64), TensorRole.EXACT),
        ],
        {"source": "unit test"},
    )


def test_entropy_report_accounts_for_every_byte() -> None:
    data, _ = compress_model(_model(), plain())
    report = stream_entropy_report(data)
    assert report["side_info_bytes"] + report["payload_bytes"] == report["total_bytes"] == len(data)
    assert 0 <= report["overhead_percent"] < 1.0  # within 1 % of the models' entropy + side information
    assert report["empirical_payload_bytes"] <= report["ideal_payload_bytes"]
    assert report["methods"].get("pattern") == 1
    # Rows follow the stream: the pack unit (the scalar counter) comes before the data units.
    assert [t["name"] for t in report["tensors"]] == ["(pack of 1 tensors)"] + [t.name for t in _model().tensors[:3]]
    text = describe_entropy_report(report)
    assert "within" in text and str(report["total_bytes"]) in text
    assert decompress_model(data).tensors[3].array == 7


def test_version_is_2_1_with_a_pack_unit() -> None:
    data, _ = compress_model(_model())
    assert data[len(container.MAGIC) : len(container.MAGIC) + 2] == bytes((2, 1))
    assert container.HEADER_SIZE == 14


@pytest.mark.parametrize("kind", ["binned", "binned_low_bits", "pattern_inner_axis", "fixed"])
def test_streams_spanning_several_blocks_round_trip(kind: str) -> None:
    """Large tensors are coded and decoded a block at a time; blocks must join seamlessly (and in order)."""
    n = integers.BLOCK_VALUES * 2 + 12345
    if kind == "binned":
        values = np.round(RNG.laplace(0, 30, n)).astype(np.int32)
        shape = (n,)
    elif kind == "binned_low_bits":
        values = np.round(RNG.laplace(0, 1e6, n)).astype(np.int64)  # wide: bins share low bits
        shape = (n,)
    elif kind == "pattern_inner_axis":
        rows = 1032
        # Exactly one of every two vertically adjacent values is non-zero: only patterns along
        # axis 0 (not the row-major one) see that.
        upper = RNG.random((rows // 2, n // rows)) < 0.5
        significant = np.stack([upper, ~upper], axis=1).reshape(rows, -1)
        values = np.where(significant, RNG.integers(1, 41, significant.shape), 0).astype(np.int32)
        shape = values.shape
    else:
        values = RNG.integers(0, 1 << 13, n).astype(np.int64)  # uniform: fixed width wins
        shape = (n,)
    data = encode_integers(values, shape)
    method = Method(data[0] & 7)
    expected = {"binned": Method.BINNED, "binned_low_bits": Method.BINNED, "pattern_inner_axis": Method.PATTERN,
                "fixed": Method.FIXED}[kind]
    assert method == expected
    if kind == "binned_low_bits":
        assert data[0] >> 3 < 12  # bins of b bits: large magnitudes travel partly as low bits
    np.testing.assert_array_equal(decode_integers(data, shape), values.ravel())
    # A value map (dequantization) gives exactly the mapped values, through the table or per block.
    halve = lambda v: np.multiply(v, np.float32(0.5), dtype=np.float32)  # noqa: E731
    np.testing.assert_array_equal(decode_integers(data, shape, value_map=halve), halve(values.ravel()))
    if kind == "pattern_inner_axis":
        assert data[1] & 31 == 0  # the pattern axis
    # Compact input dtypes code to exactly the bytes their int64 widening does.
    assert data == encode_integers(values.astype(np.int64), shape)


def test_fixed_packing_matches_the_general_bit_packer() -> None:
    fields = RNG.integers(0, 1 << 11, 1000).astype(np.uint64)
    packed = integers.pack_fixed(fields, 11)
    assert packed == integers.pack_bits(fields, np.full(1000, 11))
    np.testing.assert_array_equal(integers.unpack_fixed(packed, 11, 1000), fields)


@pytest.mark.parametrize("r", [0, 2, 7])
def test_count_tables_read_back_whatever_their_codeword_lengths(r: int, monkeypatch) -> None:
    """A table is first looked for in a short window, then in its whole reach: tables of long
    codewords (counts far apart, k = 0) must read back exactly, leaving what follows in place."""
    size = 64
    codes = np.where(np.arange(size) % 2 == 0, 40 << r, 0).astype(np.int64)  # every delta as large as it gets
    windows = []
    chain = integers._codeword_chain
    monkeypatch.setattr(integers, "_codeword_chain", lambda w, *a, **k: windows.append(len(w)) or chain(w, *a, **k))
    for k in (0, integers._table_bytes(codes)[1]):
        writer = ByteWriter()
        integers._write_table(writer, codes, r, k)
        writer.u8(0xA5)
        reader = ByteReader(writer.getvalue())
        values, read_r = integers._read_table(reader, size)
        assert read_r == r and np.array_equal(values, integers.count_value(codes, r))
        assert reader.u8() == 0xA5
    # Deltas of 2 * 40 << 7 need 2 * 14 - 1 bits at k = 0: past the first window.
    assert (len(windows) > 2) == (r == 7)
