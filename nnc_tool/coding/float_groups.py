"""Bit-exact coding of float tensors in regrouped byte planes, fast enough for whole checkpoints.

A float's bytes hold very different information. In trained weights the exponent carries most of
the redundancy (MiniLM's float32 exponents: 2.6 of 8 bits), the low mantissa bytes almost none,
and the sign none at all. So the top 16 bits of every value are rotated left by one: the exponent
(or, for float16, the exponent and two mantissa bits) then fills the top byte alone and the sign
moves to the bottom of the next one (float32 s|e8|m23 -> [e8] [m22..16|s] [m15..8] [m7..0]). Each
byte position is one plane, each plane is cut in chunks of CHUNK_VALUES values, and every chunk is
Huffman-coded (deflate, Huffman only: zlib, in the standard library) where that saves bytes, else
stored as it is.

Why deflate's Huffman stage rather than constriction's ANS here: on MiniLM's exponent plane it
decodes 250 MB/s per core where constriction's categorical ANS decodes 40 M symbols/s, and its
per-block trees follow the statistics along a tensor (2.632 bits per exponent against 2.664 for
one static model of the whole tensor). Quantized tensors, where the models matter more, stay with
constriction (coding/integers.py). Chunks are coded and decoded on every core (nnc_tool/parallel.py): zlib
and numpy release the GIL.

Payload: u8 log2(CHUNK_VALUES); then for each chunk, for each plane, a varint (length << 1 |
huffman); then the chunks' bytes in that order.
"""
from __future__ import annotations

import math
import zlib

import numpy as np

from ..bitstream.primitives import ByteReader, ByteWriter
from ..errors import BitstreamError
from ..parallel import ordered_map
from .integers import StreamStats

# Values per chunk: large enough that deflate's block trees settle and a chunk's bookkeeping is
# noise, small enough that a 10 M-value tensor keeps both cores busy.
CHUNK_LOG2 = 20
MAX_CHUNK_LOG2 = 26
# A plane whose sampled order-0 entropy is above this is stored without trying Huffman (trying
# costs a deflate pass; it cannot save more than the entropy gap).
TRY_BELOW_BITS = 7.9
# Values sampled per chunk for that estimate.
ENTROPY_SAMPLE = 1 << 14
_STORED, _HUFFMAN = 0, 1
# Tensors below this many bytes are coded on the calling thread.
_PARALLEL_BYTES = 1 << 21


def _map(function, items: list, total_bytes: int) -> list:
    if total_bytes < _PARALLEL_BYTES or len(items) < 2:
        return [function(item) for item in items]
    return list(ordered_map(function, items, "chunks", ahead=len(items)))


def _little_endian_bytes(array: np.ndarray) -> np.ndarray:
    """The values as rows of little-endian bytes, [n, itemsize]."""
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return little.view(np.uint8).reshape(array.size, array.dtype.itemsize)


def split_planes(rows: np.ndarray) -> list[np.ndarray]:
    """[n, k] little-endian bytes -> k planes, top byte first, the top 16 bits rotated left by one."""
    k = rows.shape[1]
    if k == 1:
        return [np.ascontiguousarray(rows[:, 0])]
    top, next_ = rows[:, k - 1], rows[:, k - 2]
    high = (top << 1) | (next_ >> 7)
    low = (next_ << 1) | (top >> 7)
    return [high, low] + [np.ascontiguousarray(rows[:, j]) for j in range(k - 3, -1, -1)]


def join_planes(planes: list[np.ndarray], out: np.ndarray) -> None:
    """The inverse of `split_planes`, written into `out` ([n, k] uint8)."""
    k = out.shape[1]
    if k == 1:
        out[:, 0] = planes[0]
        return
    high, low = planes[0], planes[1]
    out[:, k - 1] = (high >> 1) | (low << 7)
    out[:, k - 2] = (low >> 1) | (high << 7)
    for position, plane in zip(range(k - 3, -1, -1), planes[2:]):
        out[:, position] = plane


def _entropy_bits(plane: np.ndarray) -> float:
    step = max(1, plane.size // ENTROPY_SAMPLE)
    counts = np.bincount(plane[::step], minlength=256)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def _order0_bits(plane: np.ndarray) -> float:
    """The plane's code length under its own order-0 statistics, in bits."""
    counts = np.bincount(plane, minlength=256)
    p = counts[counts > 0] / plane.size
    return float(-(counts[counts > 0] * np.log2(p)).sum())


def _huffman(data: bytes) -> bytes:
    coder = zlib.compressobj(1, zlib.DEFLATED, -15, 9, zlib.Z_HUFFMAN_ONLY)
    return coder.compress(data) + coder.flush()


def _code_plane(plane: np.ndarray) -> tuple[int, bytes]:
    raw = plane.tobytes()
    if plane.size >= 64 and _entropy_bits(plane) < TRY_BELOW_BITS:
        packed = _huffman(raw)
        if len(packed) < len(raw):
            return _HUFFMAN, packed
    return _STORED, raw


def encode_float_groups(array: np.ndarray) -> bytes:
    """Code a float array (any float dtype) bit-exactly; the decoder is given dtype and shape."""
    rows = _little_endian_bytes(array)
    size = 1 << CHUNK_LOG2
    starts = list(range(0, rows.shape[0], size))
    chunks = _map(lambda start: [_code_plane(p) for p in split_planes(rows[start : start + size])], starts, rows.nbytes)
    writer = ByteWriter()
    writer.u8(CHUNK_LOG2)
    for chunk in chunks:
        for method, blob in chunk:
            writer.varint(len(blob) << 1 | method)
    for chunk in chunks:
        for _, blob in chunk:
            writer.raw(blob)
    return writer.getvalue()


def _inflate(blob: memoryview, expected: int, name: str) -> np.ndarray:
    inflater = zlib.decompressobj(-15)
    try:
        data = inflater.decompress(blob, expected)
    except zlib.error as err:
        raise BitstreamError(None, f"tensor '{name}' has a damaged Huffman chunk ({err})") from None
    if len(data) != expected or not inflater.eof or inflater.unconsumed_tail:
        raise BitstreamError(None, f"tensor '{name}' has a Huffman chunk of the wrong length")
    return np.frombuffer(data, np.uint8)


def decode_float_groups(payload: memoryview, dtype: np.dtype, shape: tuple[int, ...], name: str,
                        stats: StreamStats | None = None) -> np.ndarray:
    """Rebuild the array `encode_float_groups` coded."""
    reader = ByteReader(payload, "data unit")
    chunk_log2 = reader.u8()
    if chunk_log2 > MAX_CHUNK_LOG2:
        raise BitstreamError(None, f"tensor '{name}' has chunks of 2^{chunk_log2} values")
    count, width = math.prod(shape), dtype.itemsize
    size = 1 << chunk_log2
    starts = list(range(0, count, size))
    table_start = reader.position
    entries = [[reader.varint(1 << 62) for _ in range(width)] for _ in starts]
    lengths = [[entry >> 1 for entry in chunk] for chunk in entries]
    if sum(map(sum, lengths)) != reader.remaining:
        raise BitstreamError(None, f"tensor '{name}' has chunk lengths that do not add up to its payload")
    if stats is not None:
        stats.side_bytes += reader.position - table_start + 1
    out = np.empty((count, width), np.uint8)
    offset = reader.position
    jobs = []
    for start, chunk, chunk_lengths in zip(starts, entries, lengths):
        blobs = []
        for entry, length in zip(chunk, chunk_lengths):
            blobs.append((entry & 1, payload[offset : offset + length]))
            offset += length
        jobs.append((start, min(size, count - start), blobs))

    def rebuild(job: tuple[int, int, list[tuple[int, memoryview]]]) -> None:
        start, values, blobs = job
        planes = []
        for method, blob in blobs:
            if method == _HUFFMAN:
                planes.append(_inflate(blob, values, name))
            elif len(blob) != values:
                raise BitstreamError(None, f"tensor '{name}' has a stored chunk of the wrong length")
            else:
                planes.append(np.frombuffer(blob, np.uint8))
        join_planes(planes, out[start : start + values])

    _map(rebuild, jobs, out.nbytes)
    if stats is not None:
        coded = sum(map(sum, lengths))
        stats.payload_bytes += coded
        stats.ideal_bits += 8 * coded  # a Huffman code is its own model
        stats.values += count
        for chunk in entries:
            for entry in chunk:
                key = "huffman" if entry & 1 else "stored"
                stats.methods[key] = stats.methods.get(key, 0) + 1
        if stats.measure and count:
            stats.empirical_bits += sum(_order0_bits(plane) for plane in split_planes(out))
    return out.view(dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(shape)
