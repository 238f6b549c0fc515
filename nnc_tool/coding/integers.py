"""Entropy coding of integer arrays with constriction.

An integer stream is self-describing: one method byte, the method's side information,
then the payload. The encoder tries every method that applies and keeps the smallest,
so tiny tensors are not drowned in histogram side information and wide alphabets
(fine non-weight steps, lossless byte planes) still code close to their entropy.

Methods
- FIXED: every value in `bits` raw bits above the minimum (also covers constant arrays, bits=0).
- HISTOGRAM: a Categorical model over [min, max] whose counts travel in the stream,
  coded with an ANS stack coder.
- MAGNITUDE: the signed bit length of each value (a small alphabet) coded with a
  Categorical model as above; the bits below the leading one follow raw. This is the
  exponent/mantissa split of Exp-Golomb codes with a learned prefix model, and it keeps
  the side information small when the alphabet is wide.
"""
from __future__ import annotations

import enum

import constriction
import numpy as np

from ..bitstream.primitives import ByteReader, ByteWriter
from ..errors import BitstreamError

_AnsCoder = constriction.stream.stack.AnsCoder
_Categorical = constriction.stream.model.Categorical

# Beyond this many symbols a histogram costs more side information than it saves.
MAX_HISTOGRAM_ALPHABET = 1 << 16
# Sanity bound on any decoded count so hostile streams cannot request huge allocations.
MAX_VALUES = 1 << 31


class Method(enum.IntEnum):
    FIXED = 0
    HISTOGRAM = 1
    MAGNITUDE = 2


def encode_integers(values: np.ndarray) -> bytes:
    """Code a 1-D integer array (any int dtype, values within int64) into a self-describing stream."""
    values = np.ascontiguousarray(values, dtype=np.int64).ravel()
    candidates = [_encode_fixed(values)]
    if values.size:
        low, high = int(values.min()), int(values.max())
        if high > low and high - low < MAX_HISTOGRAM_ALPHABET:
            candidates.append(_encode_histogram(values, low, high))
        if high > low and values.size > 16:
            candidates.append(_encode_magnitude(values))
    return min(candidates, key=len)


def decode_integers(data: bytes | memoryview, count: int) -> np.ndarray:
    """Inverse of `encode_integers`; `count` comes from the tensor's shape."""
    if count > MAX_VALUES:
        raise BitstreamError(None, f"tensor declares {count} values, above the limit")
    reader = ByteReader(data, "integer stream")
    method = reader.u8()
    if method == Method.FIXED:
        values = _decode_fixed(reader, count)
    elif method == Method.HISTOGRAM:
        values = _decode_histogram(reader, count)
    elif method == Method.MAGNITUDE:
        values = _decode_magnitude(reader, count)
    else:
        raise BitstreamError(None, f"unknown integer coding method {method}")
    reader.expect_end()
    return values


# --- FIXED -------------------------------------------------------------------------------


def _encode_fixed(values: np.ndarray) -> bytes:
    writer = ByteWriter()
    writer.u8(Method.FIXED)
    if values.size == 0:
        writer.svarint(0)
        writer.u8(0)
        return writer.getvalue()
    low = int(values.min())
    span = int(values.max()) - low
    bits = span.bit_length()
    writer.svarint(low)
    writer.u8(bits)
    if bits:
        writer.raw(_pack_fixed_width((values - low).astype(np.uint64), bits))
    return writer.getvalue()


def _decode_fixed(reader: ByteReader, count: int) -> np.ndarray:
    low = reader.svarint()
    bits = reader.u8()
    if bits > 64:
        raise BitstreamError(None, "integer stream declares more than 64 bits per value")
    if bits == 0:
        return np.full(count, low, dtype=np.int64)
    packed = reader.raw((count * bits + 7) // 8)
    offsets = _unpack_fixed_width(packed, bits, count)
    return (offsets.astype(np.int64) + np.int64(low)).astype(np.int64)


def _pack_fixed_width(offsets: np.ndarray, bits: int) -> bytes:
    """Big-endian bit fields of `bits` bits each, concatenated."""
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    bit_matrix = ((offsets[:, None] >> shifts[None, :]) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bit_matrix.ravel()).tobytes()


def _unpack_fixed_width(packed: memoryview, bits: int, count: int) -> np.ndarray:
    bit_array = np.unpackbits(np.frombuffer(packed, dtype=np.uint8))[: count * bits]
    bit_matrix = bit_array.reshape(count, bits).astype(np.uint64)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    return (bit_matrix << shifts[None, :]).sum(axis=1, dtype=np.uint64)


# --- HISTOGRAM -----------------------------------------------------------------------------


def _write_counts(writer: ByteWriter, counts: np.ndarray) -> None:
    writer.varint(len(counts))
    for count in counts.tolist():  # one entry per alphabet symbol, not per weight
        writer.varint(count)


def _read_counts(reader: ByteReader, limit: int) -> np.ndarray:
    size = reader.varint(limit)
    counts = np.fromiter((reader.varint() for _ in range(size)), dtype=np.float64, count=size)
    if size == 0 or not counts.any():
        raise BitstreamError(None, "integer stream has an empty histogram")
    return counts


def _ans_encode(symbols: np.ndarray, counts: np.ndarray) -> bytes:
    model = _Categorical(counts / counts.sum(), perfect=False)
    coder = _AnsCoder()
    coder.encode_reverse(symbols.astype(np.int32), model)
    return coder.get_compressed().astype("<u4").tobytes()


def _ans_decode(payload: memoryview, counts: np.ndarray, count: int) -> np.ndarray:
    if len(payload) % 4:
        raise BitstreamError(None, "entropy-coded payload is not a whole number of words")
    words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
    model = _Categorical(counts / counts.sum(), perfect=False)
    try:
        symbols = _AnsCoder(words).decode(model, count)
    except Exception as exc:  # constriction raises plain exceptions on exhausted/invalid data
        raise BitstreamError(None, f"entropy-coded payload is corrupt ({exc})") from None
    return np.asarray(symbols, dtype=np.int64)


def _encode_histogram(values: np.ndarray, low: int, high: int) -> bytes:
    symbols = values - low
    counts = np.bincount(symbols, minlength=high - low + 1)
    writer = ByteWriter()
    writer.u8(Method.HISTOGRAM)
    writer.svarint(low)
    _write_counts(writer, counts)
    writer.raw(_ans_encode(symbols, counts.astype(np.float64)))
    return writer.getvalue()


def _decode_histogram(reader: ByteReader, count: int) -> np.ndarray:
    low = reader.svarint()
    counts = _read_counts(reader, MAX_HISTOGRAM_ALPHABET)
    symbols = _ans_decode(reader.raw(reader.remaining), counts, count)
    return symbols + low


# --- MAGNITUDE -----------------------------------------------------------------------------


def _bit_length(magnitudes: np.ndarray) -> np.ndarray:
    """Vectorized int.bit_length for non-negative int64 values."""
    lengths = np.zeros(magnitudes.shape, dtype=np.int64)
    nonzero = magnitudes > 0
    # frexp is exact for integers below 2**53; larger magnitudes are corrected below.
    _, exponents = np.frexp(magnitudes[nonzero].astype(np.float64))
    lengths[nonzero] = exponents
    big = magnitudes >= (1 << 53)
    if big.any():
        lengths[big] = [int(m).bit_length() for m in magnitudes[big].tolist()]
    return lengths


def _encode_magnitude(values: np.ndarray) -> bytes:
    magnitudes = np.abs(values)
    classes = _bit_length(magnitudes)
    signed_classes = np.where(values < 0, -classes, classes)
    max_class = int(classes.max())
    symbols = signed_classes + max_class
    counts = np.bincount(symbols, minlength=2 * max_class + 1)
    mantissa_bits = np.maximum(classes - 1, 0)
    mantissas = (magnitudes - np.where(classes > 0, np.left_shift(1, np.maximum(classes - 1, 0)), 0)).astype(np.uint64)

    writer = ByteWriter()
    writer.u8(Method.MAGNITUDE)
    writer.u8(max_class)
    _write_counts(writer, counts)
    ans = _ans_encode(symbols, counts.astype(np.float64))
    writer.blob(ans)
    writer.raw(_pack_variable_width(mantissas, mantissa_bits))
    return writer.getvalue()


def _decode_magnitude(reader: ByteReader, count: int) -> np.ndarray:
    max_class = reader.u8()
    if max_class > 64:
        raise BitstreamError(None, "integer stream declares a magnitude class above 64")
    counts = _read_counts(reader, 2 * max_class + 1)
    if len(counts) != 2 * max_class + 1:
        raise BitstreamError(None, "integer stream has a histogram of the wrong size")
    symbols = _ans_decode(reader.blob(), counts, count)
    signed_classes = symbols - max_class
    classes = np.abs(signed_classes)
    mantissa_bits = np.maximum(classes - 1, 0)
    total_bits = int(mantissa_bits.sum())
    packed = reader.raw((total_bits + 7) // 8)
    mantissas = _unpack_variable_width(packed, mantissa_bits)
    leading = np.where(classes > 0, np.left_shift(np.uint64(1), np.maximum(classes - 1, 0).astype(np.uint64)), 0)
    magnitudes = (mantissas + leading.astype(np.uint64)).astype(np.int64)
    return np.where(signed_classes < 0, -magnitudes, magnitudes)


def _pack_variable_width(fields: np.ndarray, widths: np.ndarray) -> bytes:
    """Concatenate each field's low `width` bits, most significant first."""
    total = int(widths.sum())
    if total == 0:
        return b""
    owners = np.repeat(np.arange(len(fields)), widths)
    starts = np.cumsum(widths) - widths
    position = np.arange(total) - np.repeat(starts, widths)
    shift = (widths[owners] - 1 - position).astype(np.uint64)
    bits = ((fields[owners] >> shift) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits).tobytes()


def _unpack_variable_width(packed: memoryview, widths: np.ndarray) -> np.ndarray:
    total = int(widths.sum())
    fields = np.zeros(len(widths), dtype=np.uint64)
    if total == 0:
        return fields
    bits = np.unpackbits(np.frombuffer(packed, dtype=np.uint8))[:total].astype(np.uint64)
    owners = np.repeat(np.arange(len(widths)), widths)
    starts = np.cumsum(widths) - widths
    position = np.arange(total) - np.repeat(starts, widths)
    shift = (widths[owners] - 1 - position).astype(np.uint64)
    # The bits of one field are disjoint, so OR-reducing each field's run assembles it.
    has_bits = widths > 0
    fields[has_bits] = np.bitwise_or.reduceat(bits << shift, starts[has_bits])
    return fields
