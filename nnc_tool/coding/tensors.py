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
from ..quantize.uniform import QuantSettings, dequantize, quantize, step_for_qp
from .integers import MAX_VALUES, decode_integers, encode_integers

MAX_NDIM = 32


class Coding(enum.IntEnum):
    QUANTIZED = 0  # uniform levels of a float tensor
    INT_VALUES = 1  # integer/bool tensor, its values coded directly (lossless)
    BYTE_PLANES = 2  # any tensor bit-exactly, each byte of the element coded as its own stream


class StepKind(enum.IntEnum):
    QP = 0  # steps are 2^(qp/4), QPs sent
    FREE = 1  # steps sent as float32


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

    @property
    def zero_rows(self) -> int:
        return 0 if self.coded_rows is None else int((~self.coded_rows).sum())

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def encode_tensor(tensor: Tensor, settings: QuantSettings) -> bytes:
    """Code one tensor into a data-unit payload."""
    array = tensor.array
    writer = ByteWriter()
    writer.text(tensor.name)
    writer.u8(tensor.role)
    writer.u8(DTYPE_CODES[tensor.dtype])
    writer.varint(array.ndim)
    for dim in array.shape:
        writer.varint(dim)

    quantized = None
    if tensor.role != TensorRole.EXACT and tensor.dtype in FLOAT_DTYPES and not settings.lossless:
        quantized = quantize(array.astype(np.float32), tensor.role, settings)

    if quantized is not None:
        writer.u8(Coding.QUANTIZED)
        _write_steps(writer, quantized.steps, quantized.qps)
        levels = quantized.levels
        coded_rows = _nonzero_rows(levels)
        if coded_rows is not None and not coded_rows.all():
            writer.u8(1)
            writer.raw(np.packbits(coded_rows).tobytes())
            levels = levels.reshape(levels.shape[0], -1)[coded_rows]
        else:
            writer.u8(0)
        writer.raw(encode_integers(levels.ravel()))
    elif tensor.dtype not in FLOAT_DTYPES and tensor.dtype != "uint64":
        writer.u8(Coding.INT_VALUES)
        writer.raw(encode_integers(array.astype(np.int64).ravel()))
    else:
        writer.u8(Coding.BYTE_PLANES)
        for plane in _byte_planes(array):
            writer.blob(encode_integers(plane))
    return writer.getvalue()


def read_header(reader: ByteReader) -> TensorHeader:
    """Parse and validate the fixed part of a data unit, leaving the reader at the payload."""
    name = reader.text()
    role_code = reader.u8()
    dtype_code = reader.u8()
    if role_code not in TensorRole._value2member_map_:
        raise BitstreamError(None, f"tensor '{name}' has unknown role {role_code}")
    if dtype_code not in DTYPE_NAMES:
        raise BitstreamError(None, f"tensor '{name}' has unknown dtype code {dtype_code}")
    ndim = reader.varint(MAX_NDIM)
    shape = tuple(reader.varint(MAX_VALUES) for _ in range(ndim))
    if math.prod(shape) > MAX_VALUES:
        raise BitstreamError(None, f"tensor '{name}' declares {math.prod(shape)} values, above the limit")
    coding_code = reader.u8()
    if coding_code not in Coding._value2member_map_:
        raise BitstreamError(None, f"tensor '{name}' has unknown coding {coding_code}")
    header = TensorHeader(name, TensorRole(role_code), DTYPE_NAMES[dtype_code], shape, Coding(coding_code))
    if header.coding == Coding.QUANTIZED:
        if header.dtype not in FLOAT_DTYPES:
            raise BitstreamError(None, f"tensor '{name}' is quantized but has integer dtype {header.dtype}")
        header.steps, header.qps = _read_steps(reader, header)
        header.coded_rows = _read_row_mask(reader, header)
    return header


def decode_tensor(payload: bytes | memoryview) -> Tensor:
    """Rebuild one tensor from its data-unit payload."""
    reader = ByteReader(payload, "data unit")
    header = read_header(reader)
    target = numpy_dtype(header.dtype)
    if header.coding == Coding.QUANTIZED:
        array = _decode_levels(reader, header)
        array = dequantize(array, header.steps).astype(target)
    elif header.coding == Coding.INT_VALUES:
        array = decode_integers(reader.raw(reader.remaining), header.size).astype(target).reshape(header.shape)
    else:
        planes = [decode_integers(reader.blob(), header.size) for _ in range(target.itemsize)]
        reader.expect_end()
        array = _from_byte_planes(planes, target, header.shape)
    # 0-d arithmetic yields numpy scalars; formats expect arrays of the declared shape.
    return Tensor(header.name, np.asarray(array).reshape(header.shape), header.role)


def _write_steps(writer: ByteWriter, steps: np.ndarray, qps: np.ndarray | None) -> None:
    writer.u8(StepKind.QP if qps is not None else StepKind.FREE)
    writer.varint(steps.size)
    if qps is not None:
        for qp in qps.tolist():  # one per channel, not per weight
            writer.svarint(qp)
    else:
        writer.raw(steps.astype("<f4").tobytes())


def _read_steps(reader: ByteReader, header: TensorHeader) -> tuple[np.ndarray, np.ndarray | None]:
    kind = reader.u8()
    count = reader.varint(MAX_VALUES)
    rows = header.shape[0] if header.shape else 1
    if count != 1 and count != rows:
        raise BitstreamError(None, f"tensor '{header.name}' has {count} steps for {rows} channels")
    if kind == StepKind.QP:
        qps = np.array([reader.svarint() for _ in range(count)], dtype=np.int64)
        if np.abs(qps).max() > 1024:
            raise BitstreamError(None, f"tensor '{header.name}' has an out-of-range QP")
        return step_for_qp(qps), qps.astype(np.int16)
    if kind == StepKind.FREE:
        steps = reader.array("f4", count)
        if not np.isfinite(steps).all():
            raise BitstreamError(None, f"tensor '{header.name}' has a non-finite step")
        return steps.astype(np.float32), None
    raise BitstreamError(None, f"tensor '{header.name}' has unknown step kind {kind}")


def _nonzero_rows(levels: np.ndarray) -> np.ndarray | None:
    """Which output channels hold any non-zero level (None for tensors without rows)."""
    if levels.ndim < 2 or levels.size == 0:
        return None
    return levels.reshape(levels.shape[0], -1).any(axis=1)


def _read_row_mask(reader: ByteReader, header: TensorHeader) -> np.ndarray | None:
    has_mask = reader.u8()
    if has_mask > 1:
        raise BitstreamError(None, f"tensor '{header.name}' has an invalid row-mask flag")
    if not has_mask:
        return None
    if len(header.shape) < 2:
        raise BitstreamError(None, f"tensor '{header.name}' has a row mask but no rows")
    rows = header.shape[0]
    return np.unpackbits(np.frombuffer(reader.raw((rows + 7) // 8), dtype=np.uint8))[:rows].astype(bool)


def _decode_levels(reader: ByteReader, header: TensorHeader) -> np.ndarray:
    if header.coded_rows is None:
        return decode_integers(reader.raw(reader.remaining), header.size).reshape(header.shape)
    rows = header.shape[0]
    row_size = header.size // rows if rows else 0
    coded = decode_integers(reader.raw(reader.remaining), int(header.coded_rows.sum()) * row_size)
    levels = np.zeros((rows, row_size), dtype=np.int64)
    levels[header.coded_rows] = coded.reshape(-1, row_size)
    return levels.reshape(header.shape)


def _byte_planes(array: np.ndarray) -> list[np.ndarray]:
    """Column j holds byte j (little-endian) of every element."""
    little = np.ascontiguousarray(array).view(np.uint8).reshape(array.size, array.dtype.itemsize)
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and np.little_endian is False):
        little = little[:, ::-1]
    return [little[:, j].astype(np.int64) for j in range(little.shape[1])]


def _from_byte_planes(planes: list[np.ndarray], dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if any(p.min(initial=0) < 0 or p.max(initial=0) > 255 for p in planes):
        raise BitstreamError(None, "byte plane holds values outside 0..255")
    raw = np.stack(planes, axis=1).astype(np.uint8) if planes else np.zeros((0, 0), np.uint8)
    if not np.little_endian:
        raw = raw[:, ::-1]
    return np.ascontiguousarray(raw).view(dtype).reshape(shape)
