"""Bit-exact coding of float tensors in regrouped byte planes, fast enough for whole checkpoints.

A float's bytes hold very different information. In trained weights the exponent carries most of
the redundancy (MiniLM's float32 exponents: 2.6 of 8 bits), the low mantissa bytes almost none,
and the sign none at all. So the top 16 bits of every value are rotated left by one: the exponent
(or, for float16, the exponent and two mantissa bits) then fills the top byte alone and the sign
moves to the bottom of the next one (float32 s|e8|m23 -> [e8] [m22..16|s] [m15..8] [m7..0]). Each
byte position is one plane, each plane is cut in chunks of 2^CHUNK_LOG2 values, and every chunk is
a zstd frame where that saves bytes, else stored as it is.

Why zstd (its Huffman-coded literals, with matches only of 7 bytes or more) rather than
constriction's ANS, which codes the quantized tensors: on MiniLM's exponent plane constriction's
categorical ANS decodes 40 M symbols/s, deflate's Huffman 267 MB/s and zstd 1.6 GB/s, at 2.615
bits per exponent (deflate 2.598, the plane's order-0 entropy 2.650: block-wise tables follow the
statistics along a tensor); unlike a Huffman code, zstd's matches also code the all-zero runs of
weights stored with fewer significant bits below one bit per byte. Chunks are coded and decoded
on every core (nnc_tool/parallel.py): zstd and numpy release the GIL.

Payload: u8 log2(chunk values); then for each chunk, for each plane, a varint (length << 2 |
method: stored, zstd or bits); then the chunks' bytes in that order.
"""
from __future__ import annotations

import math
import threading

import numpy as np
import zstandard

from ..bitstream.primitives import ByteReader, ByteWriter
from ..errors import BitstreamError
from ..parallel import ordered_map
from .integers import StreamStats

# Values per chunk: large enough that zstd's block tables settle and a chunk's bookkeeping is
# noise, small enough that a 10 M-value tensor keeps both cores busy.
CHUNK_LOG2 = 20
MAX_CHUNK_LOG2 = 26
_STORED, _ZSTD, _BITS = 0, 1, 2
_METHOD_BITS = 2
_METHOD_NAMES = {_STORED: "stored", _ZSTD: "zstd", _BITS: "bits"}
# A plane that uses at most this many of its 8 bit positions may be coded as those bits alone.
_MAX_PACKED_BITS = 4
# zstd's fastest strategy, matches of 7 bytes or more only: on exponent planes shorter matches cost
# more than the literals they replace (zstd level 1: 2.89 bits per exponent, these: 2.615).
_ZSTD_PARAMETERS = dict(window_log=17, chain_log=6, hash_log=6, search_log=1, min_match=7, target_length=0,
                        write_content_size=0, write_checksum=0, write_dict_id=0)
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


def _order0_bits(plane: np.ndarray) -> float:
    """The plane's code length under its own order-0 statistics, in bits."""
    counts = np.bincount(plane, minlength=256)
    p = counts[counts > 0] / plane.size
    return float(-(counts[counts > 0] * np.log2(p)).sum())


_COMPRESSORS = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    """This thread's compressor: building one costs ~12 us, a small tensor's four planes less
    (ppocr-cls lossless: 1.3 of 13 ms); one instance must not serve two threads at once."""
    compressor = getattr(_COMPRESSORS, "instance", None)
    if compressor is None:
        parameters = zstandard.ZstdCompressionParameters(strategy=zstandard.STRATEGY_FAST, **_ZSTD_PARAMETERS)
        compressor = _COMPRESSORS.instance = zstandard.ZstdCompressor(compression_params=parameters)
    return compressor


def _used_bits(plane: np.ndarray) -> list[int]:
    mask = int(np.bitwise_or.reduce(plane)) if plane.size else 0
    return [bit for bit in range(7, -1, -1) if mask >> bit & 1]


def _pack_bits(plane: np.ndarray, bits: list[int]) -> bytes:
    """The plane as its used bit positions only: a mask byte, then each used bit (high to low) of
    every value, packed eight to a byte."""
    mask = sum(1 << bit for bit in bits)
    return bytes([mask]) + b"".join(np.packbits((plane >> bit) & 1).tobytes() for bit in bits)


def _code_plane(plane: np.ndarray) -> tuple[int, bytes]:
    """The smallest of: stored, a zstd frame, and (for planes that never set most bit positions,
    such as the low byte of weights kept with fewer mantissa bits) the used bits packed."""
    raw = plane.tobytes()
    candidates = [(_STORED, raw), (_ZSTD, _compressor().compress(raw))]
    bits = _used_bits(plane)
    if len(bits) <= _MAX_PACKED_BITS:
        candidates.append((_BITS, _pack_bits(plane, bits)))
    return min(candidates, key=lambda candidate: len(candidate[1]))


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
            writer.varint(len(blob) << _METHOD_BITS | method)
    for chunk in chunks:
        for _, blob in chunk:
            writer.raw(blob)
    return writer.getvalue()


def _unzstd(blob: memoryview, expected: int, name: str) -> np.ndarray:
    try:
        data = zstandard.ZstdDecompressor().decompress(blob, max_output_size=expected)
    except zstandard.ZstdError as err:
        raise BitstreamError(None, f"tensor '{name}' has a damaged zstd chunk ({err})") from None
    if len(data) != expected:
        raise BitstreamError(None, f"tensor '{name}' has a zstd chunk of the wrong length")
    return np.frombuffer(data, np.uint8)


def _unpack_bits(blob: memoryview, values: int, name: str) -> np.ndarray:
    if not len(blob):
        raise BitstreamError(None, f"tensor '{name}' has a bit-packed chunk without its mask")
    bits = [bit for bit in range(7, -1, -1) if blob[0] >> bit & 1]
    width = (values + 7) // 8
    if len(blob) != 1 + len(bits) * width:
        raise BitstreamError(None, f"tensor '{name}' has a bit-packed chunk of the wrong length")
    plane = np.zeros(values, np.uint8)
    for index, bit in enumerate(bits):
        packed = np.frombuffer(blob[1 + index * width : 1 + (index + 1) * width], np.uint8)
        plane |= np.unpackbits(packed, count=values) << bit
    return plane


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
    lengths = [[entry >> _METHOD_BITS for entry in chunk] for chunk in entries]
    coded = sum(map(sum, lengths))
    if coded != reader.remaining:
        raise BitstreamError(None, f"tensor '{name}' has chunk lengths that do not add up to its payload")
    if stats is not None:
        stats.side_bytes += reader.position - table_start + 1
    out = np.empty((count, width), np.uint8)
    offset = reader.position
    jobs = []
    for start, chunk, chunk_lengths in zip(starts, entries, lengths):
        blobs = []
        for entry, length in zip(chunk, chunk_lengths):
            blobs.append((entry & (1 << _METHOD_BITS) - 1, payload[offset : offset + length]))
            offset += length
        jobs.append((start, min(size, count - start), blobs))

    def rebuild(job: tuple[int, int, list[tuple[int, memoryview]]]) -> None:
        start, values, blobs = job
        planes = []
        for method, blob in blobs:
            if method == _ZSTD:
                planes.append(_unzstd(blob, values, name))
            elif method == _BITS:
                planes.append(_unpack_bits(blob, values, name))
            elif len(blob) != values:
                raise BitstreamError(None, f"tensor '{name}' has a stored chunk of the wrong length")
            elif method == _STORED:
                planes.append(np.frombuffer(blob, np.uint8))
            else:
                raise BitstreamError(None, f"tensor '{name}' has a chunk of reserved method {method}")
        join_planes(planes, out[start : start + values])

    _map(rebuild, jobs, out.nbytes)
    if stats is not None:
        stats.payload_bytes += coded
        stats.ideal_bits += 8 * coded  # zstd's own tables are its model
        stats.values += count
        for chunk in entries:
            for entry in chunk:
                key = _METHOD_NAMES.get(entry & (1 << _METHOD_BITS) - 1, "reserved")
                stats.methods[key] = stats.methods.get(key, 0) + 1
        if stats.measure and count:
            stats.empirical_bits += sum(_order0_bits(plane) for plane in split_planes(out))
    return out.view(dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(shape)
