"""One tensor <-> one self-contained data-unit payload.

The payload carries everything needed to rebuild the tensor on its own: name, role,
dtype, shape, how it was coded, quantization steps, the zero-row mask and the entropy-
coded integers. See docs/FORMAT.md for the byte layout.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np

from ..bitstream.primitives import ByteReader, ByteWriter
from ..errors import BitstreamError
from ..model import DTYPE_CODES, DTYPE_NAMES, FLOAT_DTYPES, Tensor, TensorRole, numpy_dtype
from ..quantize.uniform import QP_RANGE, Quantized, QuantSettings, dequantize, quantize, step_for_qp
from .float_groups import decode_float_groups, encode_float_groups
from .integers import MAX_VALUES, StreamStats, decode_integers, encode_integers
from .names import read_name, write_name

MAX_NDIM = 32
# Single QPs are stored as svarint(QP - QP_BIAS): one byte for QP -112..15.
QP_BIAS = -48
_DTYPE_ESCAPE = 15  # descriptor dtype nibble 15: the dtype code follows as a u8
# Quantization flags
_PER_CHANNEL = 1
_FREE_STEPS = 2
_ROW_MASK = 4
_DEPENDENT = 8  # dependent quantization; log2 of its chain length follows the steps
MAX_CHAIN_LOG2 = 16


class Coding(enum.IntEnum):
    QUANTIZED = 0  # uniform levels of a float tensor
    INT_VALUES = 1  # integer/bool tensor, its values coded directly (lossless)
    BYTE_PLANES = 2  # any tensor bit-exactly, each byte of the element coded as its own stream
    FLOAT_GROUPS = 3  # a float tensor bit-exactly in regrouped byte planes (coding/float_groups.py)


@dataclass
class TensorHeader:
    """What a data unit says about its tensor before the payload (for `nnc info` and checks)."""

    name: str
    role: TensorRole
    dtype: str
    shape: tuple[int, ...]
    coding: Coding
    steps: np.ndarray | None = None
    qps: np.ndarray | None = None
    coded_rows: np.ndarray | None = None  # bool per output channel; None when no row is skipped
    chain: int = 0  # dependent quantization's chain length; 0 when levels are independent

    @property
    def zero_rows(self) -> int:
        return 0 if self.coded_rows is None else int((~self.coded_rows).sum())

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def is_quantized(tensor: Tensor, settings: QuantSettings, quantized: Quantized | None = None) -> bool:
    """Whether `encode_tensor` codes this tensor's quantized levels rather than its exact values."""
    return quantized is not None or (tensor.role != TensorRole.EXACT and tensor.dtype in FLOAT_DTYPES and not settings.lossless)


def coded_levels(tensor: Tensor, settings: QuantSettings, quantized: Quantized | None = None) -> Quantized | None:
    """The levels `encode_tensor` codes for `tensor` with `settings` (`quantized` when already
    chosen); None when the tensor is coded exactly."""
    if quantized is None and is_quantized(tensor, settings):
        quantized = quantize(tensor.array, tensor.role, settings)
    return quantized


def reconstruction(tensor: Tensor, quantized: Quantized | None) -> np.ndarray:
    """The array `decode_tensor` rebuilds from `tensor` coded with `quantized` levels (None:
    coded exactly), without entropy coding: the decoder's own dequantization and cast."""
    if quantized is None:
        return tensor.array
    values = dequantize(quantized.levels, quantized.steps, quantized.chain)
    return np.asarray(values.astype(numpy_dtype(tensor.dtype), copy=False)).reshape(tensor.array.shape)


def exact_coding(dtype: str) -> Coding:
    """How a tensor of `dtype` is coded bit-exactly."""
    if dtype in FLOAT_DTYPES:
        return Coding.FLOAT_GROUPS
    return Coding.BYTE_PLANES if dtype == "uint64" else Coding.INT_VALUES


def encode_tensor(tensor: Tensor, settings: QuantSettings, quantized: Quantized | None = None) -> bytes:
    """Code one tensor into a data-unit payload (`quantized`: its levels, when already chosen with `settings`)."""
    array = tensor.array
    quantized = coded_levels(tensor, settings, quantized)
    coding = Coding.QUANTIZED if quantized is not None else exact_coding(tensor.dtype)

    writer = ByteWriter()
    write_name(writer, tensor.name)
    dtype_code = DTYPE_CODES[tensor.dtype]
    writer.u8(int(tensor.role) | (coding << 2) | (min(dtype_code, _DTYPE_ESCAPE) << 4))
    if dtype_code >= _DTYPE_ESCAPE:
        writer.u8(dtype_code)
    writer.varint(array.ndim)
    for dim in array.shape:
        writer.varint(dim)

    if coding == Coding.QUANTIZED:
        levels = quantized.levels
        per_channel = quantized.steps.size > 1
        coded_rows = _nonzero_rows(levels)
        masked = coded_rows is not None and not coded_rows.all()
        free = quantized.qps is None
        dependent = quantized.chain > 0
        writer.u8(
            (_PER_CHANNEL if per_channel else 0) | (_FREE_STEPS if free else 0) | (_ROW_MASK if masked else 0)
            | (_DEPENDENT if dependent else 0)
        )
        if free:
            writer.raw(quantized.steps.astype("<f4").tobytes())
        elif per_channel:
            qps = quantized.qps.astype(np.int64)
            writer.blob(encode_integers(qps))
        else:
            writer.svarint(int(quantized.qps[0]) - QP_BIAS)
        if dependent:
            writer.u8(quantized.chain.bit_length() - 1)
        if masked:
            writer.raw(np.packbits(coded_rows).tobytes())
            levels = levels.reshape(levels.shape[0], -1)[coded_rows].reshape((-1,) + levels.shape[1:])
        writer.raw(encode_integers(levels))
    elif coding == Coding.INT_VALUES:
        writer.raw(encode_integers(array))
    elif coding == Coding.FLOAT_GROUPS:
        writer.raw(encode_float_groups(array))
    else:
        planes = byte_planes(array)
        for plane in planes[:-1]:
            writer.blob(encode_integers(plane.reshape(array.shape)))
        writer.raw(encode_integers(planes[-1].reshape(array.shape)))
    return writer.getvalue()


def read_header(reader: ByteReader) -> TensorHeader:
    """Parse and validate the fixed part of a data unit, leaving the reader at the payload."""
    name = read_name(reader)
    descriptor = reader.u8()
    role_code, coding_code, dtype_code = descriptor & 3, (descriptor >> 2) & 3, descriptor >> 4
    if dtype_code == _DTYPE_ESCAPE:
        dtype_code = reader.u8()
        if dtype_code < _DTYPE_ESCAPE:
            raise BitstreamError(None, f"tensor '{name}' escapes a dtype code that fits the descriptor")
    if role_code not in TensorRole._value2member_map_:
        raise BitstreamError(None, f"tensor '{name}' has unknown role {role_code}")
    if dtype_code not in DTYPE_NAMES:
        raise BitstreamError(None, f"tensor '{name}' has unknown dtype code {dtype_code}")
    if coding_code not in Coding._value2member_map_:
        raise BitstreamError(None, f"tensor '{name}' has unknown coding {coding_code}")
    ndim = reader.varint(MAX_NDIM)
    shape = tuple(reader.varint(MAX_VALUES) for _ in range(ndim))
    if math.prod(shape) > MAX_VALUES:
        raise BitstreamError(None, f"tensor '{name}' declares {math.prod(shape)} values, above the limit")
    header = TensorHeader(name, TensorRole(role_code), DTYPE_NAMES[dtype_code], shape, Coding(coding_code))
    if header.coding == Coding.QUANTIZED:
        if header.dtype not in FLOAT_DTYPES:
            raise BitstreamError(None, f"tensor '{name}' is quantized but has integer dtype {header.dtype}")
        flags = reader.u8()
        if flags & ~(_PER_CHANNEL | _FREE_STEPS | _ROW_MASK | _DEPENDENT):
            raise BitstreamError(None, f"tensor '{name}' has reserved quantization flags set")
        header.steps, header.qps = _read_steps(reader, header, flags)
        if flags & _DEPENDENT:
            log2 = reader.u8()
            if log2 > MAX_CHAIN_LOG2:
                raise BitstreamError(None, f"tensor '{name}' has a dependent-quantization chain of 2^{log2} values")
            header.chain = 1 << log2
        header.coded_rows = _read_row_mask(reader, header, flags)
    elif header.coding == Coding.INT_VALUES and (header.dtype in FLOAT_DTYPES or header.dtype == "uint64"):
        raise BitstreamError(None, f"tensor '{name}' codes {header.dtype} values as integers")
    elif header.coding == Coding.BYTE_PLANES and header.dtype == "bool":
        raise BitstreamError(None, f"tensor '{name}' codes bool values as byte planes")
    elif header.coding == Coding.FLOAT_GROUPS and header.dtype not in FLOAT_DTYPES:
        raise BitstreamError(None, f"tensor '{name}' codes {header.dtype} values as float groups")
    return header


def decode_tensor(payload: bytes | memoryview, stats: StreamStats | None = None) -> Tensor:
    """Rebuild one tensor from its data-unit payload (`stats` collects coding statistics)."""
    reader = ByteReader(payload, "data unit")
    header = read_header(reader)
    target = numpy_dtype(header.dtype)
    if header.coding == Coding.QUANTIZED:
        if header.steps.size == 1 and header.coded_rows is None and not header.chain:
            # One step: dequantize through the integer stream's symbol table (one pass, same values).
            step = np.float32(header.steps[0])
            levels_to_values = lambda levels: np.multiply(levels, step, dtype=np.float32).astype(target, copy=False)  # noqa: E731
            array = decode_integers(reader.raw(reader.remaining), header.shape, stats, levels_to_values)
        else:
            array = _decode_levels(reader, header, stats)
            array = dequantize(array, header.steps, header.chain).astype(target, copy=False)
    elif header.coding == Coding.INT_VALUES:
        values = decode_integers(reader.raw(reader.remaining), header.shape, stats)
        array = cast_integers(values, target, header.name).reshape(header.shape)
    elif header.coding == Coding.FLOAT_GROUPS:
        array = decode_float_groups(reader.raw(reader.remaining), target, header.shape, header.name, stats)
    else:
        planes = [decode_integers(reader.blob(), header.shape, stats) for _ in range(target.itemsize - 1)]
        planes.append(decode_integers(reader.raw(reader.remaining), header.shape, stats))
        array = from_byte_planes(planes, target, header.shape)
    # 0-d arithmetic yields numpy scalars; formats expect arrays of the declared shape.
    return Tensor(header.name, np.asarray(array).reshape(header.shape), header.role)


def cast_integers(values: np.ndarray, target: np.dtype, name: str) -> np.ndarray:
    """Integer values in the tensor's dtype; values outside its range mean a corrupt stream."""
    if values.size:
        if target == np.bool_:
            low, high = 0, 1
        else:
            info = np.iinfo(target)
            low, high = info.min, info.max
        if int(values.min()) < low or int(values.max()) > high:
            raise BitstreamError(None, f"tensor '{name}' holds values outside its dtype {target}")
    return values.astype(target)


def _read_steps(reader: ByteReader, header: TensorHeader, flags: int) -> tuple[np.ndarray, np.ndarray | None]:
    per_channel = bool(flags & _PER_CHANNEL)
    if per_channel and not header.shape:
        raise BitstreamError(None, f"tensor '{header.name}' has per-channel steps but no channels")
    count = header.shape[0] if per_channel else 1
    if flags & _FREE_STEPS:
        steps = reader.array("f4", count)
        if not np.isfinite(steps).all():
            raise BitstreamError(None, f"tensor '{header.name}' has a non-finite step")
        return steps.astype(np.float32), None
    if per_channel:
        qps = decode_integers(reader.blob(), count)
    else:
        qps = np.array([reader.svarint() + QP_BIAS], dtype=np.int64)
    if qps.size and (qps.min() < QP_RANGE[0] or qps.max() > QP_RANGE[1]):
        raise BitstreamError(None, f"tensor '{header.name}' has a QP outside [{QP_RANGE[0]}, {QP_RANGE[1]}]")
    return step_for_qp(qps), qps.astype(np.int16)


def _nonzero_rows(levels: np.ndarray) -> np.ndarray | None:
    """Which output channels hold any non-zero level (None for tensors without rows)."""
    if levels.ndim < 2 or levels.size == 0:
        return None
    return levels.reshape(levels.shape[0], -1).any(axis=1)


def _read_row_mask(reader: ByteReader, header: TensorHeader, flags: int) -> np.ndarray | None:
    if not flags & _ROW_MASK:
        return None
    if len(header.shape) < 2:
        raise BitstreamError(None, f"tensor '{header.name}' has a row mask but no rows")
    rows = header.shape[0]
    packed = np.frombuffer(reader.raw((rows + 7) // 8), dtype=np.uint8)
    bits = np.unpackbits(packed)
    if bits[rows:].any():
        raise BitstreamError(None, f"tensor '{header.name}' has row-mask padding bits set")
    return bits[:rows].astype(bool)


def _decode_levels(reader: ByteReader, header: TensorHeader, stats: StreamStats | None) -> np.ndarray:
    payload = reader.raw(reader.remaining)
    if header.coded_rows is None:
        # Dependent quantization's levels stay below 2^21: int32 halves the passes after decoding.
        as_int32 = (lambda levels: _dependent_levels(levels, header.name)) if header.chain else None
        return decode_integers(payload, header.shape, stats, as_int32).reshape(header.shape)
    rows = header.shape[0]
    coded_shape = (int(header.coded_rows.sum()),) + header.shape[1:]
    coded = decode_integers(payload, coded_shape, stats)
    row_size = header.size // rows if rows else 0
    levels = np.zeros((rows, row_size), dtype=np.int64)
    levels[header.coded_rows] = coded.reshape(-1, row_size)
    return levels.reshape(header.shape)


def _dependent_levels(levels: np.ndarray, name: str) -> np.ndarray:
    if levels.size and max(-int(levels.min()), int(levels.max())) >= 1 << 21:
        raise BitstreamError(None, f"tensor '{name}' has a dependent-quantization level beyond 2^21")
    return levels.astype(np.int32)


def byte_planes(array: np.ndarray) -> list[np.ndarray]:
    """Column j holds byte j (little-endian) of every element."""
    little = np.ascontiguousarray(array).view(np.uint8).reshape(array.size, array.dtype.itemsize)
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and np.little_endian is False):
        little = little[:, ::-1]
    return [little[:, j] for j in range(little.shape[1])]


def from_byte_planes(planes: list[np.ndarray], dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if any(p.min(initial=0) < 0 or p.max(initial=0) > 255 for p in planes):
        raise BitstreamError(None, "byte plane holds values outside 0..255")
    raw = np.stack(planes, axis=1).astype(np.uint8) if planes else np.zeros((0, 0), np.uint8)
    if not np.little_endian:
        raw = raw[:, ::-1]
    return np.ascontiguousarray(raw).view(dtype).reshape(shape)
