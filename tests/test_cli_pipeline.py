"""The CLI as a pipeline step: sweeps, plots, gates, batch encoding, progress, quiet mode, interrupts."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import nnc_tool
from nnc_tool.batch import Outcome, encode_many, encode_one, output_paths
from nnc_tool.bench import runner
from nnc_tool.bench.gates import Gates, check_report, check_sweep, summarize
from nnc_tool.bench.runner import BenchReport, LatencyStats, QualityStats
from nnc_tool.bench.sweep import parse_sparsities, parse_sweep, sweep
from nnc_tool.cli import main
from nnc_tool.errors import NncError, UsageError
from nnc_tool.progress import ProgressBar, progress_bar
from nnc_tool.units import format_size, parse_size

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
DATA = SAMPLES / "digits_test.npz"
FAST = ["--runs", "3", "--warmup", "0"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(*args):
    try:  # click < 8.2 mixes stderr into stdout unless told not to
        cli_runner = CliRunner(mix_stderr=False)
    except TypeError:
        cli_runner = CliRunner()
    return cli_runner.invoke(main, [str(a) for a in args])


def stderr_lines(result) -> list[str]:
    return result.stderr.strip().splitlines()


# --- sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("300000", 300_000),
        ("0", 0),
        ("200KB", 200_000),
        ("200kb", 200_000),
        ("200 kB", 200_000),
        ("1.5MB", 1_500_000),
        ("2k", 2_000),
        ("64KiB", 65_536),
        ("1.5MiB", 1_572_864),
        ("1GiB", 1024**3),
        ("100B", 100),
        (" 7 MB ", 7_000_000),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text,fragment",
    [("", "not a size"), ("-5KB", "not a size"), ("KB", "not a size"), ("1,5MB", "not a size"),
     ("1.5", "whole number"), ("12 parsecs", "unknown unit"), ("5XB", "unknown unit"), ("1e400", "too large")],
)
def test_parse_size_rejects(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment) as caught:
        parse_size(text)
    assert repr(text) in str(caught.value)


def test_format_size_reads_back() -> None:
    assert format_size(999) == "999 B"
    assert format_size(1_500_000) == "1.50 MB"
    assert parse_size(format_size(1_500_000).replace(" ", "")) == 1_500_000


# --- sweep axes ----------------------------------------------------------------------------


def test_parse_sweep_range_includes_stop_when_reached() -> None:
    assert parse_sweep("qp=-44:-14:3").values == tuple(range(-44, -13, 3))
    assert parse_sweep("qp=-44:-14:3").values[-1] == -14
    assert parse_sweep("qp=-40:-31:4").values == (-40, -36, -32)  # -31 is not on the grid
    assert parse_sweep("QP = -20:-30:-5").values == (-20, -25, -30)
    assert parse_sweep("qp=-38:-38:1").values == (-38,)


def test_parse_sweep_list() -> None:
    axis = parse_sweep("qp=-40,-36,-30,-36")
    assert axis.name == "qp" and axis.values == (-40, -36, -30)


@pytest.mark.parametrize(
    "text,fragment",
    [("-40:-30:2", "AXIS=VALUES"), ("qp=", "AXIS=VALUES"), ("bits=4:8:1", "not 'bits'"),
     ("sparsity=0,0.5", "--sparsity"), ("qp=-40:-30", "three integers"), ("qp=-40:-30:0", "must not be 0"),
     ("qp=-30:-40:2", "never goes"), ("qp=-40,-3.5", "integers"), ("qp=-300:-200:50", "[-256, 255]")],
)
def test_parse_sweep_rejects(text: str, fragment: str) -> None:
    with pytest.raises(UsageError, match=None) as caught:
        parse_sweep(text)
    assert fragment in str(caught.value)


def test_parse_sparsities() -> None:
    assert parse_sparsities("0,0.3,0.5") == (0.0, 0.3, 0.5)
    assert parse_sparsities("0.5") == (0.5,)
    for bad in ("1.0", "0.3,x", "-0.1"):
        with pytest.raises(ValueError):
            parse_sparsities(bad)


# --- sweep ---------------------------------------------------------------------------------


def test_sweep_json_has_every_point_and_sizes_shrink_with_qp() -> None:
    result = run_cli("bench", SAMPLES / "mlp.onnx", "--data", DATA, "--sweep", "qp=-40:-20:10",
                     "--prune", "unstructured", "--sparsity", "0,0.5", *FAST, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    points = report["points"]
    assert [(p["sparsity"], p["qp"]) for p in points] == [(s, q) for s in (0.0, 0.5) for q in (-40, -30, -20)]
    assert report["prune"] == "unstructured" and report["samples"] == 450
    assert report["accuracy_original"] == pytest.approx(98.0, abs=2.0)
    assert report["latency_original"]["runs"] == 3
    for point in points:
        for key in ("bitstream_bytes", "ratio", "encode_seconds", "decode_seconds", "latency_median_ms",
                    "latency_p10_ms", "latency_p90_ms", "latency_ratio", "accuracy", "top1_agreement",
                    "output_snr_db"):
            assert point[key] is not None, key
        assert point["latency_p10_ms"] <= point["latency_median_ms"] <= point["latency_p90_ms"]
        assert point["ratio"] == pytest.approx(report["original_bytes"] / point["bitstream_bytes"])
    for sparsity in (0.0, 0.5):
        sizes = [p["bitstream_bytes"] for p in points if p["sparsity"] == sparsity]
        assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 3, sizes
    # Pruning half of the weights makes every QP's stream smaller, and the finest QP keeps accuracy.
    for dense, pruned in zip(points[:3], points[3:]):
        assert pruned["bitstream_bytes"] < dense["bitstream_bytes"]
    assert points[0]["accuracy"] >= report["accuracy_original"] - 1.0
    assert "pruned (unstructured)" in points[3]["notes"][0] and points[0]["notes"] == []


def test_sweep_measures_the_original_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"latency": 0, "runners": []}
    real_latency, real_runner = runner.measure_latency, runner.make_runner

    def counting_latency(*args, **kwargs):
        calls["latency"] += 1
        return real_latency(*args, **kwargs)

    def counting_runner(path, *args, **kwargs):
        calls["runners"].append(Path(path))
        return real_runner(path, *args, **kwargs)

    monkeypatch.setattr(runner, "measure_latency", counting_latency)
    monkeypatch.setattr(runner, "make_runner", counting_runner)
    report = sweep(SAMPLES / "lenet.onnx", (-38, -30), runs=2, warmup=0, data_path=DATA)
    assert len(report.points) == 2
    assert calls["latency"] == 1 + 2
    assert calls["runners"].count(SAMPLES / "lenet.onnx") == 1
    assert report.to_dict()["points"][1]["qp"] == -30


def test_sweep_table_and_sparsity_list_without_sweep() -> None:
    result = run_cli("bench", SAMPLES / "lenet.onnx", "--data", DATA, "--prune", "unstructured",
                     "--sparsity", "0,0.3", "--qp", "-32", *FAST)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{SAMPLES / 'lenet.onnx'} (onnx)") and "accuracy" in lines[0]
    header = lines[1].split()
    assert header[:3] == ["qp", "sparsity", "bitstream"] and "acc" in header and "SNR" in header
    rows = [line.split() for line in lines[2:4]]
    assert [(r[0], r[1]) for r in rows] == [("-32", "0"), ("-32", "0.3")]
    assert any(line.startswith("note: sparsity 0.3: pruned") for line in lines)
    assert result.stderr == ""  # not a terminal: no progress bar


@pytest.mark.parametrize(
    "arguments,fragment",
    [
        (["--sparsity", "0,0.5"], "need a pruning method"),
        (["--prune", "nm", "--sparsity", "0,0.5"], "--nm K:N"),
        (["--sweep", "qp=-40,-30", "--nnc", "x.nnc"], "--nnc"),
        (["--sweep", "qp=-40,-30", "--bits", "8"], "--bits"),
        (["--sweep", "qp=-40,-30", "--lossless"], "--lossless"),
        (["--sweep", "qp=1:5:-1"], "never goes"),
        (["--plot", "x.png"], "--plot draws a sweep"),
        (["--sweep", "qp=-40,-30", "--plot", "x.gif"], ".png"),
        (["--sweep", "qp=-40,-30", "--plot", "no/such/dir/x.png"], "does not exist"),
        (["--sweep", "qp=-40,-30", "-q", "-v"], "contradict"),
    ],
)
def test_bench_rejects_bad_sweeps(arguments: list[str], fragment: str) -> None:
    result = run_cli("bench", SAMPLES / "mlp.onnx", *FAST, *arguments)
    assert result.exit_code == 2, result.output
    lines = stderr_lines(result)
    assert len(lines) == 1 and lines[0].startswith("nnc: error: ") and fragment in lines[0], lines
    assert result.stdout == ""


def test_encode_takes_one_sparsity(tmp_path: Path) -> None:
    result = run_cli("encode", SAMPLES / "mlp.onnx", "-o", tmp_path / "m.nnc", "--prune", "unstructured",
                     "--sparsity", "0.2,0.4")
    assert result.exit_code == 2 and "one value" in result.stderr
    result = run_cli("encode", SAMPLES / "mlp.onnx", "-o", tmp_path / "m.nnc", "--prune", "unstructured",
                     "--sparsity", "0.4", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["pruning"]["method"] == "unstructured"


# --- plot ----------------------------------------------------------------------------------


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    plot = tmp_path / "plots" / "rd.png"
    plot.parent.mkdir()
    result = run_cli("bench", SAMPLES / "lenet.onnx", "--data", DATA, "--sweep", "qp=-40:-24:8",
                     "--prune", "unstructured", "--sparsity", "0,0.5", *FAST, "--plot", plot)
    assert result.exit_code == 0, result.output
    assert f"plot written to {plot}" in result.stdout
    data = plot.read_bytes()
    width, height = png_size(data)
    assert width > 1000 and height > 500 and len(data) > 30_000
    assert [p.name for p in plot.parent.iterdir()] == ["rd.png"]  # no temporary file left


def test_plot_without_labels_and_for_a_file_without_graph(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    for model in ("mlp.onnx", "mlp_state_dict.pt"):
        plot = tmp_path / f"{model}.svg"
        result = run_cli("bench", SAMPLES / model, "--sweep", "qp=-36,-28", *FAST, "--plot", plot, "-q")
        assert result.exit_code == 0, result.output
        assert result.stdout == ""
        assert plot.read_text().lstrip().startswith("<?xml")


def test_plot_without_matplotlib_is_a_one_line_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    started = time.perf_counter()
    result = run_cli("bench", SAMPLES / "mlp.onnx", "--sweep", "qp=-40:-10:1", *FAST, "--plot", tmp_path / "p.png")
    assert result.exit_code == 2
    assert stderr_lines(result) == ["nnc: error: --plot needs matplotlib: pip install 'nnc-tool[plot]'"]
    assert time.perf_counter() - started < 5  # refused before the 31-point sweep, not after
    assert not (tmp_path / "p.png").exists()


# --- gates ---------------------------------------------------------------------------------


def test_gates_fail_with_one_line_and_exit_1_after_the_report() -> None:
    result = run_cli("bench", SAMPLES / "mlp.onnx", "--data", DATA, *FAST, "--fail-below-accuracy", "99.5",
                     "--fail-above-size", "10KB")
    assert result.exit_code == 1, result.output
    assert "accuracy    original" in result.stdout  # the report still prints
    lines = stderr_lines(result)
    assert len(lines) == 1 and lines[0].startswith("nnc: gate failed: ")
    assert "accuracy 98.00 % < 99.5 %" in lines[0] and "> 10000 B (10.00 KB)" in lines[0]


def test_gates_pass_silently_with_quiet() -> None:
    result = run_cli("bench", SAMPLES / "mlp.onnx", "--data", DATA, *FAST, "--fail-below-accuracy", "95",
                     "--fail-above-size", "1.5MB", "--fail-above-latency-ratio", "1000", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and result.stderr == ""


def test_gates_in_json_and_on_a_given_bitstream(tmp_path: Path) -> None:
    stream = tmp_path / "m.nnc"
    assert run_cli("encode", SAMPLES / "mlp.onnx", "-o", stream, "-q").exit_code == 0
    size = stream.stat().st_size
    result = run_cli("bench", SAMPLES / "mlp.onnx", "--nnc", stream, *FAST, "--fail-above-size", size, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["gates"] == {"passed": True, "failures": []}
    result = run_cli("bench", SAMPLES / "mlp.onnx", "--nnc", stream, *FAST, "--fail-above-size", size - 1, "--json")
    assert result.exit_code == 1
    gates = json.loads(result.stdout)["gates"]
    assert gates["passed"] is False and f"bitstream {size} B" in gates["failures"][0]
    assert stderr_lines(result) == [f"nnc: gate failed: {gates['failures'][0]}"]


def test_sweep_gate_applies_to_every_point() -> None:
    result = run_cli("bench", SAMPLES / "mlp.onnx", "--data", DATA, "--sweep", "qp=-40,-4", *FAST,
                     "--fail-below-accuracy", "90", "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["points"][0]["accuracy"] >= 90 > report["points"][1]["accuracy"]
    assert len(report["gates"]["failures"]) == 1 and report["gates"]["failures"][0].startswith("qp -4: accuracy")
    lines = stderr_lines(result)
    assert len(lines) == 1 and lines[0].startswith("nnc: gate failed: 1 of 2 points fail: qp -4: accuracy")
    result = run_cli("bench", SAMPLES / "mlp.onnx", "--data", DATA, "--sweep", "qp=-40,-30", *FAST,
                     "--fail-below-accuracy", "90", "-q")
    assert result.exit_code == 0 and result.stdout == "" and result.stderr == ""


@pytest.mark.parametrize(
    "arguments,fragment",
    [
        (["--fail-below-accuracy", "90"], "needs --data"),
        (["--fail-below-accuracy", "90", "--data", "UNLABELLED"], "labels"),
        (["--fail-above-size", "10 parsecs"], "unknown unit"),
        (["--fail-above-latency-ratio", "0"], "x>0"),
        (["--fail-below-accuracy", "101"], "101"),
    ],
)
def test_gate_usage_errors(tmp_path: Path, arguments: list[str], fragment: str) -> None:
    unlabelled = tmp_path / "x.npz"
    with np.load(DATA) as data:
        np.savez(unlabelled, x=data["x"][:20])
    arguments = [str(unlabelled) if a == "UNLABELLED" else a for a in arguments]
    result = run_cli("bench", SAMPLES / "mlp.onnx", *FAST, *arguments)
    assert result.exit_code == 2, result.output
    assert fragment in result.stderr and result.stdout == ""


def _report(accuracy: float | None, size: int, original_ms: float | None, rebuilt_ms: float | None) -> BenchReport:
    def latency(ms):
        return None if ms is None else LatencyStats(1, 5, ms, ms * 0.9, ms * 1.1)

    quality = None if accuracy is None else QualityStats(100, 99.0, accuracy, 99.0, 30.0)
    return BenchReport("m.onnx", "onnx", 100_000, size, 100_000 / size, 0.1, 0.1, None, latency(original_ms),
                       latency(rebuilt_ms), quality)


def test_gate_functions() -> None:
    good = _report(98.5, 40_000, 1.0, 0.9)
    assert check_report(good, Gates(98.0, 50_000, 1.0)) == []
    assert check_report(good, Gates()) == [] and not Gates().active
    bad = _report(97.0, 60_000, 1.0, 1.3)
    reasons = check_report(bad, Gates(98.0, parse_size("50KB"), 1.2))
    assert reasons == [
        "accuracy 97.00 % < 98 %",
        "bitstream 60000 B (60.00 KB) > 50000 B (50.00 KB)",
        "latency ratio 1.30 > 1.2 (rebuilt 1.300 ms / original 1.000 ms)",
    ]
    with pytest.raises(UsageError, match="labels"):
        check_report(_report(None, 1, 1.0, 1.0), Gates(min_accuracy=50))
    with pytest.raises(UsageError, match="runs"):
        check_report(_report(90.0, 1, None, None), Gates(max_latency_ratio=2))
    assert summarize(["a", "b", "c", "d", "e"]) == "a; b; c (and 2 more)"


def test_check_sweep_labels_points() -> None:
    from nnc_tool.bench.sweep import SweepPoint, SweepReport

    report = SweepReport("m.onnx", "onnx", 100_000, "structured", None, 99.0, 100, points=[
        SweepPoint(-40, 0.0, _report(98.5, 40_000, 1.0, 1.0)),
        SweepPoint(-20, 0.5, _report(90.0, 20_000, 1.0, 1.0)),
    ])
    assert check_sweep(report, Gates(min_accuracy=95)) == ["qp -20 sparsity 0.5: accuracy 90.00 % < 95 %"]


# --- batch ---------------------------------------------------------------------------------


@pytest.fixture
def corrupt(tmp_path: Path) -> Path:
    path = tmp_path / "inputs" / "corrupt.onnx"
    path.parent.mkdir()
    path.write_bytes(b"\x08\x07 this is not a protobuf model")
    return path


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_batch_skips_a_bad_file_and_exits_2(tmp_path: Path, corrupt: Path, jobs: str) -> None:
    out = tmp_path / "out"
    result = run_cli("encode", SAMPLES / "mlp.onnx", corrupt, SAMPLES / "lenet.onnx", "-d", out, "--jobs", jobs)
    assert result.exit_code == 2, result.output
    assert sorted(p.name for p in out.iterdir()) == ["lenet.nnc", "mlp.nnc"]
    lines = stderr_lines(result)
    assert len(lines) == 1 and lines[0].startswith(f"nnc: error: {corrupt}: "), lines
    stdout = result.stdout.splitlines()
    assert len(stdout) == 3
    assert sorted(line.split(" ")[0] for line in stdout[:2]) == sorted([str(SAMPLES / "lenet.onnx"),
                                                                        str(SAMPLES / "mlp.onnx")])
    assert stdout[2].startswith("encoded 2 of 3 models: ") and "1 failed" in stdout[2]
    # The bitstreams are the ones a single encode writes.
    single = tmp_path / "single.nnc"
    assert run_cli("encode", SAMPLES / "mlp.onnx", "-o", single, "-q").exit_code == 0
    assert (out / "mlp.nnc").read_bytes() == single.read_bytes()


def test_batch_json_lists_reports_and_errors_in_input_order(tmp_path: Path, corrupt: Path) -> None:
    result = run_cli("encode", corrupt, SAMPLES / "mlp.onnx", "-d", tmp_path / "out", "--json", "-j", "0")
    assert result.exit_code == 2
    entries = json.loads(result.stdout)
    assert [e["input"] for e in entries] == [str(corrupt), str(SAMPLES / "mlp.onnx")]
    assert entries[0]["error"].startswith(f"{corrupt}: ") and entries[0]["output"] == str(tmp_path / "out" / "corrupt.nnc")
    assert entries[1]["bitstream_bytes"] == (tmp_path / "out" / "mlp.nnc").stat().st_size
    assert len(stderr_lines(result)) == 1


def test_batch_all_good_exits_0_and_quiet_prints_nothing(tmp_path: Path) -> None:
    result = run_cli("encode", SAMPLES / "mlp.onnx", SAMPLES / "lenet.onnx", "-d", tmp_path / "new" / "dir", "-q")
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and result.stderr == ""
    assert sorted(p.name for p in (tmp_path / "new" / "dir").iterdir()) == ["lenet.nnc", "mlp.nnc"]


@pytest.mark.parametrize(
    "arguments,fragment",
    [
        (["SAMPLES/mlp.onnx", "SAMPLES/mlp.pt2", "-d", "OUT"], "would both be written to"),
        (["SAMPLES/mlp.onnx", "OTHER/MLP.onnx", "-d", "OUT"], "would both be written to"),
        (["SAMPLES/mlp.onnx", "-o", "OUT/a.nnc", "-d", "OUT"], "cannot be used together"),
        (["SAMPLES/mlp.onnx", "SAMPLES/lenet.onnx", "-o", "OUT/a.nnc"], "use -d DIR"),
        (["SAMPLES/mlp.onnx"], "-o OUT.nnc"),
    ],
)
def test_batch_usage_errors_before_any_work(tmp_path: Path, arguments: list[str], fragment: str) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "MLP.onnx").write_bytes((SAMPLES / "mlp.onnx").read_bytes())
    out = tmp_path / "out"
    arguments = [a.replace("SAMPLES", str(SAMPLES)).replace("OTHER", str(other)).replace("OUT", str(out))
                 for a in arguments]
    result = run_cli("encode", *arguments)
    assert result.exit_code == 2, result.output
    lines = stderr_lines(result)
    assert len(lines) == 1 and lines[0].startswith("nnc: error: ") and fragment in lines[0], lines
    assert not out.exists()


def test_output_paths() -> None:
    assert output_paths(["a/x.onnx", "b/y.pt"], "out") == [Path("out/x.nnc"), Path("out/y.nnc")]
    with pytest.raises(UsageError, match="a/x.onnx and b/x.pt"):
        output_paths(["a/x.onnx", "b/x.pt"], "out")


def test_nnc_error_needs_converting_before_crossing_processes() -> None:
    # Why workers send strings: an NncError does not survive pickling.
    import pickle

    with pytest.raises(TypeError):
        pickle.loads(pickle.dumps(NncError("m.onnx", "broken")))
    outcome = encode_one(str(SAMPLES / "missing.onnx"), "unused.nnc")
    restored = pickle.loads(pickle.dumps(outcome))
    assert restored.exit_code == 2 and restored.error.startswith(str(SAMPLES / "missing.onnx"))


def crash_on_lenet(model_path: str, output_path: str, *args) -> Outcome:
    """A job whose worker dies on one file, as if killed by the OOM killer (pickled by name)."""
    if Path(model_path).stem == "lenet":
        os._exit(9)
    Path(output_path).write_text("ok")
    return Outcome(model_path, output_path)


def test_a_dying_worker_fails_only_its_file(tmp_path: Path) -> None:
    inputs = ["a/mlp.onnx", "b/lenet.onnx", "c/resnet.onnx", "d/mobilenet.onnx"]
    done = []
    result = encode_many(inputs, tmp_path, jobs=2, on_done=done.append, job=crash_on_lenet)
    assert [o.ok for o in result.outcomes] == [True, False, True, True]
    assert "died" in result.outcomes[1].error and result.exit_code == 1
    assert sorted(o.input for o in done) == sorted(inputs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.nnc", "mobilenet.nnc", "resnet.nnc"]


# --- progress and quiet --------------------------------------------------------------------


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_on_a_terminal_and_erases_itself() -> None:
    stream = FakeTerminal()
    with progress_bar("encode", stream=stream, delay=0) as bar:
        assert bar.enabled
        for done in range(1, 5):
            bar(done, 4)
        drawn = stream.getvalue()
        assert drawn.startswith("\rencode [") and "4/4 100%" in drawn and "\n" not in drawn
    assert stream.getvalue().endswith("\r" + " " * len(drawn.split("\r")[-1]) + "\r")


def test_progress_bar_is_silent_off_a_terminal_with_quiet_and_for_short_work() -> None:
    for stream, quiet, delay in ((io.StringIO(), False, 0), (FakeTerminal(), True, 0), (FakeTerminal(), False, 60)):
        with progress_bar("x", quiet=quiet, stream=stream, delay=delay) as bar:
            bar(1, 2)
            bar(2, 2)
        assert stream.getvalue() == ""


def test_progress_bar_echo_keeps_lines_whole(capsys: pytest.CaptureFixture) -> None:
    stream = FakeTerminal()
    bar = ProgressBar("batch", stream=stream, delay=0)
    bar(1, 3)
    bar.echo("a.onnx: done")
    assert capsys.readouterr().out == "a.onnx: done\n"
    assert stream.getvalue().count("\rbatch [") == 2  # erased, the line printed, drawn again
    bar.close()


def test_quiet_encode_and_decode(tmp_path: Path) -> None:
    stream, rebuilt = tmp_path / "m.nnc", tmp_path / "m.onnx"
    result = run_cli("encode", SAMPLES / "mlp.onnx", "-o", stream, "--quiet")
    assert result.exit_code == 0 and result.stdout == "" and result.stderr == "" and stream.exists()
    result = run_cli("encode", SAMPLES / "mlp.onnx", "-o", stream, "-q", "--json")
    assert json.loads(result.stdout)["bitstream_bytes"] == stream.stat().st_size
    result = run_cli("decode", stream, "-o", rebuilt, "-q")
    assert result.exit_code == 0 and result.stdout == "" and rebuilt.exists()
    result = run_cli("encode", SAMPLES / "mlp.onnx", "-o", stream, "-q", "-v")
    assert result.exit_code == 2 and "contradict" in result.stderr
    result = run_cli("encode", SAMPLES / "missing.onnx", "-o", stream, "-q")  # errors still print
    assert result.exit_code == 2 and stderr_lines(result)[0].startswith("nnc: error: ")


# --- interrupts (real processes and signals) -----------------------------------------------


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~160 MB of Gemm weights: a couple of seconds of encoding, long enough to interrupt."""
    rng = np.random.default_rng(0)
    n, layers = 2000, 10
    initializers, nodes, previous = [], [], "x"
    for i in range(layers):
        weight = (rng.standard_normal((n, n), dtype=np.float32) * 0.02).astype(np.float32)
        initializers.append(numpy_helper.from_array(weight, f"fc{i}.weight"))
        nodes.append(helper.make_node("Gemm", [previous, f"fc{i}.weight"], [f"h{i}"], transB=1))
        previous = f"h{i}"
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
                              [helper.make_tensor_value_info(previous, TensorProto.FLOAT, [1, n])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    path = tmp_path_factory.mktemp("big") / "big.onnx"
    onnx.save_model(model, path)
    return path


def nnc_process(*args: str | Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    # As a terminal starts it: a test run launched in the background (`cmd &` in a script) ignores
    # SIGINT, the child would inherit that, and Python then never raises KeyboardInterrupt.
    return subprocess.Popen([sys.executable, "-m", "nnc_tool.cli", *map(str, args)], cwd=ROOT, env=env,
                            preexec_fn=_default_sigint, **popen)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def resident_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def child_pids(pid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                children.append(int(entry))
    return children


def wait_until(condition, process: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"nnc exited ({process.returncode}) before {what}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


needs_proc = pytest.mark.skipif(not Path("/proc/self/status").exists() or os.name != "posix",
                                reason="needs POSIX signals and /proc")


@needs_proc
def test_sigint_on_a_terminal_erases_the_bar_and_leaves_no_output(big_model: Path, tmp_path: Path) -> None:
    import pty
    import select

    try:
        leader, follower = pty.openpty()
    except OSError:
        pytest.skip("no pseudo-terminal available")
    out = tmp_path / "out"
    out.mkdir()
    process = nnc_process("encode", big_model, "-o", out / "big.nnc", stdout=subprocess.PIPE, stderr=follower)
    os.close(follower)
    seen = b""

    def bar_drawn() -> bool:
        nonlocal seen
        while select.select([leader], [], [], 0.05)[0]:
            try:
                seen += os.read(leader, 4096)
            except OSError:
                break
        return b"/10 " in seen  # a tensor coded: the encode is under way

    try:
        wait_until(bar_drawn, process, "the progress bar")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130
        while select.select([leader], [], [], 0.2)[0]:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # Linux reports EIO once the other side is closed
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(leader)
    text = seen.decode().replace("\r\n", "\n")
    assert text.startswith("\rencode big.onnx [") and text.count("\n") == 1
    # What a person sees: the bar erased, then one line.
    assert text.split("\r")[-1] == "nnc: error: interrupted\n"
    assert process.stdout.read() == b""
    assert list(out.iterdir()) == []


@needs_proc
def test_sigterm_leaves_no_output_and_one_line(big_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    process = nnc_process("encode", big_model, "-o", out / "big.nnc", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Resident memory past the model's size means the model is read and being encoded.
    wait_until(lambda: resident_mb(process.pid) > 200, process, "the model to be read")
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert stderr == b"nnc: error: interrupted\n" and stdout == b""
    assert list(out.iterdir()) == []


@needs_proc
def test_sigint_stops_a_parallel_batch_without_partial_outputs(big_model: Path, tmp_path: Path) -> None:
    twin = tmp_path / "twin.onnx"
    try:
        os.link(big_model, twin)
    except OSError:
        twin.symlink_to(big_model)
    out = tmp_path / "out"
    process = nnc_process("encode", big_model, twin, "-d", out, "--jobs", "2", stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)

    def workers_encoding() -> bool:
        return sum(resident_mb(child) > 200 for child in child_pids(process.pid)) >= 2

    wait_until(workers_encoding, process, "both workers to read their model")
    workers = child_pids(process.pid)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert stderr == b"nnc: error: interrupted\n", stderr
    assert list(out.iterdir()) == []
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() and resident_mb(pid) > 0 for pid in workers):
        assert time.monotonic() < deadline, "worker processes outlived the batch"
        time.sleep(0.05)


@needs_proc
def test_a_reader_that_stops_early_ends_info_quietly(tmp_path: Path, samples_dir: Path) -> None:
    """`nnc info X.nnc | head`: the closed pipe ends nnc as SIGPIPE would, with nothing on stderr."""
    stream = tmp_path / "lenet.nnc"
    assert CliRunner().invoke(main, ["encode", str(samples_dir / "lenet.onnx"), "-o", str(stream), "-q"]).exit_code == 0
    process = nnc_process("info", stream, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=60) == 128 + signal.SIGPIPE
    assert stderr == b""


def test_help_and_info_start_without_the_encoders_stack(tmp_path: Path, samples_dir: Path) -> None:
    """`nnc --help` imports neither numpy nor onnx; `nnc info` and `nnc decode` not onnxruntime,
    torch or the encoder (nnc_tool.api): start-up is what those commands mostly cost."""
    stream = tmp_path / "lenet.nnc"
    nnc_tool.encode(samples_dir / "lenet.onnx", stream)
    probe = (
        "import sys, runpy\n"
        "sys.argv = ['nnc'] + sys.argv[1:]\n"
        "try:\n    runpy.run_module('nnc_tool.cli', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "heavy = ('numpy', 'onnx', 'onnxruntime', 'torch', 'nnc_tool.api', 'nnc_tool.quantize.allocation')\n"
        "print('imported:', *(m for m in heavy if m in sys.modules))\n"
    )

    def imported(*args: str) -> set[str]:
        done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, cwd=ROOT, check=True)
        return set(done.stdout.rsplit("imported:", 1)[1].split())

    assert imported("--help") == set()
    assert imported("info", str(stream)) == {"numpy", "onnx"}
    assert imported("decode", str(stream), "-o", str(tmp_path / "rebuilt.onnx"), "-q") == {"numpy", "onnx"}
