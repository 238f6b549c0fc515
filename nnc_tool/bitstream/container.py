"""The nnc container: a stream header followed by length- and CRC-framed units.

Layout (all integers little-endian; see docs/FORMAT.md):

    stream header   magic b"\\x8bNNC\\r\\n\\x1a\\n", u8 major, u8 minor, u32 CRC32(magic..minor)
    unit            u8 type, u32 payload length, payload, u32 CRC32(type..payload)

The first unit is the parameter set (JSON), the second the topology, then one data unit
per tensor. Units are parsed lazily and each data unit stands on its own.
"""
from __future__ import annotations

import enum
import json
import lzma
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import BitstreamError

MAGIC = b"\x8bNNC\r\n\x1a\n"
VERSION = (1, 0)
_UNIT_HEAD = struct.Struct("<BI")
_CRC = struct.Struct("<I")
# A parameter set or topology larger than this is not something we wrote.
MAX_SIDE_UNIT = 1 << 30


class UnitType(enum.IntEnum):
    PARAMETER_SET = 1
    TOPOLOGY = 2
    DATA = 3


class TopologyCompression(enum.IntEnum):
    NONE = 0
    ZLIB = 1
    LZMA = 2


@dataclass
class Unit:
    type: UnitType
    payload: memoryview
    offset: int  # where the unit starts in the stream

    @property
    def size(self) -> int:
        return _UNIT_HEAD.size + len(self.payload) + _CRC.size


HEADER_SIZE = len(MAGIC) + 2 + _CRC.size


def stream_header() -> bytes:
    fixed = MAGIC + bytes(VERSION)
    return fixed + _CRC.pack(zlib.crc32(fixed))


def frame_unit(unit_type: UnitType, payload: bytes) -> bytes:
    head = _UNIT_HEAD.pack(unit_type, len(payload))
    crc = zlib.crc32(payload, zlib.crc32(head))
    return head + payload + _CRC.pack(crc)


def parameter_set_payload(parameters: dict) -> bytes:
    """Deterministic JSON: sorted keys, no whitespace."""
    return json.dumps(parameters, sort_keys=True, separators=(",", ":")).encode("utf-8")


def topology_payload(topology: bytes) -> bytes:
    """Compress the weight-free model description with whichever of zlib/LZMA is smaller."""
    options = [
        (TopologyCompression.NONE, topology),
        (TopologyCompression.ZLIB, zlib.compress(topology, 9)),
        (TopologyCompression.LZMA, lzma.compress(topology, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)),
    ]
    method, body = min(options, key=lambda item: len(item[1]))
    return bytes([method]) + body


def parse_parameter_set(payload: memoryview) -> dict:
    try:
        parameters = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BitstreamError(None, "parameter set is not valid JSON") from None
    if not isinstance(parameters, dict):
        raise BitstreamError(None, "parameter set is not a JSON object")
    return parameters


def parse_topology(payload: memoryview, limit: int = MAX_SIDE_UNIT) -> bytes:
    if not payload:
        raise BitstreamError(None, "topology unit is empty")
    method, body = payload[0], bytes(payload[1:])
    try:
        if method == TopologyCompression.NONE:
            return body
        if method == TopologyCompression.ZLIB:
            decompressor = zlib.decompressobj()
            topology = decompressor.decompress(body, limit)
            if decompressor.unconsumed_tail:
                raise BitstreamError(None, "topology expands beyond the size limit")
            return topology
        if method == TopologyCompression.LZMA:
            decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
            topology = decompressor.decompress(body, max_length=limit)
            if not decompressor.eof:
                raise BitstreamError(None, "topology is truncated or expands beyond the size limit")
            return topology
    except (zlib.error, lzma.LZMAError):
        raise BitstreamError(None, "topology unit is corrupt") from None
    raise BitstreamError(None, f"topology unit has unknown compression {method}")


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
        if unit_type not in UnitType._value2member_map_:
            raise BitstreamError(None, f"unknown unit type {unit_type} at byte {position}")
        yield Unit(UnitType(unit_type), payload, position)
        position = end + _CRC.size
