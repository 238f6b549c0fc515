"""Model inputs of any shape (nnc_tool/inputs.py) and the commands that feed them to models."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from inputs_factory import BYTES, VOCAB, build_byte_classifier, build_transformer, build_vad, transformer_inputs
from nnc_tool import api
from nnc_tool.bench.runner import compare_outputs
from nnc_tool.cli import main
from nnc_tool.errors import UsageError
from nnc_tool.formats import read_model
from nnc_tool.inputs import ModelInputs, as_model_inputs, input_signature, load_inputs, probe_inputs, run_model

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
BENCH_FAST = ("--runs", "2", "--warmup", "0", "--json")


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("inputs")
    return {"transformer": build_transformer(directory), "bytes": build_byte_classifier(directory), "vad": build_vad(directory)}


@pytest.fixture(scope="module")
def transformer_npz(models, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "calib.npz"
    arrays = transformer_inputs(samples=24)
    labels = run_model(read_model(models["transformer"]), arrays)[0].argmax(1)
    np.savez(path, **arrays, y=labels)
    return path


@pytest.fixture(scope="module")
def bytes_npz(models, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "bytes.npz"
    codes = np.random.default_rng(1).integers(0, BYTES, (20, 32)).astype(np.int64)  # int64 on disk, int32 input
    labels = run_model(read_model(models["bytes"]), {"bytes": codes})[0].argmax(1)
    np.savez(path, bytes=codes, y=labels)
    return path


# --------------------------------------------------------------------------------------------
# Signature, probes, runs


def test_signature_keeps_dtypes_and_dynamic_dims(models) -> None:
    specs = input_signature(read_model(models["vad"]))
    assert [(s.name, s.dtype, s.shape) for s in specs] == [
        ("input", np.dtype(np.float32), (None, 64)),
        ("state", np.dtype(np.float32), (2, None, 8)),
        ("sr", np.dtype(np.int64), ()),
    ]
    assert specs[1].describe() == "[2, batch, 8]"


def test_probe_of_transformer_follows_names_and_the_embedding_table(models) -> None:
    model = read_model(models["transformer"])
    probe = probe_inputs(model, samples=8)
    assert probe.names == ["input_ids", "attention_mask", "token_type_ids"] and probe.batchable
    ids = probe.arrays["input_ids"]
    assert ids.shape == (8, 16) and ids.dtype == np.int64
    assert 16 <= ids.max() < VOCAB and ids.min() >= 0  # the table's range, not the default [0, 16)
    assert (probe.arrays["attention_mask"] == 1).all() and (probe.arrays["token_type_ids"] == 0).all()
    (logits,) = run_model(model, probe)
    assert logits.shape == (8, 4) and np.isfinite(logits).all()
    again = probe_inputs(model, samples=8)
    np.testing.assert_array_equal(again.arrays["input_ids"], ids)  # deterministic for a seed


def test_probe_index_bound_accounts_for_an_added_offset(tmp_path) -> None:
    # codes + 1 index a 6-row table: codes must stay below 5.
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["codes"], ["c64"], to=TensorProto.INT64),
            helper.make_node("Add", ["c64", "one"], ["shifted"]),
            helper.make_node("Gather", ["table", "shifted"], ["y"]),
        ],
        "offset",
        [helper.make_tensor_value_info("codes", TensorProto.INT32, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 3])],
        [numpy_helper.from_array(np.ones((6, 3), np.float32), "table"), numpy_helper.from_array(np.array(1, np.int64), "one")],
    )
    model = read_model(_save(graph, tmp_path / "offset.onnx"))
    codes = probe_inputs(model, samples=32).arrays["codes"]
    assert codes.dtype == np.int32 and codes.min() >= 0 and codes.max() == 4


def test_probe_of_vad_uses_the_equal_constant_and_zero_state(models) -> None:
    model = read_model(models["vad"])
    probe = probe_inputs(model, samples=5)
    assert (probe.arrays["sr"] == 16000).all() and probe.arrays["sr"].shape == (5,)
    assert probe.arrays["state"].shape == (5, 2, 1, 8) and not probe.arrays["state"].any()
    assert probe.arrays["input"].shape == (5, 64) and not probe.batchable
    output, state = run_model(model, probe)
    # One sample per run: outputs stacked on a new first axis; the gate opened (sr matched).
    assert output.shape == (5, 1, 1) and state.shape == (5, 2, 1, 8) and (output > 0).all()


def test_probe_finds_the_spatial_size_a_reshape_implies(tmp_path) -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Reshape", ["c", "shape"], ["f"]),
            helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1),
        ],
        "spatial",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [
            numpy_helper.from_array(np.full((2, 1, 3, 3), 0.1, np.float32), "w"),
            numpy_helper.from_array(np.array([-1, 2 * 28 * 28], np.int64), "shape"),
            numpy_helper.from_array(np.full((3, 2 * 28 * 28), 0.01, np.float32), "fc"),
        ],
    )
    probe = probe_inputs(read_model(_save(graph, tmp_path / "spatial.onnx")), samples=3)
    assert probe.arrays["x"].shape == (3, 1, 28, 28)  # 224, 64 and 32 do not fit the Reshape


def test_outputs_of_rows_are_concatenated_in_one_run() -> None:
    model = read_model(SAMPLES / "lenet.onnx")
    x = np.load(SAMPLES / "digits_calib.npz")["x"][:10]
    inputs = as_model_inputs(x, model)  # a bare array for a one-input model
    assert inputs.names == ["input"] and inputs.batchable and list(inputs.ranges()) == [(0, 10)]
    (logits,) = run_model(model, inputs)
    np.testing.assert_allclose(logits[3:4], run_model(model, inputs.select(slice(3, 4)))[0], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Loading and its errors


def test_legacy_x_file_binds_to_the_one_input() -> None:
    inputs = load_inputs(SAMPLES / "digits_test.npz", read_model(SAMPLES / "resnet.onnx"))
    assert inputs.names == ["input"] and len(inputs) == 450 and inputs.labels.shape == (450,)


def test_int64_data_feeds_an_int32_input_when_it_fits(models, bytes_npz, tmp_path) -> None:
    model = read_model(models["bytes"])
    inputs = load_inputs(bytes_npz, model)
    assert inputs.arrays["bytes"].dtype == np.int32
    np.savez(tmp_path / "big.npz", bytes=np.full((2, 32), 2**40, np.int64))
    with pytest.raises(UsageError, match=r"big.npz: array 'bytes' has values 1099511627776\.\.1099511627776 that do not fit"):
        load_inputs(tmp_path / "big.npz", model)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: a.pop("attention_mask"),
         "array 'attention_mask' is missing (model inputs: input_ids, attention_mask, token_type_ids)"),
        (lambda a: a.update(input_ids=a["input_ids"].astype(np.float32)),
         "array 'input_ids' holds float32 values but input 'input_ids' takes int64"),
        (lambda a: a.update(token_type_ids=a["token_type_ids"][:, 0]),
         "array 'token_type_ids' has shape (24,) but input 'token_type_ids' takes [batch, sequence]: give rank 2"),
        (lambda a: a.update(extra=a["input_ids"]), "array 'extra' is not a model input (model inputs:"),
        (lambda a: a.update(attention_mask=a["attention_mask"][:5]), "array 'attention_mask' has 5 samples but 'input_ids' has 24"),
    ],
)
def test_bad_calibration_is_a_one_line_cli_error_and_nothing_is_written(models, tmp_path, change, message) -> None:
    arrays = transformer_inputs(samples=24)
    change(arrays)
    data = tmp_path / "calib.npz"
    np.savez(data, **arrays)
    output = tmp_path / "out.nnc"
    result = run_cli("encode", models["transformer"], "-o", output, "--calib", data)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"nnc: error: {data}: {message}"), result.stderr
    assert "Traceback" not in result.output
    assert not output.exists() and list(tmp_path.iterdir()) == [data]


# --------------------------------------------------------------------------------------------
# Calibration, rate control and bench on models with integer and several inputs


def _snr(model_path: Path, stream: Path, inputs) -> float:
    original = read_model(model_path)
    rebuilt = api.decompress_model(stream.read_bytes())
    inputs = as_model_inputs(inputs, original)
    return compare_outputs(run_model(original, inputs), run_model(rebuilt, inputs), None).output_snr_db


@pytest.mark.parametrize("mode", ["full", "fast"])
@pytest.mark.parametrize("which", ["transformer", "bytes"])
def test_calibrated_encode_of_integer_input_models(models, transformer_npz, bytes_npz, tmp_path, mode, which) -> None:
    data = transformer_npz if which == "transformer" else bytes_npz
    output = tmp_path / "m.nnc"
    result = run_cli("encode", models[which], "-o", output, "--calib", data, "--calib-mode", mode, "--qp", "-30", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["calibration_mode"] == mode
    if mode == "full":
        assert report["feedback_layers"] >= 1  # GPTQ measured the layer inputs on the named arrays
    assert _snr(models[which], output, load_inputs(data, read_model(models[which]))) > 15.0


@pytest.mark.parametrize("which", ["transformer", "bytes"])
def test_snr_target_on_named_calibration(models, transformer_npz, bytes_npz, tmp_path, which) -> None:
    data = transformer_npz if which == "transformer" else bytes_npz
    output = tmp_path / "m.nnc"
    result = run_cli("encode", models[which], "-o", output, "--calib", data, "--target-snr", "30", "--json")
    assert result.exit_code == 0, result.output
    rate = json.loads(result.stdout)["rate_control"]
    assert rate["chosen_qp"] is not None
    assert _snr(models[which], output, load_inputs(data, read_model(models[which]))) >= 30.0


@pytest.mark.parametrize("which", ["transformer", "bytes", "vad"])
def test_bench_without_data_uses_probe_inputs(models, which) -> None:
    result = run_cli("bench", models[which], "--qp", "-30", *BENCH_FAST)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    quality = report["quality"]
    assert quality["samples"] == 64 and quality["output_snr_db"] > 15.0 and quality["accuracy_rebuilt"] is None
    assert any("probe inputs" in note for note in report["notes"])
    assert (quality["top1_agreement"] is None) == (which == "vad")  # vad's first output is one probability


@pytest.mark.parametrize("which", ["transformer", "bytes"])
def test_bench_with_labelled_named_data(models, transformer_npz, bytes_npz, which) -> None:
    data = transformer_npz if which == "transformer" else bytes_npz
    result = run_cli("bench", models[which], "--data", data, "--qp", "-34", "--batch-size", "4", *BENCH_FAST)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["quality"]["accuracy_original"] == 100.0  # the labels are the original's own predictions
    assert report["quality"]["accuracy_rebuilt"] >= 80.0 and report["latency_original"]["batch_size"] == 4


def test_compare_outputs_takes_every_output() -> None:
    a = [np.ones((4, 3), np.float32), np.full((4, 2), 2.0, np.float32), np.arange(4)]
    b = [np.ones((4, 3), np.float32), np.full((4, 2), 1.0, np.float32), np.arange(4)]
    stats = compare_outputs(a, b, None)
    # signal 12 + 32, noise 8 (the integer output does not count)
    assert stats.output_snr_db == pytest.approx(10 * np.log10(44 / 8)) and stats.top1_agreement == 100.0


def test_model_inputs_select_and_repeat_keep_the_layout(models) -> None:
    probe = probe_inputs(read_model(models["vad"]), samples=3)
    twice = probe.repeat(2)
    assert len(twice) == 6 and twice.stacked("sr") and not twice.stacked("input")
    assert isinstance(twice.select(np.array([0, 5])), ModelInputs) and len(twice.select(np.array([0, 5]))) == 2


def test_named_and_legacy_calibration_give_the_same_pruned_stream(tmp_path) -> None:
    x = np.load(SAMPLES / "digits_calib.npz")["x"]
    np.savez(tmp_path / "named.npz", input=x)
    common = ("--prune", "structured", "--importance", "activation", "--sparsity", "0.3", "-q")
    legacy = run_cli("encode", SAMPLES / "lenet.onnx", "-o", tmp_path / "a.nnc", "--calib", SAMPLES / "digits_calib.npz", *common)
    named = run_cli("encode", SAMPLES / "lenet.onnx", "-o", tmp_path / "b.nnc", "--calib", tmp_path / "named.npz", *common)
    assert legacy.exit_code == 0 and named.exit_code == 0, legacy.output + named.output
    assert (tmp_path / "a.nnc").read_bytes() == (tmp_path / "b.nnc").read_bytes()


def test_batch_encode_binds_calibration_to_each_model(models, transformer_npz, tmp_path) -> None:
    result = run_cli("encode", "-d", tmp_path / "out", "--calib", transformer_npz, models["transformer"], models["bytes"], "-q")
    assert result.exit_code == 2
    assert (tmp_path / "out" / "transformer.nnc").is_file() and not (tmp_path / "out" / "bytes.nnc").exists()
    assert result.stderr.strip().splitlines() == [
        f"nnc: error: {models['bytes']}: {transformer_npz}: array 'input_ids' is not a model input (model inputs: bytes)"
    ]


def test_accuracy_target_on_named_labelled_data(models, transformer_npz, tmp_path) -> None:
    result = run_cli("encode", models["transformer"], "-o", tmp_path / "m.nnc", "--max-acc-drop", "5", "--data", transformer_npz,
                     "--json")
    assert result.exit_code == 0, result.output
    rate = json.loads(result.stdout)["rate_control"]
    assert rate["chosen_qp"] is not None and "(original 100.00 %)" in rate["achieved"]


def test_probe_takes_a_traced_length_from_a_reshape_and_ones_for_a_mask_compared_with_zero(tmp_path) -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "input_ids"], ["e"]),
            helper.make_node("Reshape", ["e", "shape"], ["r"]),  # an export that baked in length 10
            helper.make_node("Equal", ["attention_mask", "zero"], ["padding"]),
            helper.make_node("Not", ["padding"], ["keep"]),
            helper.make_node("Cast", ["keep"], ["keepf"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["keepf", "last"], ["keep3"]),
            helper.make_node("Mul", ["r", "keep3"], ["y"]),
        ],
        "traced",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"]) for n in ("input_ids", "attention_mask")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10, 4])],
        [
            numpy_helper.from_array(np.ones((20, 4), np.float32), "table"),
            numpy_helper.from_array(np.array([-1, 10, 4], np.int64), "shape"),
            numpy_helper.from_array(np.array(0, np.int64), "zero"),
            numpy_helper.from_array(np.array([-1], np.int64), "last"),
        ],
    )
    model = read_model(_save(graph, tmp_path / "traced.onnx"))
    probe = probe_inputs(model, samples=2)
    assert probe.arrays["input_ids"].shape == (2, 10) and probe.arrays["input_ids"].max() < 20
    assert (probe.arrays["attention_mask"] == 1).all()
    (y,) = run_model(model, probe)
    assert y.shape == (2, 10, 4) and (y == 1).all()


@pytest.mark.parametrize("mode", ["full", "fast"])
def test_calibration_with_stacked_samples_runs_one_sample_at_a_time(models, tmp_path, mode) -> None:
    rng = np.random.default_rng(2)
    data = tmp_path / "vad.npz"
    np.savez(data, input=rng.standard_normal((12, 64)).astype(np.float32), state=np.zeros((12, 2, 1, 8), np.float32),
             sr=np.full(12, 16000, np.int64))
    output = tmp_path / "vad.nnc"
    result = run_cli("encode", models["vad"], "-o", output, "--calib", data, "--calib-mode", mode, "--qp", "-30", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["calibration_mode"] == mode
    # enc's MatMul weight got a measured Hessian; dec's (8, 1) weight has only 8 values and is coded
    # at the finer non-weight step (formats/onnx_roles.py: tiny weights are NONWEIGHT), without GPTQ.
    assert mode == "fast" or report["feedback_layers"] == 1
    assert _snr(models["vad"], output, load_inputs(data, read_model(models["vad"]))) > 20.0


def test_probe_skips_a_length_on_which_the_outputs_ignore_the_inputs(tmp_path) -> None:
    # y = sum(x[:, 256:512]): shorter inputs run (the slice is empty) but say nothing, as silero's
    # STFT answers the same for any 256-sample chunk.
    graph = helper.make_graph(
        [
            helper.make_node("Slice", ["x", "start", "stop", "axis"], ["window"]),
            helper.make_node("ReduceSum", ["window"], ["y"], keepdims=1),
        ],
        "window",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
        [
            numpy_helper.from_array(np.array([256], np.int64), "start"),
            numpy_helper.from_array(np.array([512], np.int64), "stop"),
            numpy_helper.from_array(np.array([1], np.int64), "axis"),
        ],
    )
    probe = probe_inputs(read_model(_save(graph, tmp_path / "window.onnx")), samples=2)
    assert probe.arrays["x"].shape[-1] == 512  # 16 ... 256 run too, with an output that is always 0


def test_probe_lengths_match_the_sequence_they_describe(tmp_path) -> None:
    # An ASR front end's inputs: waveforms [batch_size, N] and waveforms_lens [batch_size]. N is the
    # samples axis (one batch axis per input, whatever its name), and the lengths are N itself: a
    # front end indexes frames with them (onnx-asr's kaldi preprocessor fails on a random length).
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["waveforms_lens"], ["lens"], to=TensorProto.FLOAT),
            helper.make_node("ReduceSum", ["waveforms", "axis"], ["total"], keepdims=0),
            helper.make_node("Div", ["total", "lens"], ["mean"]),
        ],
        "front_end",
        [helper.make_tensor_value_info("waveforms", TensorProto.FLOAT, ["batch_size", "N"]),
         helper.make_tensor_value_info("waveforms_lens", TensorProto.INT64, ["batch_size"])],
        [helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["batch_size"])],
        [numpy_helper.from_array(np.array([1], np.int64), "axis")],
    )
    probe = probe_inputs(read_model(_save(graph, tmp_path / "front_end.onnx")), samples=3)
    samples = probe.arrays["waveforms"].shape
    assert samples[0] == 3 and samples[1] > 1
    assert probe.arrays["waveforms_lens"].tolist() == [samples[1]] * 3
