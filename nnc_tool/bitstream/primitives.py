"""Bounds-checked little-endian byte reading and writing.

Every read checks the remaining length first, so a damaged or hostile stream ends in a
`BitstreamError` instead of a numpy/struct exception or an oversized allocation.
"""
from __future__ import annotations

import struct

import numpy as np

from ..errors import BitstreamError


class ByteWriter:
    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u8(self, value: int) -> None:
        self._parts.append(struct.pack("<B", value))

    def u16(self, value: int) -> None:
        self._parts.append(struct.pack("<H", value))

    def u32(self, value: int) -> None:
        self._parts.append(struct.pack("<I", value))

    def f32(self, value: float) -> None:
        self._parts.append(struct.pack("<f", value))

    def varint(self, value: int) -> None:
        """Unsigned LEB128."""
        if value < 0:
            raise ValueError("varint needs a non-negative value")
        out = bytearray()
        while True:
            byte = value & 0x7F
            value >>= 7
            if value:
                out.append(byte | 0x80)
            else:
                out.append(byte)
                break
        self._parts.append(bytes(out))

    def svarint(self, value: int) -> None:
        """Signed LEB128 through zigzag mapping."""
        self.varint((value << 1) if value >= 0 else ((-value << 1) - 1))

    def text(self, value: str) -> None:
        encoded = value.encode("utf-8")
        self.varint(len(encoded))
        self._parts.append(encoded)

    def blob(self, value: bytes) -> None:
        """Length-prefixed bytes."""
        self.varint(len(value))
        self._parts.append(bytes(value))

    def raw(self, value: bytes) -> None:
        self._parts.append(bytes(value))

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


class ByteReader:
    def __init__(self, data: bytes | memoryview, what: str = "unit") -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._what = what

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    @property
    def position(self) -> int:
        """Bytes consumed so far."""
        return self._pos

    def peek(self, n: int) -> memoryview:
        """The next `n` bytes (at most what remains) without consuming them."""
        return self._data[self._pos : self._pos + max(0, min(n, self.remaining))]

    def _take(self, n: int) -> memoryview:
        if n < 0 or n > self.remaining:
            raise BitstreamError(None, f"{self._what} is truncated or corrupt (needs {n} bytes, has {self.remaining})")
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def u8(self) -> int:
        return self._take(1)[0]

    def u16(self) -> int:
        return struct.unpack("<H", self._take(2))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self._take(4))[0]

    def f32(self) -> float:
        return struct.unpack("<f", self._take(4))[0]

    def varint(self, limit: int = 1 << 63) -> int:
        value = 0
        shift = 0
        while True:
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if shift > 63:
                raise BitstreamError(None, f"{self._what} has an overlong integer")
        if value > limit:
            raise BitstreamError(None, f"{self._what} declares a value {value} above the limit {limit}")
        return value

    def svarint(self) -> int:
        value = self.varint((1 << 64) - 1)
        return (value >> 1) if not value & 1 else -((value + 1) >> 1)

    def text(self, limit: int = 1 << 16) -> str:
        raw = bytes(self._take(self.varint(limit)))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BitstreamError(None, f"{self._what} has a malformed name") from None

    def blob(self) -> memoryview:
        return self._take(self.varint(self.remaining))

    def raw(self, n: int) -> memoryview:
        return self._take(n)

    def array(self, dtype: str, count: int) -> np.ndarray:
        """`count` little-endian items of `dtype`, copied out of the stream."""
        dt = np.dtype(dtype).newbyteorder("<")
        return np.frombuffer(self._take(count * dt.itemsize), dtype=dt).astype(dt.newbyteorder("="))

    def expect_end(self) -> None:
        if self.remaining:
            raise BitstreamError(None, f"{self._what} has {self.remaining} unexpected trailing bytes")
