"""The encoder's self-check (nnc_tool/verify.py): decoded model beside the original on probe inputs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import nnc_tool
from inputs_factory import _save as save_graph, build_transformer
from nnc_tool import api, verify
from nnc_tool.cli import main
from nnc_tool.errors import CheckError
from nnc_tool.formats import onnx_format, read_model
from nnc_tool.inputs import probe_inputs, run_model
from nnc_tool.model import Tensor, TensorRole


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    return save_graph(graph, path.parent, path.name)


def build_offset_matmul(path: Path) -> Path:
    """x + 1000 -> MatMul(W) -> + bias that removes the offset again.

    Without its offset the layer is plain, but W's rounding error is multiplied by the 1000 the
    bias later cancels: the output is noise at the default QP, though every tensor's own error
    is tiny. No BatchNorm tells the encoder the layer's mean input, so nothing corrects it.
    """
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((32, 16)) * 0.2).astype(np.float32)
    offset = np.full(32, 1000.0, np.float32)
    bias = (-(offset @ w.astype(np.float64))).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "offset"], ["shifted"]),
            helper.make_node("MatMul", ["shifted", "w"], ["y0"]),
            helper.make_node("Add", ["y0", "bias"], ["y"]),
        ],
        "offset",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(offset, "offset"), numpy_helper.from_array(bias, "bias")],
    )
    return _save(graph, path)


def _decoded_snr(model_path: Path, stream: Path, inputs) -> float:
    reference = run_model(read_model(model_path), inputs)
    rebuilt = run_model(nnc_tool.decompress_model(stream.read_bytes()), inputs)
    return verify.snr_db(*verify.output_noise(reference, rebuilt))


def test_a_collapsed_layer_is_found_and_coded_finer(tmp_path: Path) -> None:
    path = build_offset_matmul(tmp_path / "offset.onnx")
    model = read_model(path)
    probes = probe_inputs(model, verify.PROBE_SAMPLES)
    unchecked = tmp_path / "unchecked.nnc"
    report = api.encode(path, unchecked, verify=False)
    assert report.check is None
    collapsed = _decoded_snr(path, unchecked, probes)
    checked = tmp_path / "checked.nnc"
    report = api.encode(path, checked)
    check = report.check
    assert check.passed and check.probes == "synthesised" and check.samples == verify.PROBE_SAMPLES
    assert collapsed < check.predicted_snr_db - verify.COLLAPSE_MARGIN_DB  # the unchecked encode collapsed
    assert check.rounds >= 1 and any(line.startswith("w: ") for line in check.refined)
    # What the check measured is what the written stream decodes to.
    assert _decoded_snr(path, checked, probes) == pytest.approx(check.output_snr_db, abs=1e-6)
    assert check.output_snr_db >= check.predicted_snr_db - verify.COLLAPSE_MARGIN_DB
    assert report.bitstream_bytes > unchecked.stat().st_size  # finer steps cost bytes


def test_a_well_conditioned_model_is_checked_and_left_alone(samples_dir: Path, tmp_path: Path) -> None:
    plain = api.encode(samples_dir / "resnet.onnx", tmp_path / "plain.nnc", verify=False)
    checked = api.encode(samples_dir / "resnet.onnx", tmp_path / "checked.nnc")
    assert checked.check.passed and not checked.check.refined and checked.check.rounds == 0
    assert checked.check.top1_agreement == 100.0
    assert (tmp_path / "plain.nnc").read_bytes() == (tmp_path / "checked.nnc").read_bytes()


def test_calibration_samples_are_the_probes(samples_dir: Path, tmp_path: Path) -> None:
    calibration = nnc_tool.inputs.read_inputs(samples_dir / "digits_calib.npz")
    report = api.encode(samples_dir / "lenet.onnx", None, calibration=calibration)
    assert report.check.probes == "calibration" and report.check.samples == verify.PROBE_SAMPLES


def test_min_snr_is_met_by_coding_finer(tmp_path: Path, samples_dir: Path) -> None:
    plain = api.encode(samples_dir / "mlp.onnx", None)
    demand = plain.check.output_snr_db + 6.0
    report = api.encode(samples_dir / "mlp.onnx", tmp_path / "mlp.nnc", min_snr_db=demand)
    assert report.check.output_snr_db >= demand and report.check.refined
    assert report.bitstream_bytes > plain.bitstream_bytes


def test_min_snr_beyond_any_step_codes_exactly(samples_dir: Path) -> None:
    report = api.encode(samples_dir / "mlp.onnx", None, min_snr_db=400)
    assert report.check.output_snr_db == math.inf and all(line.endswith(": exact") for line in report.check.refined)


def test_unmet_min_snr_fails_in_one_line_and_writes_nothing(tmp_path: Path, samples_dir: Path, monkeypatch) -> None:
    monkeypatch.setattr(verify, "MAX_REPAIR_ROUNDS", 0)  # no re-encode allowed: the demand stays unmet
    output = tmp_path / "mlp.nnc"
    result = CliRunner().invoke(main, ["encode", str(samples_dir / "mlp.onnx"), "-o", str(output), "--min-snr", "400"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "self-check failed" in lines[0] and "--min-snr 400" in lines[0]
    assert not output.exists() and not list(tmp_path.iterdir())
    with pytest.raises(CheckError):
        api.encode(samples_dir / "mlp.onnx", None, min_snr_db=400)


def test_min_snr_with_no_check_is_a_usage_error(tmp_path: Path, samples_dir: Path) -> None:
    result = CliRunner().invoke(
        main, ["encode", str(samples_dir / "mlp.onnx"), "-o", str(tmp_path / "x.nnc"), "--min-snr", "30", "--no-check"]
    )
    assert result.exit_code == 2 and "--no-check" in result.output


def test_cli_reports_the_check_in_text_and_json(tmp_path: Path, samples_dir: Path) -> None:
    runner = CliRunner()
    text = runner.invoke(main, ["encode", str(samples_dir / "lenet.onnx"), "-o", str(tmp_path / "a.nnc")])
    assert text.exit_code == 0 and "self-check: output SNR" in text.output
    shown = runner.invoke(main, ["encode", str(samples_dir / "lenet.onnx"), "-o", str(tmp_path / "b.nnc"), "--json"])
    check = json.loads(shown.output)["check"]
    assert check["passed"] is True and check["probes"] == "synthesised" and check["output_snr_db"] > 30


def test_a_three_input_transformer_is_checked_on_synthesised_probes(tmp_path: Path) -> None:
    path = build_transformer(tmp_path)
    report = api.encode(path, tmp_path / "t.nnc")
    assert report.check.passed and report.check.output_snr_db > 30
    assert report.check.top1_agreement is not None


def test_non_finite_outputs_fail_and_equal_infinities_do_not() -> None:
    reference = [np.array([[1.0, -np.inf], [2.0, 3.0]])]
    assert verify.output_noise(reference, [np.array([[1.0, -np.inf], [2.0, 3.5]])]) == (14.0, 0.25)
    assert math.isinf(verify.output_noise(reference, [np.array([[1.0, -np.inf], [np.nan, 3.0]])])[1])
    assert math.isinf(verify.output_noise(reference, [np.array([[1.0, 0.0], [2.0, 3.0]])])[1])
    result = verify.CheckResult(-math.inf, 40.0, None, finite=False)
    assert not result.passed and "not finite" in result.reason()


def test_refinements_follow_the_noise_and_turn_exact_past_the_limit() -> None:
    chosen = verify.refinements({"a": 64.0, "b": math.inf, "c": 1e30}, allowed_noise=8.0, previous={})
    # a: noise 64 against a harmless share of 1 -> 2 log2(64) = 12 QP; b non-finite and c too far: exact.
    assert chosen == {"a": 12, "b": None, "c": None}
    again = verify.refinements({"a": 2.0}, allowed_noise=8.0, previous=chosen)
    assert again["a"] == 12 + 4  # at least 4 QP per round


def test_overridable_proto_feeds_constant_node_weights(tmp_path: Path) -> None:
    """A weight held in a Constant node (paddle2onnx, tf2onnx) can be replaced at run time."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)), helper.make_node("MatMul", ["x", "w"], ["y"])],
        "c",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    model = read_model(_save(graph, tmp_path / "c.onnx"))
    checker = verify.Checker(model)
    x = checker.probes.arrays["x"][:1]
    assert checker.outputs({})[0].shape[-1] == 3
    replaced = checker.outputs({"w": 2 * w})[0]
    np.testing.assert_allclose(replaced, 2 * checker.reference[0], rtol=1e-5)
    proto, feeds, _ = onnx_format.overridable_proto(model)
    assert feeds == {"w": "w"} and not any(n.op_type == "Constant" for n in proto.graph.node)


def test_a_model_onnxruntime_cannot_run_is_encoded_and_says_so(tmp_path: Path) -> None:
    from onnx_factory import build_bf16

    path = build_bf16(tmp_path)
    report = api.encode(path, tmp_path / "bf16.nnc")
    assert report.check is not None and report.check.passed is None and "onnxruntime" in report.check.skipped
    with pytest.raises(CheckError, match="cannot be checked"):
        api.encode(path, tmp_path / "again.nnc", min_snr_db=20)
    assert not (tmp_path / "again.nnc").exists()


def test_models_too_large_to_hold_twice_are_not_checked(tmp_path: Path, samples_dir: Path, monkeypatch) -> None:
    monkeypatch.setattr(verify, "CHECK_MAX_VALUES", 1000)
    monkeypatch.setattr(api, "CHECK_MAX_VALUES", 1000)
    report = api.encode(samples_dir / "mlp.onnx", None)
    assert report.check.passed is None and "second copy" in report.check.skipped
    with pytest.raises(nnc_tool.errors.UsageError, match="--min-snr needs the self-check"):
        api.encode(samples_dir / "mlp.onnx", None, min_snr_db=30)


def test_weights_inside_if_branches_are_fed_like_main_graph_weights(tmp_path: Path) -> None:
    """Subgraph tensors move to the main graph (the branches read them from the outer scope), so
    one session serves checks and culprit searches of models with control flow (silero-vad)."""
    from dataclasses import replace

    from onnx_factory import build_if_subgraph

    model = read_model(build_if_subgraph(tmp_path))
    checker = verify.Checker(model)
    inner = [t for t in model.tensors if "/" in t.name and t.is_float]
    # A branch's "w" shadows the main graph's "w": moving it out would capture the wrong value,
    # so it stays baked in (and is replaced through a session of its own).
    assert {t.name for t in inner if t.name not in checker._runner.names} == {"gate/then_branch/w"}
    for tensor in inner:
        changed = (tensor.array * 1.5).astype(tensor.array.dtype)
        rebuilt = replace(model, tensors=[Tensor(t.name, changed, t.role) if t.name == tensor.name else t for t in model.tensors])
        expected = run_model(rebuilt, checker.probes)
        for got, want in zip(checker.outputs({tensor.name: changed}), expected):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_top1_agreement_reads_score_rows_only() -> None:
    scores = np.array([[0.1, 0.9], [0.8, 0.2]], np.float32)
    assert verify.top1_agreement([scores], [np.array([[0.2, 0.7], [0.1, 0.3]], np.float32)]) == 50.0
    dense = np.zeros((2, 1, 8, 8), np.float32)  # a detector's probability map is not one row of scores
    assert verify.top1_agreement([dense], [dense]) is None
    frames = np.zeros((2, 5, 10), np.float32)  # nor is a recognizer's sequence of frames
    assert verify.top1_agreement([frames], [frames]) is None


def test_uniform_refinements_bring_the_total_noise_under_the_allowance() -> None:
    chosen = verify.uniform_refinements(["a", "b", "c"], noise=16.0, allowed_noise=1.0, previous={"b": 4, "c": None})
    # noise ~ 2^(QP/2): a factor 16 takes 8 QP, plus one of margin, on top of what each had.
    assert chosen == {"a": 9, "b": 13, "c": None}
    assert verify.uniform_refinements(["a"], noise=2.0, allowed_noise=1.0, previous={"a": 30}) == {"a": None}


def test_noise_spread_over_every_tensor_is_met_by_coding_all_of_them_finer(samples_dir: Path, monkeypatch) -> None:
    plain = api.encode(samples_dir / "mlp.onnx", None)
    monkeypatch.setattr(verify, "HARMLESS_SHARE", 10.0)  # no tensor alone is ever a culprit
    demand = plain.check.output_snr_db + 6.0
    report = api.encode(samples_dir / "mlp.onnx", None, min_snr_db=demand)
    assert report.check.output_snr_db >= demand
    coded = [t.name for t in plain.tensors if t.step is not None]
    assert {line.split(":")[0] for line in report.check.refined} == set(coded)


def test_plain_encode_keeps_the_default_floor_and_an_explicit_qp_is_what_it_says(
    tmp_path: Path, samples_dir: Path, monkeypatch
) -> None:
    plain = api.encode(samples_dir / "mlp.onnx", tmp_path / "api.nnc")
    floor = plain.check.output_snr_db + 6.0
    monkeypatch.setattr(verify, "DEFAULT_FLOOR_DB", floor)
    runner = CliRunner()
    default = runner.invoke(main, ["encode", str(samples_dir / "mlp.onnx"), "-o", str(tmp_path / "d.nnc"), "--json"])
    check = json.loads(default.output)["check"]
    assert default.exit_code == 0 and check["refined"] and check["output_snr_db"] >= floor
    explicit = runner.invoke(main, ["encode", str(samples_dir / "mlp.onnx"), "-o", str(tmp_path / "q.nnc"), "--qp", "-38"])
    assert explicit.exit_code == 0
    assert (tmp_path / "q.nnc").read_bytes() == (tmp_path / "api.nnc").read_bytes()
    # A floor the repair cannot reach is a warning, not a failure.
    monkeypatch.setattr(verify, "DEFAULT_FLOOR_DB", 500.0)
    monkeypatch.setattr(verify, "MAX_REPAIR_ROUNDS", 0)
    unreachable = runner.invoke(main, ["encode", str(samples_dir / "mlp.onnx"), "-o", str(tmp_path / "u.nnc")])
    assert unreachable.exit_code == 0 and "warning" in unreachable.output and "500 dB" in unreachable.output


def test_a_model_whose_only_lossy_layers_are_filterbanks_is_not_predicted_exact() -> None:
    from nnc_tool.model import Model, TensorRole

    rng = np.random.default_rng(0)
    basis = rng.standard_normal((8, 1, 16)).astype(np.float32)
    bias = rng.standard_normal(8).astype(np.float32)
    model = Model("onnx", b"", [Tensor("basis", basis, TensorRole.NONWEIGHT), Tensor("bias", bias, TensorRole.NONWEIGHT)])
    rebuilt = {"basis": basis + np.float32(0.01) * rng.standard_normal(basis.shape).astype(np.float32), "bias": bias + 0.5}
    predicted = verify.predicted_snr_db(model, rebuilt)
    assert 35.0 < predicted < 45.0  # 1 % noise on a unit-RMS filterbank: 40 dB; the 1-D bias does not count


def test_a_model_the_probes_cannot_run_is_reported_unchecked_without_onnxruntime_noise(tmp_path, capfd) -> None:
    # x [1, N] reshaped to [5, 3, -1] fails at run time for every probe length (16, 8, 32, ...,
    # and the 5 and 3 the Reshape names): the check is reported as not run, in our words only.
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"]), helper.make_node("MatMul", ["x2", "w"], ["z"])],
        "unrunnable",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "N"]),
         helper.make_tensor_value_info("x2", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 30])],
        [numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 30)).astype(np.float32), "w"),
         numpy_helper.from_array(np.array([5, 3, -1], np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "unrunnable.onnx"
    onnx.save_model(model, path)
    capfd.readouterr()
    report = api.encode(path, tmp_path / "u.nnc", api.EncodeOptions(qp=-38))
    assert report.check.skipped is not None and "does not run" in report.check.skipped
    captured = capfd.readouterr()
    assert "onnxruntime" not in captured.err and "ExecuteKernel" not in captured.err, captured.err


def test_a_dead_tensor_does_not_blind_the_prediction() -> None:
    from nnc_tool.model import Model, TensorRole

    rng = np.random.default_rng(1)
    live = rng.standard_normal((16, 32)).astype(np.float32)
    dead = (rng.standard_normal((16, 32)) * 3e-7).astype(np.float32)  # a folded weight, RMS 3e-7
    model = Model("onnx", b"", [Tensor("live", live, TensorRole.WEIGHT), Tensor("dead", dead, TensorRole.WEIGHT)])
    rebuilt = {"live": live + np.float32(0.01) * rng.standard_normal(live.shape).astype(np.float32),
               "dead": np.round(dead / 1e-3) * np.float32(1e-3) + np.float32(1e-3)}  # error >> its power
    assert 38.0 < verify.predicted_snr_db(model, rebuilt) < 42.0  # the live tensor's 1 %: 40 dB


def test_the_culprit_search_names_the_loud_tensor_and_reuses_the_checks_measurement(samples_dir: Path) -> None:
    model = read_model(samples_dir / "mlp.onnx")
    checker = verify.Checker(model)
    floats = [t for t in model.tensors if t.is_float]
    loud = max(floats, key=lambda t: t.array.size)
    rng = np.random.default_rng(3)
    changed = {t.name: (t.array * (1 + 1e-6)).astype(t.array.dtype) for t in floats}
    changed[loud.name] = (loud.array + 0.5 * loud.array.std() * rng.standard_normal(loud.array.shape)).astype(np.float32)
    runs: list[tuple[str, ...]] = []
    measure = checker.group_noise
    checker.group_noise = lambda changed, group: runs.append(tuple(group)) or measure(changed, group)
    total = measure(changed, list(changed))
    allowed = total / 4

    searched = checker.find_culprits(changed, allowed)
    first = len(runs)
    reused = checker.find_culprits(changed, allowed, total_noise=total)
    assert set(searched) == set(reused) == {loud.name}
    assert len(runs) - first == first - 1  # the whole set is not run again
    assert reused[loud.name] == pytest.approx(measure(changed, [loud.name]))

    # One run allowed: the parts it could not test count whole, with the noise of the set.
    budget = checker.find_culprits(changed, allowed, max_runs=1, total_noise=total)
    size = math.ceil(len(changed) / verify.SEARCH_FANOUT)
    untested = list(changed)[size:]
    assert loud.name in budget and all(budget[name] == total for name in untested)


def test_a_re_encode_reuses_unchanged_payloads_and_writes_the_same_bytes(samples_dir: Path, monkeypatch) -> None:
    """The repair's re-encodes hand back the payloads of tensors whose levels did not change:
    the stream is byte for byte what a fresh write gives, and only the refined tensor is coded."""
    import io

    model = api.prepare_model(read_model(samples_dir / "resnet.onnx"))
    options = api.EncodeOptions(qp=-30)
    refined = next(t.name for t in model.model.tensors if t.role == TensorRole.WEIGHT)

    def write(refinements, earlier=None) -> bytes:
        sink = io.BytesIO()
        api.write_bitstream(model.model, sink, options, 0, None, None, model.plan_cache, model.moments,
                            refinements=refinements, earlier=earlier)
        return sink.getvalue()

    payloads: dict = {}
    first = write(None, payloads)
    assert payloads and first == write(None)
    coded = []
    original = api.encode_tensor
    monkeypatch.setattr(api, "encode_tensor", lambda t, *a: coded.append(t.name) or original(t, *a))
    again = write({refined: 4}, payloads)
    assert coded == [refined]
    monkeypatch.setattr(api, "encode_tensor", original)
    assert again == write({refined: 4}) != first
