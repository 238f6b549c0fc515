"""How close a bitstream comes to the entropy of its own probability models.

`stream_entropy_report(data)` decodes every data unit and splits the stream into

- side information: the stream header, the parameter set and topology units, unit framing,
  tensor names, tensor headers (dtype, shape, QPs, row masks) and the model descriptions of the
  integer streams (method bytes, bin layouts, count tables);
- the payload: ANS words and fixed-width fields;

and compares the payload with its ideal code length, sum(-log2 p) of every coded symbol under the
exact integer probabilities the coder used (plus the raw bits of uniform fields). `model + side`
is what an ideal entropy coder would need for the same models; the report states how far the
actual stream is above it. It also gives the order-0 empirical entropy of the coded symbols (what
the payload would cost if the models were known for free), which shows what the models' coarse
count tables cost.
"""
from __future__ import annotations

import math

from ..bitstream import container
from ..bitstream.container import UnitType
from ..bitstream.primitives import ByteReader
from ..errors import BitstreamError
from ..model import TensorRole
from .integers import StreamStats
from .names import read_name
from .pack import decode_pack
from .tensors import decode_tensor, read_header


def stream_entropy_report(data: bytes | memoryview) -> dict:
    """Byte accounting of a complete bitstream against the ideal code length of its models.

    Returns a dict with (all sizes in bytes):
      total_bytes               len(data)
      container_bytes           stream header + parameter set and topology units (with framing)
      framing_bytes             type, length and CRC of the data units
      name_bytes                tensor names in the data units
      header_bytes              the rest of the tensor headers (dtype, shape, steps, row masks)
      model_bytes               method bytes and model descriptions of the integer streams
      side_info_bytes           the sum of the five above
      payload_bytes             entropy-coded and fixed-width payload
      ideal_payload_bytes       sum(-log2 p) / 8 under the models used
      empirical_payload_bytes   the coded symbols' order-0 empirical entropy / 8
      ideal_total_bytes         side_info_bytes + ideal_payload_bytes
      overhead_percent          total above ideal_total, in percent
      payload_overhead_percent  payload above ideal_payload, in percent
      methods                   how many integer streams use each method
      tensors                   per data unit (and one row for the pack unit): name, role, coding,
                                methods and the same split
    """
    view = memoryview(data)
    report = {
        "total_bytes": len(view),
        "container_bytes": container.HEADER_SIZE,
        "framing_bytes": 0,
        "name_bytes": 0,
        "header_bytes": 0,
        "model_bytes": 0,
        "payload_bytes": 0,
        "ideal_payload_bytes": 0.0,
        "empirical_payload_bytes": 0.0,
        "methods": {},
        "tensors": [],
    }
    parameters: dict = {}
    for unit in container.iter_units(view):
        if unit.type == UnitType.PARAMETER_SET:
            parameters = container.parse_parameter_set(unit.payload)
        if unit.type == UnitType.PACK:
            float_groups = container.stream_minor(view) >= container.FLOAT_GROUPS_MINOR
            _add_row(report, _pack_row(unit, parameters.get("tensor_count"), float_groups))
            continue
        if unit.type != UnitType.DATA:
            report["container_bytes"] += unit.size
            continue
        reader = ByteReader(unit.payload, "data unit")
        read_name(reader)
        name_bytes = reader.position
        header = read_header(ByteReader(unit.payload, "data unit"))
        stats = StreamStats()
        decode_tensor(unit.payload, stats)
        framing = unit.size - len(unit.payload)
        header_bytes = len(unit.payload) - name_bytes - stats.side_bytes - stats.payload_bytes
        if header_bytes < 0:
            raise BitstreamError(None, "data unit accounting does not add up")
        row = {
            "name": header.name,
            "role": header.role.name.lower(),
            "coding": header.coding.name.lower(),
            "values": header.size,
            "methods": dict(stats.methods),
            "unit_bytes": unit.size,
            "framing_bytes": framing,
            "name_bytes": name_bytes,
            "header_bytes": header_bytes,
            "model_bytes": stats.side_bytes,
            "payload_bytes": stats.payload_bytes,
            "ideal_payload_bytes": stats.ideal_bits / 8,
            "empirical_payload_bytes": stats.empirical_bits / 8,
        }
        _add_row(report, row)
    side = sum(report[k] for k in ("container_bytes", "framing_bytes", "name_bytes", "header_bytes", "model_bytes"))
    report["side_info_bytes"] = side
    report["ideal_total_bytes"] = side + report["ideal_payload_bytes"]
    report["overhead_percent"] = _percent_above(report["total_bytes"], report["ideal_total_bytes"])
    report["payload_overhead_percent"] = _percent_above(report["payload_bytes"], report["ideal_payload_bytes"])
    return report


def _pack_row(unit: container.Unit, tensor_count, float_groups: bool) -> dict:
    """The pack unit as one row: its names, its headers (positions, descriptors, shapes) and the values' streams."""
    if not isinstance(tensor_count, int) or isinstance(tensor_count, bool):
        raise BitstreamError(None, "parameter set has a malformed tensor_count")
    stats = StreamStats()
    pack = decode_pack(unit.payload, tensor_count, stats, float_groups)
    header_bytes = len(unit.payload) - pack.name_bytes - stats.side_bytes - stats.payload_bytes
    if header_bytes < 0:
        raise BitstreamError(None, "pack unit accounting does not add up")
    return {
        "name": f"(pack of {len(pack.tensors)} tensors)",
        "role": "exact" if all(t.role == TensorRole.EXACT for t in pack.tensors) else "mixed",
        "coding": "packed",
        "values": sum(t.array.size for t in pack.tensors),
        "methods": dict(stats.methods),
        "unit_bytes": unit.size,
        "framing_bytes": unit.size - len(unit.payload),
        "name_bytes": pack.name_bytes,
        "header_bytes": header_bytes,
        "model_bytes": stats.side_bytes,
        "payload_bytes": stats.payload_bytes,
        "ideal_payload_bytes": stats.ideal_bits / 8,
        "empirical_payload_bytes": stats.empirical_bits / 8,
    }


def _add_row(report: dict, row: dict) -> None:
    report["tensors"].append(row)
    for key in ("framing_bytes", "name_bytes", "header_bytes", "model_bytes", "payload_bytes", "ideal_payload_bytes", "empirical_payload_bytes"):
        report[key] += row[key]
    for method, count in row["methods"].items():
        report["methods"][method] = report["methods"].get(method, 0) + count


def describe_entropy_report(report: dict) -> str:
    """One paragraph for `nnc info`: the stream against its models' entropy plus side information."""
    r = report
    return (
        f"{r['total_bytes']} B = payload {r['payload_bytes']} B + side information {r['side_info_bytes']} B "
        f"(container+topology {r['container_bytes']}, unit framing {r['framing_bytes']}, names {r['name_bytes']}, "
        f"tensor headers {r['header_bytes']}, models {r['model_bytes']}).\n"
        f"Entropy of the payload under its own models: {r['ideal_payload_bytes']:.1f} B "
        f"(payload is {r['payload_overhead_percent']:+.3f} % above it); model entropy + side information = "
        f"{r['ideal_total_bytes']:.1f} B: the bitstream is within {r['overhead_percent']:.3f} % of it.\n"
        f"Order-0 empirical entropy of the coded symbols: {r['empirical_payload_bytes']:.1f} B "
        f"(what the payload would cost with exact, free models)."
    )


def _percent_above(actual: float, ideal: float) -> float:
    return 100.0 * (actual - ideal) / ideal if ideal > 0 else (0.0 if actual == 0 else math.inf)
