"""Many small exactly-coded tensors <-> one pack-unit payload (bitstream 2.1).

Exported graphs hold hundreds of scalar and tiny constants (shape vectors, axes, epsilons, bounds).
As data units each pays its unit framing (9 bytes), a full name and a tensor header plus an integer
stream head for a handful of bytes of values. A pack unit holds them all as a few arrays: the
tensors' positions in the model, their descriptors, ranks and dimensions as integer streams, the
names front-coded (each name as the length it shares with the previous one plus the rest) and
compressed together, and the values of all tensors of one dtype concatenated into one exact stream
(integer values, or byte planes for floats). See docs/FORMAT.md, "Pack unit".
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..bitstream.container import compressed_payload, decompressed_payload
from ..bitstream.primitives import ByteReader, ByteWriter
from ..errors import BitstreamError
from ..model import DTYPE_CODES, DTYPE_NAMES, FLOAT_DTYPES, Tensor, TensorRole, numpy_dtype
from .float_groups import decode_float_groups, encode_float_groups
from .integers import StreamStats, decode_integers, encode_integers
from .names import MAX_NAME_BYTES, read_name, write_name
from .tensors import MAX_NDIM, Coding, byte_planes, cast_integers, exact_coding, from_byte_planes

# The encoder packs exactly-coded tensors of at most this many values. Measured (default settings,
# bytes of the whole stream at limits 64 / 1024 / 65536): silero-vad 1190000 / 1189667 / 1189892,
# its 16 kHz op15 variant 635755 / 635680 / 635891, magika 826632 / 826583 / 826583. Exact tensors
# of a thousand values still share the pack's streams well; larger ones code better on their own.
PACK_MAX_VALUES = 1024
# Format limits a decoder enforces before allocating.
MAX_PACKED_TENSOR_VALUES = 1 << 16
MAX_PACKED_TENSORS = 1 << 20
MAX_PACKED_VALUES = 1 << 24
MAX_NAMES_BYTES = 1 << 24


@dataclass
class DecodedPack:
    """The tensors of a pack unit, their positions in the model, and how its bytes split."""

    positions: list[int]
    tensors: list[Tensor]
    name_bytes: int  # the compressed names field, with its length
    header_bytes: int  # count, positions, descriptors, ranks and dimensions


def is_packable(tensor: Tensor, quantized: bool) -> bool:
    """Whether the encoder puts this tensor into the pack unit instead of a data unit of its own."""
    return not quantized and tensor.array.size <= PACK_MAX_VALUES


def encode_pack(entries: list[tuple[int, Tensor]]) -> bytes:
    """Code (position in the model, tensor) pairs, positions increasing, into a pack-unit payload."""
    if not entries:
        raise ValueError("a pack unit holds at least one tensor")
    positions = np.array([position for position, _ in entries], dtype=np.int64)
    if (np.diff(positions) <= 0).any() or positions[0] < 0:
        raise ValueError("packed tensor positions must increase")
    tensors = [tensor for _, tensor in entries]
    for tensor in tensors:
        if tensor.array.size > MAX_PACKED_TENSOR_VALUES:
            raise ValueError(f"tensor '{tensor.name}' has too many values for a pack unit")
    codes = np.array([DTYPE_CODES[t.dtype] for t in tensors], dtype=np.int64)
    writer = ByteWriter()
    writer.varint(len(tensors))
    writer.blob(encode_integers(np.diff(positions, prepend=-1) - 1))
    writer.blob(encode_integers(np.array([int(t.role) for t in tensors], dtype=np.int64) | (codes << 2)))
    writer.blob(encode_integers(np.array([t.array.ndim for t in tensors], dtype=np.int64)))
    writer.blob(encode_integers(np.array([d for t in tensors for d in t.array.shape], dtype=np.int64)))
    writer.blob(compressed_payload(_names_block([t.name for t in tensors])))
    for code in sorted(set(codes.tolist())):
        members = [t.array.ravel() for t, c in zip(tensors, codes) if c == code]
        values = np.concatenate(members)
        if not values.size:
            continue
        if DTYPE_NAMES[code] == "int64":
            for half in _int64_halves(values):
                writer.blob(encode_integers(half))
        elif exact_coding(DTYPE_NAMES[code]) == Coding.INT_VALUES:
            writer.blob(encode_integers(values.astype(np.int64)))
        elif exact_coding(DTYPE_NAMES[code]) == Coding.FLOAT_GROUPS:
            writer.blob(encode_float_groups(values))
        else:
            for plane in byte_planes(values):
                writer.blob(encode_integers(plane))
    return writer.getvalue()


def uses_float_groups(entries: list[tuple[int, Tensor]]) -> bool:
    """Whether `encode_pack` codes float values (in float groups, a 2.2 feature) for these tensors."""
    return any(tensor.dtype in FLOAT_DTYPES and tensor.array.size for _, tensor in entries)


def decode_pack(payload: bytes | memoryview, tensor_count: int, stats: StreamStats | None = None,
                float_groups: bool = True) -> DecodedPack:
    """Rebuild the tensors of a pack unit in a model of `tensor_count` tensors (`stats`: the values'
    streams); `float_groups`: float values are in float groups (2.2 streams), else byte planes (2.1)."""
    reader = ByteReader(payload, "pack unit")
    count = reader.varint(min(max(tensor_count, 0), MAX_PACKED_TENSORS))
    if count == 0:
        raise BitstreamError(None, "pack unit holds no tensors")
    gaps = decode_integers(reader.blob(), count)
    if gaps.min() < 0 or gaps.max() >= min(tensor_count, 1 << 40):
        raise BitstreamError(None, "pack unit has tensor positions outside the model")
    positions = np.cumsum(gaps + 1) - 1
    if positions[-1] >= tensor_count:
        raise BitstreamError(None, "pack unit has tensor positions outside the model")
    descriptors = decode_integers(reader.blob(), count)
    roles, codes = descriptors & 3, descriptors >> 2
    if descriptors.min() < 0 or not np.isin(roles, list(TensorRole._value2member_map_)).all():
        raise BitstreamError(None, "pack unit has an unknown tensor role")
    if not np.isin(codes, list(DTYPE_NAMES)).all():
        raise BitstreamError(None, "pack unit has an unknown dtype code")
    ranks = decode_integers(reader.blob(), count)
    if ranks.min() < 0 or ranks.max() > MAX_NDIM:
        raise BitstreamError(None, f"pack unit has a tensor of more than {MAX_NDIM} dimensions")
    dims = decode_integers(reader.blob(), int(ranks.sum()))
    if dims.size and (dims.min() < 0 or dims.max() > MAX_PACKED_TENSOR_VALUES):
        raise BitstreamError(None, "pack unit has a dimension above the limit")
    shapes = _split_shapes(dims, ranks)
    header_bytes = reader.position
    names_field = reader.blob()
    name_bytes = reader.position - header_bytes
    names = _read_names_block(decompressed_payload(names_field, "pack unit names", MAX_NAMES_BYTES), count)

    sizes = np.array([math.prod(shape) for shape in shapes], dtype=np.int64)
    arrays: list[np.ndarray | None] = [None] * count
    for code in sorted(set(codes.tolist())):
        members = np.flatnonzero(codes == code)
        total = int(sizes[members].sum())
        dtype = numpy_dtype(DTYPE_NAMES[code])
        if not total:
            values = np.zeros(0, dtype=dtype)
        elif DTYPE_NAMES[code] == "int64":
            high, low = (decode_integers(reader.blob(), total, stats) for _ in range(2))
            values = _int64_from_halves(high, low)
        elif exact_coding(DTYPE_NAMES[code]) == Coding.INT_VALUES:
            values = cast_integers(decode_integers(reader.blob(), total, stats), dtype, f"packed {DTYPE_NAMES[code]}")
        elif float_groups and exact_coding(DTYPE_NAMES[code]) == Coding.FLOAT_GROUPS:
            values = decode_float_groups(reader.blob(), dtype, (total,), f"packed {DTYPE_NAMES[code]}", stats)
        else:
            planes = [decode_integers(reader.blob(), total, stats) for _ in range(dtype.itemsize)]
            values = from_byte_planes(planes, dtype, (total,))
        starts = np.concatenate([[0], np.cumsum(sizes[members])])
        for k, index in enumerate(members):
            arrays[index] = values[starts[k] : starts[k + 1]].reshape(shapes[index])
    reader.expect_end()
    tensors = [Tensor(names[i], arrays[i], TensorRole(int(roles[i]))) for i in range(count)]
    return DecodedPack(positions.tolist(), tensors, name_bytes, header_bytes)


def _int64_halves(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed high and low 32-bit halves (value = high * 2^32 + low, modulo 2^64).

    Integer streams code values below 2^62 in magnitude with their models and fall back to 64-bit
    fields otherwise; slice bounds of exported graphs (INT64_MAX, INT64_MIN + 1) would make every
    value of the pack 64 bits wide. Split, both halves are small and model well.
    """
    bits = values.astype(np.int64).view(np.uint64)
    half = np.uint64(1 << 31)
    low = ((bits + half) & np.uint64(0xFFFFFFFF)).astype(np.int64) - (1 << 31)
    high = (((bits - low.view(np.uint64)) >> np.uint64(32)) + half) & np.uint64(0xFFFFFFFF)
    return high.astype(np.int64) - (1 << 31), low


def _int64_from_halves(high: np.ndarray, low: np.ndarray) -> np.ndarray:
    if high.min() < -(1 << 31) or high.max() >= 1 << 31 or low.min() < -(1 << 31) or low.max() >= 1 << 31:
        raise BitstreamError(None, "pack unit has an int64 half outside 32 bits")
    return ((high.view(np.uint64) << np.uint64(32)) + low.view(np.uint64)).view(np.int64)


def _split_shapes(dims: np.ndarray, ranks: np.ndarray) -> list[tuple[int, ...]]:
    """Per-tensor shapes from the concatenated dimensions, each checked against the value limits."""
    ends = np.cumsum(ranks)
    shapes = [tuple(int(d) for d in dims[end - rank : end]) for end, rank in zip(ends.tolist(), ranks.tolist())]
    total = 0
    for shape in shapes:
        size = math.prod(shape)
        if size > MAX_PACKED_TENSOR_VALUES:
            raise BitstreamError(None, f"pack unit has a tensor of {size} values, above the limit")
        total += size
    if total > MAX_PACKED_VALUES:
        raise BitstreamError(None, f"pack unit declares {total} values, above the limit")
    return shapes


def _names_block(names: list[str]) -> bytes:
    """Front coding: per name, varint characters shared with the previous name, then the rest as a name field."""
    writer = ByteWriter()
    previous = ""
    for name in names:
        shared = 0
        for a, b in zip(previous, name):
            if a != b:
                break
            shared += 1
        writer.varint(shared)
        write_name(writer, name[shared:])
        previous = name
    return writer.getvalue()


def _read_names_block(block: bytes, count: int) -> list[str]:
    reader = ByteReader(block, "pack unit names")
    names: list[str] = []
    previous = ""
    characters = 0
    for _ in range(count):
        shared = reader.varint(len(previous))
        previous = previous[:shared] + read_name(reader)
        characters += len(previous)
        if len(previous) > MAX_NAME_BYTES or characters > MAX_NAMES_BYTES:
            raise BitstreamError(None, "pack unit has overlong tensor names")
        names.append(previous)
    reader.expect_end()
    return names
