"""The reading side of nnc: a bitstream back into a model (`decompress_model`, `decode`) and a
description of its units and tensors (`info`).

Kept apart from the encoder (nnc_tool.api) so that `nnc decode` and `nnc info` import only the
container, the tensor decoders and the model formats, not onnxruntime, the quantizer or pruning.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .bitstream import container
from .bitstream.container import UnitType
from .bitstream.primitives import ByteReader
from .coding.pack import MAX_PACKED_TENSORS, DecodedPack, decode_pack
from .coding.tensors import Coding, TensorHeader, decode_tensor, read_header
from .errors import BitstreamError, NncError, UsageError
from .fileio import same_file
from .formats import FORMATS, check_output_suffix, model_files, role_reasons, write_model
from .model import Model, Tensor, TensorRole
from .parallel import ordered_map


@dataclass
class TensorReport:
    name: str
    role: str
    dtype: str
    shape: tuple[int, ...]
    coding: str
    coded_bytes: int
    step: float | None = None
    qp: int | None = None
    zero_rows: int = 0
    packed: bool = False  # in the pack unit; coded_bytes is then an even share of that unit
    reason: str | None = None  # why the tensor has its role (formats.role_reasons), not stored in the stream


@dataclass
class DecodeReport:
    input: str
    output: str
    format: str
    bitstream_bytes: int
    output_bytes: int
    tensor_count: int
    seconds: float


@dataclass
class UnitInfo:
    type: str
    offset: int
    size: int
    tensor: TensorReport | None = None
    packed: list[TensorReport] = field(default_factory=list)  # a pack unit's tensors


@dataclass
class StreamInfo:
    path: str
    version: tuple[int, int]
    parameters: dict
    units: list[UnitInfo]
    entropy: dict | None = None  # with info(..., entropy=True): see coding.report.stream_entropy_report

    @property
    def size(self) -> int:
        return sum(u.size for u in self.units) + container.HEADER_SIZE


def decompress_model(data: bytes | memoryview) -> Model:
    """Rebuild the in-memory model from a complete bitstream."""
    units = list(container.iter_units(data))
    parameters, topology = _side_units(units)
    expected = parameters.get("tensor_count")
    if not isinstance(expected, int) or isinstance(expected, bool) or expected < 0:
        raise BitstreamError(None, "parameter set has a malformed tensor_count")
    pack, data_units = _split_pack(units, expected, container.stream_minor(data))
    present = len(data_units) + (len(pack.tensors) if pack else 0)
    if expected != present:
        raise BitstreamError(None, f"bitstream is truncated: {present} of {expected} tensors present")
    tensors = [None] * expected
    if pack is not None:
        for position, tensor in zip(pack.positions, pack.tensors):
            tensors[position] = tensor
    # Tensors decode side by side (nnc_tool/parallel.py), in order.
    decoded = ordered_map(decode_tensor, [unit.payload for unit in data_units], "tensors")
    tensors = [tensor if tensor is not None else next(decoded) for tensor in tensors]
    metadata = parameters.get("metadata", {})
    if not isinstance(metadata, dict):
        raise BitstreamError(None, "parameter set has malformed metadata")
    return Model(format=parameters["format"], topology=topology, tensors=tensors, metadata=metadata)


def decode(bitstream_path: str | os.PathLike, output_path: str | os.PathLike) -> DecodeReport:
    """Rebuild a model from a bitstream and write it, in its original format, to `output_path`."""
    started = time.perf_counter()
    bitstream_path = Path(bitstream_path)
    data = _read_bitstream_file(bitstream_path)
    if same_file(bitstream_path, output_path):
        raise UsageError(output_path, "output would overwrite the input bitstream")
    try:
        header_format = _peek_format(data)
        check_output_suffix(header_format, output_path)
        model = decompress_model(data)
    except BitstreamError as err:
        raise BitstreamError(bitstream_path, err.problem) from None
    write_model(model, output_path)
    return DecodeReport(
        input=str(bitstream_path),
        output=str(output_path),
        format=model.format,
        bitstream_bytes=len(data),
        output_bytes=model_file_bytes(Path(output_path), model),
        tensor_count=len(model.tensors),
        seconds=time.perf_counter() - started,
    )


def info(bitstream_path: str | os.PathLike, entropy: bool = False) -> StreamInfo:
    """Describe a bitstream's units and tensors; with `entropy`, also decode every payload and
    compare its size with the entropy of the models it was coded with plus side information."""
    bitstream_path = Path(bitstream_path)
    data = _read_bitstream_file(bitstream_path)
    try:
        units = list(container.iter_units(data))
        parameters, topology = _side_units(units)
        described = [UnitInfo(u.type.name.lower(), u.offset, u.size) for u in units[:2]]
        pack, data_units = _split_pack(units, parameters.get("tensor_count"), container.stream_minor(data))
        if pack is not None:
            shares = even_shares(units[2].size, len(pack.tensors))
            described.append(UnitInfo("pack", units[2].offset, units[2].size,
                                      packed=[describe_packed_tensor(t, share) for t, share in zip(pack.tensors, shares)]))
        described += [UnitInfo("data", u.offset, u.size, describe_data_unit(u.payload, u.size)) for u in data_units]
        explained = [u.tensor for u in described if u.tensor is not None]
        explained += [t for u in described for t in (u.packed or [])]
        explain_roles(parameters["format"], topology, explained)
        entropy_report = None
        if entropy:
            from .coding.report import stream_entropy_report  # decodes every payload: only when asked

            entropy_report = stream_entropy_report(data)
    except BitstreamError as err:
        raise BitstreamError(bitstream_path, err.problem) from None
    version = tuple(data[len(container.MAGIC) : len(container.MAGIC) + 2])
    return StreamInfo(str(bitstream_path), version, parameters, described, entropy_report)


def model_file_bytes(path: Path, model: Model) -> int:
    """Bytes the model occupies on disk, including ONNX external data files."""
    return sum(p.stat().st_size for p in model_files(path, model.format))


def _read_bitstream_file(path: Path) -> bytes:
    if not path.is_file():
        raise NncError(path, "no such file")
    data = path.read_bytes()
    if not data:
        raise BitstreamError(path, "file is empty")
    return data


def _peek_format(data: bytes) -> str:
    """The stored format from the parameter set alone, so a wrong suffix fails before any decoding."""
    units = container.iter_units(data)
    first = next(units, None)
    if first is None or first.type != UnitType.PARAMETER_SET:
        raise BitstreamError(None, "bitstream does not start with a parameter set")
    parameters = container.parse_parameter_set(first.payload)
    fmt = parameters.get("format")
    if fmt not in FORMATS:
        raise BitstreamError(None, f"bitstream holds an unknown model format {fmt!r}")
    return fmt


def _side_units(units: list[container.Unit]) -> tuple[dict, bytes]:
    if len(units) < 2 or units[0].type != UnitType.PARAMETER_SET or units[1].type != UnitType.TOPOLOGY:
        raise BitstreamError(None, "bitstream is truncated or lacks its parameter set and topology units")
    data_start = 3 if len(units) > 2 and units[2].type == UnitType.PACK else 2
    if any(u.type != UnitType.DATA for u in units[data_start:]):
        raise BitstreamError(None, "bitstream has side units or a second pack unit among its data units")
    parameters = container.parse_parameter_set(units[0].payload)
    if parameters.get("format") not in FORMATS:
        raise BitstreamError(None, f"bitstream holds an unknown model format {parameters.get('format')!r}")
    return parameters, container.parse_topology(units[1].payload)

def _split_pack(units: list[container.Unit], tensor_count, minor: int) -> tuple[DecodedPack | None, list[container.Unit]]:
    """The decoded pack unit (if the stream has one, right after the topology) and the data units."""
    if len(units) < 3 or units[2].type != UnitType.PACK:
        return None, units[2:]
    if not isinstance(tensor_count, int) or isinstance(tensor_count, bool):
        raise BitstreamError(None, "parameter set has a malformed tensor_count")
    # Every tensor outside the pack has a data unit: this bounds the positions a pack may name.
    count = min(tensor_count, len(units) - 3 + MAX_PACKED_TENSORS)
    return decode_pack(units[2].payload, count, float_groups=minor >= container.FLOAT_GROUPS_MINOR), units[3:]


def even_shares(total: int, count: int) -> list[int]:
    """`count` integer shares of `total` bytes that add up to it."""
    return [total // count + (1 if i < total % count else 0) for i in range(count)] if count else []


def describe_packed_tensor(tensor: Tensor, coded_bytes: int) -> TensorReport:
    """A packed tensor: exactly coded, `coded_bytes` its share of the pack unit."""
    return TensorReport(
        name=tensor.name,
        role=TensorRole(tensor.role).name.lower(),
        dtype=tensor.dtype,
        shape=tuple(tensor.array.shape),
        coding="packed",
        coded_bytes=coded_bytes,
        packed=True,
    )


def explain_roles(format_name: str, topology: bytes, reports: list[TensorReport]) -> None:
    """Fill in each report's `reason`, recomputed from the topology (the bitstream holds none)."""
    stored = [(r.name, r.dtype, len(r.shape), TensorRole[r.role.upper()]) for r in reports]
    try:
        reasons = role_reasons(format_name, topology, stored)
    except NncError:
        return  # a damaged topology: the units are still worth listing; decode reports the damage
    for report, reason in zip(reports, reasons):
        report.reason = reason


def describe_data_unit(payload: memoryview, unit_size: int) -> TensorReport:
    header: TensorHeader = read_header(ByteReader(payload, "data unit"))
    step = qp = None
    if header.coding == Coding.QUANTIZED:
        step = float(header.steps.max())
        qp = int(header.qps.max()) if header.qps is not None else None
    return TensorReport(
        name=header.name,
        role=TensorRole(header.role).name.lower(),
        dtype=header.dtype,
        shape=header.shape,
        coding=header.coding.name.lower(),
        coded_bytes=unit_size,
        step=step,
        qp=qp,
        zero_rows=header.zero_rows,
    )
