"""safetensors files: an 8-byte little-endian header length, a JSON header, then raw tensor bytes.

We parse the file ourselves rather than through the `safetensors` package so that every
bound is checked before anything is allocated and so that the header can be kept verbatim.

Topology = the header exactly as stored in the file (the 8-byte length is implied). It is
JSON holding the key order, dtypes, shapes, data offsets and `__metadata__`. Since the
offsets depend only on dtypes and shapes, which the pipeline never changes, writing the
header back verbatim followed by the tensor bytes reproduces an unchanged file byte for byte.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FormatError
from ..fileio import atomic_output
from ..model import Model, Tensor, default_role, dtype_name, numpy_dtype

FORMAT_NAME = "safetensors"

# safetensors' own reader refuses headers above 100 MB; a larger claim means a damaged file.
MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype tags that have a lossless home in our dtype set. Others (F8_*, C64, ...)
# are refused rather than silently converted.
_ST_TO_NAME: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        # json.loads would silently keep the last one, hiding which bytes belong to the key.
        raise ValueError("duplicate key in header")
    return dict(pairs)


def _parse_header(path: Path, header: bytes, data_size: int) -> tuple[dict[str, Any], list[tuple[str, str, tuple[int, ...], int, int]]]:
    """Validate the header; return it and (key, dtype, shape, begin, end) per tensor in header order."""
    try:
        parsed = json.loads(header.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormatError(path, f"safetensors header is not valid JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise FormatError(path, "safetensors header is not a JSON object")
    metadata = parsed.get("__metadata__")
    if metadata is not None and not isinstance(metadata, dict):
        raise FormatError(path, "safetensors __metadata__ is not a JSON object")
    entries = []
    for key, info in parsed.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise FormatError(path, f"safetensors entry '{key}' lacks dtype, shape or data_offsets")
        tag, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if tag not in _ST_TO_NAME:
            raise FormatError(path, f"tensor '{key}' has dtype {tag!r}, which is not supported")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise FormatError(path, f"tensor '{key}' has an invalid shape {shape!r}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise FormatError(path, f"tensor '{key}' has invalid data_offsets {offsets!r}")
        name = _ST_TO_NAME[tag]
        nbytes = int(np.prod(shape, dtype=np.int64)) * numpy_dtype(name).itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise FormatError(path, f"tensor '{key}' data_offsets do not match its dtype and shape")
        if offsets[1] > data_size:
            raise FormatError(path, f"file is truncated: tensor '{key}' ends beyond the end of the file")
        entries.append((key, name, tuple(shape), offsets[0], offsets[1]))
    spans = sorted((b, e) for _, _, _, b, e in entries if e > b)
    for (_, prev_end), (begin, _) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise FormatError(path, "safetensors tensors overlap in the data section")
    end = spans[-1][1] if spans else 0
    if end != data_size:
        raise FormatError(path, f"data section has {data_size - end} bytes that belong to no tensor")
    return parsed, entries


def read(path: str | os.PathLike) -> Model:
    """Read a safetensors file into a Model (format 'safetensors')."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise FormatError(path, "file is too short to be safetensors")
            (header_len,) = struct.unpack("<Q", prefix)
            # Check the claimed length before reading it: a damaged length must not make us
            # allocate or read gigabytes.
            if header_len < 2 or header_len > size - 8 or header_len > MAX_HEADER_BYTES:
                raise FormatError(path, f"safetensors header length {header_len} does not fit a {size}-byte file")
            header = f.read(header_len)
            _, entries = _parse_header(path, header, size - 8 - header_len)
            data_start = 8 + header_len
            tensors = []
            for key, name, shape, begin, end in entries:
                array = np.empty(shape, dtype=numpy_dtype(name))
                f.seek(data_start + begin)
                # Read straight into the array's own buffer: no extra copy, and it owns its data.
                if f.readinto(memoryview(array.reshape(-1).view(np.uint8))) != end - begin:
                    raise FormatError(path, f"file is truncated inside tensor '{key}'")
                tensors.append(Tensor(key, array, default_role(name, array.ndim)))
    except OSError as exc:
        raise FormatError(path, f"cannot read file ({exc.strerror or exc})") from None
    return Model(format=FORMAT_NAME, topology=header, tensors=tensors)


def write(model: Model, path: str | os.PathLike) -> None:
    """Write a Model read from safetensors back, atomically; unchanged models come out byte-identical."""
    path = Path(path)
    header = bytes(model.topology)
    _, entries = _parse_header(path, header, _data_size(path, header))
    by_name = model.tensor_map()
    unknown = by_name.keys() - {key for key, *_ in entries}
    if unknown:
        raise FormatError(path, f"tensor '{sorted(unknown)[0]}' is not part of this safetensors model")
    with atomic_output(path) as tmp, tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        position = 0
        for key, name, shape, begin, end in sorted(entries, key=lambda e: e[3]):
            if key not in by_name:
                raise FormatError(path, f"tensor '{key}' is missing from the model")
            array = by_name[key].array
            if tuple(array.shape) != shape:
                raise FormatError(path, f"tensor '{key}' has shape {tuple(array.shape)}, expected {shape}")
            if dtype_name(array.dtype) != name:
                array = array.astype(numpy_dtype(name))
            if begin > position:  # gaps are not produced by safetensors itself, but stay valid
                f.write(bytes(begin - position))
            f.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
            position = end


def _data_size(path: Path, header: bytes) -> int:
    """The data-section size a header implies (its largest end offset)."""
    try:
        parsed = json.loads(header.decode("utf-8"))
        ends = [info["data_offsets"][1] for key, info in parsed.items() if key != "__metadata__"]
    except (UnicodeDecodeError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise FormatError(path, "model topology is not a safetensors header") from None
    return max(ends, default=0) if all(type(e) is int for e in ends) else -1
