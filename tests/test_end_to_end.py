"""Whole pipeline on the bundled sample models: encode, decode, run, compare."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import nnc_tool
from nnc_tool.bench.runner import make_runner, predict
from nnc_tool.cli import main

from conftest import SAMPLE_NAMES, SAMPLES

RUNNABLE = {"onnx": "{}.onnx", "torchscript": "{}_script.pt", "torch-export": "{}.pt2"}


def accuracy(path: Path, fmt: str, x: np.ndarray, y: np.ndarray) -> float:
    return 100.0 * float((predict(make_runner(path, fmt), x).argmax(1) == y).mean())


@pytest.mark.parametrize("name", SAMPLE_NAMES)
@pytest.mark.parametrize("fmt", list(RUNNABLE))
def test_default_qp_keeps_accuracy(tmp_path: Path, name: str, fmt: str, digits_test) -> None:
    x, y = digits_test
    source = SAMPLES / RUNNABLE[fmt].format(name)
    bitstream = tmp_path / "model.nnc"
    rebuilt = tmp_path / f"rebuilt{source.suffix}"
    report = nnc_tool.encode(source, bitstream)
    assert report.format == fmt
    assert report.bitstream_bytes == bitstream.stat().st_size
    assert report.ratio > 3.0, f"{source.name}: ratio {report.ratio:.2f}"
    nnc_tool.decode(bitstream, rebuilt)
    before, after = accuracy(source, fmt, x, y), accuracy(rebuilt, fmt, x, y)
    assert before > 95.0
    assert abs(before - after) <= 0.5, f"{source.name}: {before:.2f} % -> {after:.2f} %"


@pytest.mark.parametrize(
    "filename", ["resnet.onnx", "resnet_script.pt", "resnet.pt2", "resnet_state_dict.pt", "mobilenet.onnx"]
)
def test_lossless_is_bit_exact(tmp_path: Path, filename: str) -> None:
    source = SAMPLES / filename
    bitstream = tmp_path / "model.nnc"
    rebuilt = tmp_path / f"rebuilt{source.suffix}"
    nnc_tool.encode(source, bitstream, nnc_tool.EncodeOptions(lossless=True))
    nnc_tool.decode(bitstream, rebuilt)
    original, restored = nnc_tool.read_model(source), nnc_tool.read_model(rebuilt)
    assert [t.name for t in restored.tensors] == [t.name for t in original.tensors]
    for a, b in zip(original.tensors, restored.tensors):
        assert a.array.dtype == b.array.dtype and a.array.shape == b.array.shape, a.name
        assert a.array.tobytes() == b.array.tobytes(), a.name


def test_lossless_onnx_outputs_are_identical(tmp_path: Path, digits_test) -> None:
    x, _ = digits_test
    source = SAMPLES / "mobilenet.onnx"
    nnc_tool.encode(source, tmp_path / "m.nnc", nnc_tool.EncodeOptions(lossless=True))
    nnc_tool.decode(tmp_path / "m.nnc", tmp_path / "m.onnx")
    np.testing.assert_array_equal(predict(make_runner(source, "onnx"), x), predict(make_runner(tmp_path / "m.onnx", "onnx"), x))


def test_state_dict_round_trip_loads_into_architecture(tmp_path: Path, digits_test) -> None:
    import sys

    import torch

    sys.path.insert(0, str(SAMPLES))
    from architectures import ARCHITECTURES

    x, y = digits_test
    nnc_tool.encode(SAMPLES / "lenet_state_dict.pt", tmp_path / "l.nnc")
    nnc_tool.decode(tmp_path / "l.nnc", tmp_path / "l.pt")
    model = ARCHITECTURES["lenet"]()
    model.load_state_dict(torch.load(tmp_path / "l.pt", weights_only=True))
    model.eval()
    with torch.inference_mode():
        acc = 100.0 * float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
    assert acc >= accuracy(SAMPLES / "lenet.onnx", "onnx", x, y) - 0.5


def test_same_input_gives_same_bytes(tmp_path: Path) -> None:
    for filename in ("resnet.onnx", "resnet.pt2", "resnet_script.pt"):
        nnc_tool.encode(SAMPLES / filename, tmp_path / "a.nnc")
        nnc_tool.encode(SAMPLES / filename, tmp_path / "b.nnc")
        assert (tmp_path / "a.nnc").read_bytes() == (tmp_path / "b.nnc").read_bytes(), filename


def test_coarser_qp_gives_smaller_stream() -> None:
    sizes = [nnc_tool.encode(SAMPLES / "resnet.onnx", None, nnc_tool.EncodeOptions(qp=qp)).bitstream_bytes for qp in (-44, -38, -30, -22)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 2 * sizes[-1]


def test_topology_is_small_for_every_format() -> None:
    for filename in ("resnet.onnx", "resnet.pt2", "resnet_script.pt", "resnet_state_dict.pt"):
        report = nnc_tool.encode(SAMPLES / filename, None)
        assert report.topology_bytes < 0.1 * report.original_bytes, (filename, report.topology_bytes)


# --- CLI ---------------------------------------------------------------------------------


def run_cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_encode_decode_info_bench(tmp_path: Path) -> None:
    bitstream, rebuilt = tmp_path / "r.nnc", tmp_path / "r.onnx"
    result = run_cli("encode", SAMPLES / "resnet.onnx", "-o", bitstream)
    assert result.exit_code == 0, result.output
    assert "ratio" in result.output and str(bitstream.stat().st_size) not in ("",)
    result = run_cli("decode", bitstream, "-o", rebuilt)
    assert result.exit_code == 0, result.output
    assert rebuilt.exists()

    result = run_cli("info", bitstream, "--json")
    assert result.exit_code == 0, result.output
    described = json.loads(result.output)
    assert described["parameters"]["format"] == "onnx"
    data_units = [u for u in described["units"] if u["type"] == "data"]
    assert len(data_units) == described["parameters"]["tensor_count"]
    assert sum(u["size"] for u in described["units"]) + 14 == bitstream.stat().st_size

    result = run_cli("bench", SAMPLES / "resnet.onnx", "--nnc", bitstream, "--data", SAMPLES / "digits_test.npz",
                     "--runs", 5, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["bitstream_bytes"] == bitstream.stat().st_size
    assert report["quality"]["samples"] == 450
    assert abs(report["quality"]["accuracy_original"] - report["quality"]["accuracy_rebuilt"]) <= 0.5
    assert report["latency_original"]["median_ms"] > 0


def test_bench_without_labels_reports_fidelity() -> None:
    result = run_cli("bench", SAMPLES / "mlp.onnx", "--runs", 3, "--json")
    assert result.exit_code == 0, result.output
    quality = json.loads(result.output)["quality"]
    assert quality["accuracy_original"] is None
    assert quality["top1_agreement"] >= 95.0 and quality["output_snr_db"] > 20.0


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("nnc: error: ")
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_empty_file_is_rejected(tmp_path: Path) -> None:
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert_one_line_error(run_cli("encode", empty, "-o", tmp_path / "out.nnc"), str(empty), "empty")
    assert not (tmp_path / "out.nnc").exists()
    assert_one_line_error(run_cli("decode", empty, "-o", tmp_path / "out.onnx"), str(empty))
    assert not (tmp_path / "out.onnx").exists()


def test_unknown_format_is_rejected(tmp_path: Path) -> None:
    junk = tmp_path / "model.onnx"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    assert_one_line_error(run_cli("encode", junk, "-o", tmp_path / "out.nnc"), str(junk), "unknown model format")
    assert list(tmp_path.iterdir()) == [junk]


def test_missing_file_is_rejected(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("encode", tmp_path / "nope.onnx", "-o", tmp_path / "o.nnc"), "nope.onnx")


@pytest.mark.parametrize(
    "arguments, fragments",
    [
        (["encode", "m.onnx", "-o", "o.nnc", "--qp", "999"], ["'--qp'", "999", "nnc encode --help"]),
        (["encode", "m.onnx", "-o", "o.nnc", "--rdo", "many"], ["'--rdo'", "many"]),
        (["encode", "m.onnx", "-o", "o.nnc", "--bogus"], ["'--bogus'"]),
        (["encode"], ["MODEL"]),
        (["decode", "in.nnc"], ["'-o'"]),
        (["frobnicate"], ["'frobnicate'", "nnc --help"]),
    ],
)
def test_option_errors_are_one_line(arguments: list[str], fragments: list[str]) -> None:
    """click's own usage errors (bad values, unknown options, missing arguments) follow the same
    one-line rule as every other error, with exit code 2."""
    assert_one_line_error(run_cli(*arguments), *fragments)


def test_bare_command_prints_help_and_exits_2() -> None:
    result = run_cli()
    assert result.exit_code == 2 and "Usage: nnc" in result.output and "encode" in result.output


@pytest.fixture(scope="module")
def lenet_stream(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("stream") / "lenet.nnc"
    nnc_tool.encode(SAMPLES / "lenet.onnx", path)
    return path.read_bytes()


@pytest.mark.parametrize("fraction", [0.0, 0.003, 0.3, 0.7, 0.999])
def test_truncated_bitstream_is_rejected(tmp_path: Path, lenet_stream: bytes, fraction: float) -> None:
    damaged = tmp_path / "cut.nnc"
    damaged.write_bytes(lenet_stream[: int(len(lenet_stream) * fraction)] or b"\x8b")
    assert_one_line_error(run_cli("decode", damaged, "-o", tmp_path / "out.onnx"), str(damaged))
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("position", [0, 9, 20, 200, 2000, -5])
def test_bit_flipped_bitstream_is_rejected(tmp_path: Path, lenet_stream: bytes, position: int) -> None:
    flipped = bytearray(lenet_stream)
    flipped[position] ^= 0x10
    damaged = tmp_path / "flip.nnc"
    damaged.write_bytes(bytes(flipped))
    assert_one_line_error(run_cli("decode", damaged, "-o", tmp_path / "out.onnx"), str(damaged))
    assert not (tmp_path / "out.onnx").exists()


def test_wrong_output_suffix_is_rejected(tmp_path: Path, lenet_stream: bytes) -> None:
    stream = tmp_path / "lenet.nnc"
    stream.write_bytes(lenet_stream)
    assert_one_line_error(run_cli("decode", stream, "-o", tmp_path / "lenet.pt"), "lenet.pt", ".onnx")
    assert not (tmp_path / "lenet.pt").exists()


def test_output_may_not_overwrite_input(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes((SAMPLES / "mlp.onnx").read_bytes())
    assert_one_line_error(run_cli("encode", model, "-o", model), "overwrite")
    assert model.read_bytes() == (SAMPLES / "mlp.onnx").read_bytes()


def test_console_script_prints_no_traceback(tmp_path: Path) -> None:
    import subprocess
    import sys

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"PK\x03\x04 not really a zip")
    proc = subprocess.run(
        [sys.executable, "-m", "nnc_tool.cli", "encode", str(junk), "-o", str(tmp_path / "o.nnc")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr and str(junk) in proc.stderr
    assert not (tmp_path / "o.nnc").exists()


@pytest.mark.parametrize("options", [["--per-channel"], ["--bits", "8"], ["--qp", "-30", "--nonweight-qp", "-60"]])
def test_cli_quantization_options_keep_a_working_model(tmp_path: Path, options: list[str], digits_test) -> None:
    x, y = digits_test
    source = SAMPLES / "mobilenet.onnx"
    result = run_cli("encode", source, "-o", tmp_path / "m.nnc", *options)
    assert result.exit_code == 0, result.output
    assert run_cli("decode", tmp_path / "m.nnc", "-o", tmp_path / "m.onnx").exit_code == 0
    assert accuracy(tmp_path / "m.onnx", "onnx", x, y) >= accuracy(source, "onnx", x, y) - 1.0
    settings = json.loads(run_cli("info", tmp_path / "m.nnc", "--json").output)["parameters"]["settings"]
    assert settings["per_channel"] == ("--per-channel" in options)
    assert settings["bits"] == (8 if "--bits" in options else None)


def test_per_channel_stores_one_step_per_output_channel(tmp_path: Path) -> None:
    from nnc_tool.bitstream import container
    from nnc_tool.bitstream.primitives import ByteReader
    from nnc_tool.coding.tensors import read_header

    data, _ = nnc_tool.compress_model(nnc_tool.read_model(SAMPLES / "lenet.onnx"), nnc_tool.EncodeOptions(per_channel=True))
    headers = [read_header(ByteReader(u.payload)) for u in container.iter_units(data) if u.type == container.UnitType.DATA]
    conv = next(h for h in headers if len(h.shape) == 4)
    assert conv.steps.shape == (conv.shape[0],)


def test_bitstreams_are_identical_across_processes(tmp_path: Path) -> None:
    import subprocess
    import sys

    outputs = []
    for run in range(2):
        out = tmp_path / f"run{run}.nnc"
        subprocess.run([sys.executable, "-m", "nnc_tool.cli", "encode", str(SAMPLES / "mobilenet.pt2"), "-o", str(out)],
                       check=True, capture_output=True, env={**__import__("os").environ, "PYTHONHASHSEED": str(run)})
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


def test_cli_structured_pruning_shrinks_the_model(tmp_path: Path, digits_test) -> None:
    x, y = digits_test
    result = run_cli("encode", SAMPLES / "resnet.onnx", "-o", tmp_path / "p.nnc", "--prune", "structured",
                     "--sparsity", "0.5", "--calib", SAMPLES / "digits_calib.npz")
    assert result.exit_code == 0, result.output
    assert "pruned (structured)" in result.output
    assert run_cli("decode", tmp_path / "p.nnc", "-o", tmp_path / "p.onnx").exit_code == 0
    pruned = nnc_tool.read_model(tmp_path / "p.onnx")
    original = nnc_tool.read_model(SAMPLES / "resnet.onnx")
    assert pruned.parameter_count < 0.35 * original.parameter_count
    assert accuracy(tmp_path / "p.onnx", "onnx", x, y) >= accuracy(SAMPLES / "resnet.onnx", "onnx", x, y) - 2.0
    assert (tmp_path / "p.nnc").stat().st_size < 0.5 * nnc_tool.encode(SAMPLES / "resnet.onnx", None).bitstream_bytes


def test_cli_nm_pruning_on_a_pytorch_program(tmp_path: Path) -> None:
    result = run_cli("encode", SAMPLES / "lenet.pt2", "-o", tmp_path / "l.nnc", "--prune", "nm", "--nm", "2:4")
    assert result.exit_code == 0, result.output
    assert run_cli("decode", tmp_path / "l.nnc", "-o", tmp_path / "l.pt2").exit_code == 0
    weight = nnc_tool.read_model(tmp_path / "l.pt2").tensor_map()["fc1.weight"].array
    groups = weight.reshape(weight.shape[0], -1, 4)
    assert ((groups != 0).sum(axis=2) <= 2).all()


@pytest.mark.parametrize(
    "arguments,fragment",
    [
        (["--prune", "structured", "--importance", "shapley"], "needs calibration data"),
        (["--prune", "depth"], "needs calibration data"),
        (["--prune", "nm", "--nm", "4:2"], "N:M"),
        (["--prune", "nm", "--nm", "two:four"], "K:N"),
    ],
)
def test_cli_rejects_bad_pruning_options(tmp_path: Path, arguments: list[str], fragment: str) -> None:
    result = run_cli("encode", SAMPLES / "lenet.onnx", "-o", tmp_path / "o.nnc", *arguments)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "o.nnc").exists()


def test_depth_pruning_needs_an_onnx_graph(tmp_path: Path) -> None:
    result = run_cli("encode", SAMPLES / "resnet_state_dict.pt", "-o", tmp_path / "o.nnc", "--prune", "depth",
                     "--calib", SAMPLES / "digits_calib.npz")
    assert_one_line_error(result, "ONNX")


def test_info_entropy_report_adds_up(tmp_path: Path) -> None:
    stream = tmp_path / "m.nnc"
    nnc_tool.encode(SAMPLES / "mobilenet.onnx", stream)
    result = run_cli("info", stream, "--entropy", "--json")
    assert result.exit_code == 0, result.output
    entropy = json.loads(result.output)["entropy"]
    assert entropy["total_bytes"] == stream.stat().st_size
    assert entropy["side_info_bytes"] + entropy["payload_bytes"] == entropy["total_bytes"]
    assert 0 <= entropy["overhead_percent"] < 1.0
    text = run_cli("info", stream, "--entropy").output
    assert "within" in text and "side information" in text
