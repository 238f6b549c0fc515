"""The nnc container: a stream header followed by length- and CRC-framed units.

Layout (all integers little-endian; see docs/FORMAT.md):

    stream header   magic b"\\x8bNNC\\r\\n\\x1a\\n", u8 major, u8 minor, u32 CRC32(magic..minor)
    unit            u8 type, u32 payload length, payload, u32 CRC32(type..payload)

The first unit is the parameter set (JSON, possibly deflated), the second the topology
(deflated or LZMA2-compressed), then (2.1) at most one pack unit of small tensors, then one data
unit per other tensor. Units are parsed lazily and each
data unit stands on its own.
"""
from __future__ import annotations

import enum
import json
import lzma
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from ..errors import BitstreamError

MAGIC = b"\x8bNNC\r\n\x1a\n"
# Minor 1 added the pack unit, minor 2 the float-groups coding of data units; an encoder writes
# the lowest minor whose features the stream uses, so older decoders still read what they can.
VERSION = (2, 2)
PACK_MINOR = 1
FLOAT_GROUPS_MINOR = 2
_UNIT_HEAD = struct.Struct("<BI")
_CRC = struct.Struct("<I")
# A parameter set or topology larger than this is not something we wrote.
MAX_SIDE_UNIT = 1 << 30


class UnitType(enum.IntEnum):
    PARAMETER_SET = 1
    TOPOLOGY = 2
    DATA = 3
    PACK = 4  # many small tensors in one unit (coding.pack), since 2.1


class Compression(enum.IntEnum):
    """How a parameter set or topology payload is compressed (its first byte)."""

    NONE = 0
    DEFLATE = 1  # raw DEFLATE (RFC 1951), no zlib header or checksum: the unit has a CRC
    LZMA2 = 2  # u8 dictionary-size exponent d (12..26), then a raw LZMA2 stream (dictionary 2^d)


TopologyCompression = Compression  # the name before 2.0
# LZMA2 literal/position settings the encoder tries (lc, lp, pb); each stream records its own.
_LZMA2_SETTINGS = ((0, 0, 0), (1, 0, 0), (3, 0, 0), (3, 0, 2))
# Dictionary sizes 2^12 .. 2^26 (64 MiB, what xz preset 9 uses): bounds a decoder's memory.
_LZMA2_DICT_BITS = (12, 26)


@dataclass
class Unit:
    type: UnitType
    payload: memoryview
    offset: int  # where the unit starts in the stream

    @property
    def size(self) -> int:
        return _UNIT_HEAD.size + len(self.payload) + _CRC.size


HEADER_SIZE = len(MAGIC) + 2 + _CRC.size


def stream_header(minor: int = VERSION[1]) -> bytes:
    fixed = MAGIC + bytes((VERSION[0], minor))
    return fixed + _CRC.pack(zlib.crc32(fixed))


def _framing(unit_type: UnitType, payload: bytes) -> tuple[bytes, bytes]:
    """A unit's head (type, length) and tail (CRC-32 of head and payload)."""
    head = _UNIT_HEAD.pack(unit_type, len(payload))
    return head, _CRC.pack(zlib.crc32(payload, zlib.crc32(head)))


def frame_unit(unit_type: UnitType, payload: bytes) -> bytes:
    head, tail = _framing(unit_type, payload)
    return head + payload + tail


def write_unit(sink, unit_type: UnitType, payload: bytes) -> int:
    """Write one framed unit to `sink` without joining it in memory first (a data unit can be
    most of a model); returns the bytes written."""
    head, tail = _framing(unit_type, payload)
    for part in (head, payload, tail):
        sink.write(part)
    return len(head) + len(payload) + len(tail)


def parameter_set_payload(parameters: dict) -> bytes:
    """Deterministic JSON (sorted keys, no whitespace), deflated when that is shorter."""
    text = json.dumps(parameters, sort_keys=True, separators=(",", ":")).encode("utf-8")
    deflated = _deflate(text)
    if len(deflated) < len(text):
        return bytes([Compression.DEFLATE]) + deflated
    return bytes([Compression.NONE]) + text


def topology_payload(topology: bytes) -> bytes:
    """Compress the weight-free model description with whichever of DEFLATE/LZMA2 is smallest."""
    return compressed_payload(topology)


def compressed_payload(data: bytes) -> bytes:
    """A compression byte and `data` as the shortest of itself, DEFLATE and LZMA2 (see docs/FORMAT.md)."""
    return _compressed_payload(bytes(data))


def decompressed_payload(payload: memoryview, what: str, limit: int) -> bytes:
    """Undo `compressed_payload`; never expands beyond `limit` bytes."""
    return _decompress(payload, what, limit)


@lru_cache(maxsize=8)
def _compressed_payload(topology: bytes) -> bytes:
    options = [bytes([Compression.NONE]) + topology, bytes([Compression.DEFLATE]) + _deflate(topology)]
    exponent = min(_LZMA2_DICT_BITS[1], max(_LZMA2_DICT_BITS[0], (len(topology) - 1).bit_length()))
    for lc, lp, pb in _LZMA2_SETTINGS:
        body = lzma.compress(
            topology,
            format=lzma.FORMAT_RAW,
            filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": 1 << exponent, "lc": lc, "lp": lp, "pb": pb}],
        )
        options.append(bytes([Compression.LZMA2, exponent]) + body)
    return min(options, key=len)


def parse_parameter_set(payload: memoryview) -> dict:
    text = _decompress(payload, "parameter set", 1 << 24)
    try:
        parameters = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BitstreamError(None, "parameter set is not valid JSON") from None
    if not isinstance(parameters, dict):
        raise BitstreamError(None, "parameter set is not a JSON object")
    return parameters


def parse_topology(payload: memoryview, limit: int = MAX_SIDE_UNIT) -> bytes:
    return _decompress(payload, "topology", limit)


def _deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15, 9)
    return compressor.compress(data) + compressor.flush()


def _decompress(payload: memoryview, what: str, limit: int) -> bytes:
    """Undo `parameter_set_payload` / `topology_payload`; never expands beyond `limit` bytes."""
    if not payload:
        raise BitstreamError(None, f"{what} unit is empty")
    method, body = payload[0], bytes(payload[1:])
    try:
        if method == Compression.NONE:
            if len(body) > limit:
                raise BitstreamError(None, f"{what} is larger than the size limit")
            return body
        if method == Compression.DEFLATE:
            decompressor = zlib.decompressobj(-15)
            data = decompressor.decompress(body, limit)
            if decompressor.unconsumed_tail:
                raise BitstreamError(None, f"{what} expands beyond the size limit")
            if not decompressor.eof or decompressor.unused_data:
                raise BitstreamError(None, f"{what} unit is truncated or has trailing data")
            return data
        if method == Compression.LZMA2:
            if not body:
                raise BitstreamError(None, f"{what} unit is truncated")
            exponent, body = body[0], body[1:]
            if not _LZMA2_DICT_BITS[0] <= exponent <= _LZMA2_DICT_BITS[1]:
                raise BitstreamError(None, f"{what} unit declares an LZMA2 dictionary of 2^{exponent} bytes")
            decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "dict_size": 1 << exponent}])
            data = decompressor.decompress(body, max_length=limit)
            if not decompressor.eof:
                raise BitstreamError(None, f"{what} is truncated or expands beyond the size limit")
            if decompressor.unused_data:
                raise BitstreamError(None, f"{what} unit has trailing data")
            return data
    except (zlib.error, lzma.LZMAError):
        raise BitstreamError(None, f"{what} unit is corrupt") from None
    raise BitstreamError(None, f"{what} unit has unknown compression {method}")


def stream_minor(data: bytes | memoryview) -> int:
    """The minor version of a stream whose header `iter_units` has checked."""
    return memoryview(data)[len(MAGIC) + 1]


def iter_units(data: bytes | memoryview) -> Iterator[Unit]:
    """Check the stream header, then yield units after checking each one's length and CRC."""
    view = memoryview(data)
    if len(view) < len(MAGIC) or bytes(view[: len(MAGIC)]) != MAGIC:
        raise BitstreamError(None, "not an nnc bitstream (bad magic)")
    if len(view) < HEADER_SIZE:
        raise BitstreamError(None, "bitstream is truncated in its header")
    major, minor = view[len(MAGIC)], view[len(MAGIC) + 1]
    if zlib.crc32(view[: HEADER_SIZE - _CRC.size]) != _CRC.unpack_from(view, HEADER_SIZE - _CRC.size)[0]:
        raise BitstreamError(None, "CRC mismatch in the stream header: the bitstream is corrupt")
    if major != VERSION[0]:
        raise BitstreamError(None, f"bitstream version {major}.{minor} is not supported (this nnc reads {VERSION[0]}.x)")
    position = HEADER_SIZE
    while position < len(view):
        if len(view) - position < _UNIT_HEAD.size + _CRC.size:
            raise BitstreamError(None, f"bitstream is truncated at byte {position}")
        unit_type, length = _UNIT_HEAD.unpack_from(view, position)
        end = position + _UNIT_HEAD.size + length
        if end + _CRC.size > len(view):
            raise BitstreamError(None, f"bitstream is truncated: unit at byte {position} declares {length} bytes")
        payload = view[position + _UNIT_HEAD.size : end]
        (stored_crc,) = _CRC.unpack_from(view, end)
        if zlib.crc32(view[position:end]) != stored_crc:
            raise BitstreamError(None, f"CRC mismatch in unit at byte {position}: the bitstream is corrupt")
        if unit_type not in UnitType._value2member_map_ or (unit_type == UnitType.PACK and minor < PACK_MINOR):
            raise BitstreamError(None, f"unknown unit type {unit_type} at byte {position} of a {major}.{minor} stream")
        yield Unit(UnitType(unit_type), payload, position)
        position = end + _CRC.size
