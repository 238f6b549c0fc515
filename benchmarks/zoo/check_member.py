"""Round-trip zoo members through nnc_tool.api and print what the benchmark table would show.

    python -m benchmarks.zoo.check_member crepe-tiny resemblyzer --qp -44 -38 -32 --samples 32

For each member and QP: encode (EncodeOptions(qp=Q), no calibration), decode to a file with the
original's suffix, evaluate(original, rebuilt, inputs). Prints one line per run, with the coded
bytes of each top-level key of the file (e.g. a checkpoint's model_state vs optimizer_state);
an encode/decode/evaluate error is printed verbatim on its line instead of numbers.
"""
from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import tempfile
import traceback
from collections import defaultdict
from pathlib import Path

from nnc_tool.api import EncodeOptions, decode, encode

from . import models
from .base import ZooModel


def discover() -> dict[str, ZooModel]:
    found = {}
    for module in pkgutil.iter_modules(models.__path__):
        member = getattr(importlib.import_module(f"{models.__name__}.{module.name}"), "MODEL", None)
        if isinstance(member, ZooModel):
            found[member.name] = member
    return found


def bytes_by_top_key(report) -> dict[str, int]:
    groups: dict[str, int] = defaultdict(int)
    for tensor in report.tensors:
        head, nested, _ = tensor.name.partition("/")
        groups[head if nested and head else "(top level)"] += tensor.coded_bytes
    return dict(groups)


def run(member: ZooModel, qps: list[int], samples: int) -> list[dict]:
    original = member.fetch()
    inputs = member.make_inputs(original, samples)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for qp in qps:
            row: dict = {"member": member.name, "qp": qp, "file_bytes": original.stat().st_size}
            stream = Path(scratch) / f"{member.name}.nnc"
            rebuilt = Path(scratch) / f"rebuilt{original.suffix}"
            stage = "encode"
            try:
                report = encode(original, stream, EncodeOptions(qp=qp))
                row.update(bitstream_bytes=report.bitstream_bytes, ratio=round(report.ratio, 2), groups=bytes_by_top_key(report))
                stage = "decode"
                decode(stream, rebuilt)
                stage = "evaluate"
                fidelity = member.evaluate(original, rebuilt, inputs)
                row.update(snr_db=round(fidelity.output_snr_db, 2), agreement=round(fidelity.agreement, 2),
                           measure=fidelity.measure, extra={k: round(v, 5) for k, v in fidelity.extra.items()})
            except Exception as error:  # the table records failures, verbatim
                row["error"] = f"{stage}: {type(error).__name__}: {error}"
                row["where"] = traceback.format_exc(limit=-2).strip().splitlines()[-3:]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    members = discover()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"members (default all): {', '.join(sorted(members))}")
    parser.add_argument("--qp", type=int, nargs="+", default=[-38])
    parser.add_argument("--samples", type=int, default=32)
    arguments = parser.parse_args()
    for name in arguments.names or sorted(members):
        run(members[name], arguments.qp, arguments.samples)


if __name__ == "__main__":
    main()
