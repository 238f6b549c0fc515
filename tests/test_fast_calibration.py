"""Fast calibration: one onnxruntime pass measures every layer's input channel moments
(graph/measured_stats.py), which then drive Kronecker error feedback and bias correction like the
BatchNorm estimate does (quantize/plan.py, calibration_mode "fast")."""
import json

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import helper

from nnc_tool import TensorRole, api, read_model
from nnc_tool.bench.runner import compare_outputs
from nnc_tool.cli import main
from nnc_tool.formats.onnx_format import runtime_proto, to_proto
from nnc_tool.graph import measured_stats
from nnc_tool.graph.measured_stats import measure_channel_moments
from nnc_tool.graph.onnx_util import cpu_session
from nnc_tool.quantize import plan as quant_plan
from nnc_tool.quantize.plan import fast_calibration, plan_quantization
from nnc_tool.quantize.sensitivity import run_onnx
from nnc_tool.quantize.fold import fold_batchnorm
from nnc_tool.quantize.uniform import QuantSettings


@pytest.fixture(scope="module")
def calibration(samples_dir) -> np.ndarray:
    with np.load(samples_dir / "digits_calib.npz", allow_pickle=False) as data:
        return data["x"]


def _activation(model, name: str, x: np.ndarray) -> np.ndarray:
    """`name` computed by a session over the complete proto (weights inline), as a reference."""
    proto = to_proto(model)
    proto.graph.output.append(helper.make_empty_tensor_value_info(name))
    session = cpu_session(proto)
    return session.run([name], {session.get_inputs()[0].name: x.astype(np.float32)})[0]


def test_runtime_proto_runs_like_the_full_proto(samples_dir, digits_test):
    model = read_model(samples_dir / "mobilenet.onnx")
    x = digits_test[0][:20].astype(np.float32)
    proto, weights = runtime_proto(model)
    assert weights and all(not init.raw_data for init in proto.graph.initializer if init.name in weights)
    session = cpu_session(proto, initializers=weights)
    fast = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_array_equal(fast, run_onnx(model, x))


def test_measured_moments_match_the_activations(samples_dir, calibration):
    model = read_model(samples_dir / "resnet.onnx")
    measured = measure_channel_moments(model, calibration, samples=12)
    conv_inputs = {n.input[0] for n in to_proto(model).graph.node if n.op_type == "Conv"}
    assert conv_inputs <= set(measured)  # the image (the stem's input) included
    name = "layer1.0.relu_1" if "layer1.0.relu_1" in measured else sorted(conv_inputs - {"input"})[0]
    act = _activation(model, name, calibration[:12])
    rows = np.moveaxis(act, 1, -1).reshape(-1, act.shape[1]).astype(np.float64)
    stats = measured[name]
    np.testing.assert_allclose(stats.mean, rows.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.var, rows.var(axis=0), rtol=1e-4, atol=1e-6)
    sample = np.cov(rows, rowvar=False, bias=True)
    off = ~np.eye(len(sample), dtype=bool)
    np.testing.assert_allclose(np.diagonal(stats.covariance), stats.var)
    np.testing.assert_allclose(stats.covariance[off], (1 - measured_stats.SHRINKAGE) * sample[off], rtol=1e-3, atol=1e-6)


def test_measured_moments_are_the_same_before_and_after_folding(samples_dir, calibration):
    model = read_model(samples_dir / "resnet.onnx")
    prepared = api.prepare_model(model, QuantSettings(calibration_mode="fast"), calibration)
    assert prepared.folded > 0
    before = prepared.plan_cache[quant_plan.MEASURED_MOMENTS]  # measured on the unfolded model, in a thread
    after = measure_channel_moments(prepared.model, calibration)
    assert set(before) == set(after)
    for name in before:
        np.testing.assert_allclose(before[name].mean, after[name].mean, rtol=1e-4, atol=1e-5)


def test_auto_mode_picks_fast_calibration_by_size(samples_dir, monkeypatch):
    model = read_model(samples_dir / "resnet.onnx")
    folded, _ = fold_batchnorm(model)
    assert not fast_calibration(model, QuantSettings())
    assert fast_calibration(model, QuantSettings(calibration_mode="fast"))
    weights = sum(t.array.size for t in model.tensors if t.role == TensorRole.WEIGHT)
    monkeypatch.setattr(quant_plan, "FULL_CALIBRATION_PARAMETERS", weights - 1)
    assert fast_calibration(model, QuantSettings()) and fast_calibration(folded, QuantSettings())
    monkeypatch.setattr(quant_plan, "FULL_CALIBRATION_PARAMETERS", weights)  # folding adds biases, no weights
    assert not fast_calibration(model, QuantSettings()) and not fast_calibration(folded, QuantSettings())
    monkeypatch.setattr(quant_plan, "FULL_CALIBRATION_PARAMETERS", weights - 1)
    assert not fast_calibration(model, QuantSettings(calibration_mode="full"))
    assert not fast_calibration(model, QuantSettings(calibration_mode="fast", lossless=True))
    with pytest.raises(ValueError, match="calibration_mode"):
        QuantSettings(calibration_mode="quick")


def test_fast_calibration_beats_data_free_without_sensitivity_runs(samples_dir, digits_test, calibration, monkeypatch):
    x, y = digits_test
    model = read_model(samples_dir / "resnet.onnx")
    reference = run_onnx(model, x)

    def encode(settings, data):
        prepared = api.prepare_model(model, settings, data)
        plan = plan_quantization(prepared.model, settings, data, cache=prepared.plan_cache, moments=prepared.moments)
        stream, _ = api.compress_model(prepared.model, settings, calibration=data, moments=prepared.moments, plan_cache=prepared.plan_cache)
        snr = compare_outputs(reference, run_onnx(api.decompress_model(stream), x), y).output_snr_db
        return len(stream), snr, plan

    qps = (-34, -30, -26, -22)
    data_free = [encode(QuantSettings(qp=qp), None) for qp in qps]

    def no_probes(*args, **kwargs):
        raise AssertionError("fast calibration must not run per-tensor sensitivity probes or layer Hessians")

    monkeypatch.setattr(quant_plan, "measure_sensitivities", no_probes)
    monkeypatch.setattr(quant_plan, "layer_hessians", no_probes)
    fast = [encode(QuantSettings(qp=qp, calibration_mode="fast"), calibration) for qp in qps]
    # The stem (whose input is the image, unknown to BatchNorm statistics) is rounded too.
    assert all(len(f[2].compensated) == len(d[2].compensated) + 1 == 9 for f, d in zip(fast, data_free))
    # Measured (fold-aware allocation): data-free 50820 B / 55.7 dB ... 29833 B / 37.5 dB over these
    # QPs; fast 0.8-1.2 % smaller, +0.06 dB on average (-0.1 / +0.6 / -1.1 / +0.8 dB point by point:
    # the single points move by about a dB with the allocation's QP rounding).
    assert all(f[0] < 1.01 * d[0] for f, d in zip(fast, data_free))
    gain = np.mean([f[1] - d[1] for f, d in zip(fast, data_free)])
    assert gain > -0.25, [(d[:2], f[:2]) for d, f in zip(data_free, fast)]


def test_cli_calib_mode(samples_dir, tmp_path):
    runner = CliRunner()
    calib = samples_dir / "digits_calib.npz"
    sizes = {}
    for mode in ("fast", "full"):
        out = tmp_path / f"{mode}.nnc"
        result = runner.invoke(main, ["encode", str(samples_dir / "lenet.onnx"), "-o", str(out), "--qp", "-26",
                                      "--calib", str(calib), "--calib-mode", mode, "--json"])
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        assert report["feedback_layers"] >= 1 and report["calibration_mode"] == mode
        sizes[mode] = report["bitstream_bytes"]
        text = runner.invoke(main, ["encode", str(samples_dir / "lenet.onnx"), "-o", str(out), "--qp", "-26",
                                    "--calib", str(calib), "--calib-mode", mode])
        assert f"calibration: {mode}," in text.output
    assert sizes["fast"] != sizes["full"]
    result = runner.invoke(main, ["encode", str(samples_dir / "lenet.onnx"), "-o", str(tmp_path / "x.nnc"), "--calib-mode", "quick"])
    assert result.exit_code == 2 and "quick" in result.output
    assert not (tmp_path / "x.nnc").exists()


def test_auto_mode_keeps_full_calibration_for_a_large_model_whose_runs_are_cheap(samples_dir, calibration, monkeypatch):
    from nnc_tool.inputs import calibration_inputs

    model = read_model(samples_dir / "resnet.onnx")
    data = calibration_inputs(calibration, model)
    weights = sum(t.array.size for t in model.tensors if t.role == TensorRole.WEIGHT)
    monkeypatch.setattr(quant_plan, "FULL_CALIBRATION_PARAMETERS", weights - 1)
    assert fast_calibration(model, QuantSettings())  # no data: the size alone decides
    assert not fast_calibration(model, QuantSettings(), data)  # a few M multiply-accumulates a run
    monkeypatch.setattr(quant_plan, "SENSITIVITY_MACS", 1.0)
    assert fast_calibration(model, QuantSettings(), data)
    assert not fast_calibration(model, QuantSettings(calibration_mode="full"), data)
