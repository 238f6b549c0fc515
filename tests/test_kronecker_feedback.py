"""Data-free Kronecker error feedback: channel second moments estimated from BatchNorm statistics
(graph/activation_stats.py) and GPTQ for C (x) S (quantize/rdo.py), the same levels as dense GPTQ
on kron(C, S)."""
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from nnc_tool import api, read_model
from nnc_tool.bench.runner import compare_outputs
from nnc_tool.cli import main
from nnc_tool.formats.onnx_format import from_proto
from nnc_tool.graph.activation_stats import channel_moments, conv_input_second_moments
from nnc_tool.quantize import rdo
from nnc_tool.quantize.plan import plan_quantization
from nnc_tool.quantize.sensitivity import run_onnx
from nnc_tool.quantize.fold import fold_batchnorm
from nnc_tool.quantize.uniform import QuantSettings


def _tap_correlation(k: int, rho: float) -> np.ndarray:
    taps = np.stack([x.ravel() for x in np.meshgrid(np.arange(k), np.arange(k), indexing="ij")], 1)
    return rho ** np.abs(taps[:, None] - taps[None]).sum(2)


@pytest.mark.parametrize(
    "rows, channels, k, rho, block, prune, dead",
    [(6, 12, 3, 0.3, 4, False, False), (7, 24, 3, 0.5, 8, True, False), (7, 21, 3, 0.5, 7, False, True),
     (5, 40, 3, 0.3, 40, False, False), (5, 30, 1, 0.3, 10, False, False)],
)
def test_kronecker_round_equals_dense_gptq(rows, channels, k, rho, block, prune, dead):
    rng = np.random.default_rng(channels)
    mix = rng.normal(size=(channels, 3 * channels))
    moments = mix @ mix.T / (3 * channels) + 0.5
    if dead:
        moments[2, :] = 0.0
        moments[:, 2] = 0.0
    weights = rng.normal(size=(rows, channels, k, k)).astype(np.float32)
    if prune:
        weights[rng.random(weights.shape) < 0.3] = 0.0
    step = 0.3
    factor = rdo.kronecker_factor(moments, block, damping=1e-9)
    levels = rdo.kronecker_gptq_round([(weights.reshape(rows, channels, -1), step, factor)], (k, k), rho)[0]
    hessian = np.kron(moments, _tap_correlation(k, rho))
    dense = rdo.gptq_round(weights.reshape(rows, -1).astype(np.float64), rdo.diagonal_blocks(hessian, block * k * k), np.full(rows, step), damping=1e-9)
    np.testing.assert_array_equal(levels.reshape(rows, -1), dense)
    if prune:
        assert np.all(levels[weights.reshape(rows, channels, -1) == 0] == 0)


def test_layers_side_by_side_equal_one_by_one():
    rng = np.random.default_rng(1)
    layers = []
    for rows, channels in ((8, 16), (12, 40), (5, 64)):
        mix = rng.normal(size=(channels, channels))
        layers.append((rng.normal(size=(rows, channels, 9)).astype(np.float32) * 3, 0.5, rdo.kronecker_factor(mix @ mix.T / channels + np.eye(channels), 16)))
    together = rdo.kronecker_gptq_round(layers, (3, 3))
    for layer, levels in zip(layers, together):
        np.testing.assert_array_equal(levels, rdo.kronecker_gptq_round([layer], (3, 3))[0])


def _conv_bn_relu_conv() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x [n, 10, 1, 1] -> 1x1 Conv -> BN (statistics exact for white unit input) -> Relu -> 1x1 Conv;
    two pairs of filters strongly (anti-)correlated."""
    rng = np.random.default_rng(5)
    cin, mid = 10, 6
    w1 = rng.normal(size=(mid, cin))
    w1[1] = w1[0] + 0.3 * rng.normal(size=cin)
    w1[3] = -w1[2] + 0.5 * rng.normal(size=cin)
    arrays = {"c1.w": w1.reshape(mid, cin, 1, 1), "bn.s": 0.5 + rng.random(mid), "bn.b": rng.normal(size=mid) * 0.7,
              "bn.m": np.zeros(mid), "bn.v": (w1**2).sum(1), "c2.w": rng.normal(size=(4, mid, 1, 1))}
    nodes = [helper.make_node("Conv", ["x", "c1.w"], ["a"]),
             helper.make_node("BatchNormalization", ["a", "bn.s", "bn.b", "bn.m", "bn.v"], ["b"], epsilon=1e-9),
             helper.make_node("Relu", ["b"], ["r"]), helper.make_node("Conv", ["r", "c2.w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", cin, 1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in arrays.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto, arrays


def test_estimated_input_second_moments_match_monte_carlo():
    proto, arrays = _conv_bn_relu_conv()
    model = from_proto(proto)
    estimated = conv_input_second_moments(model, channel_moments(model))
    assert set(estimated) == {"c2.w"}  # the first conv's input (the image) has no statistics
    x = np.random.default_rng(0).normal(size=(200_000, 10))
    w1 = arrays["c1.w"].reshape(6, 10)
    relu = np.maximum(x @ w1.T / np.sqrt(arrays["bn.v"]) * arrays["bn.s"] + arrays["bn.b"], 0.0)
    measured = relu.T @ relu / len(relu)
    scale = measured.diagonal().max()
    # The diagonal is exact (up to sampling); the linearised ReLU gets the off-diagonal within 5 %
    # of the largest second moment, 3x closer than means alone (independent channels).
    np.testing.assert_allclose(estimated["c2.w"].diagonal(), measured.diagonal(), rtol=0.02)
    error = np.abs(estimated["c2.w"] - measured).max() / scale
    mean = relu.mean(0)
    independent = np.outer(mean, mean) + np.diag(measured.diagonal() - mean**2)
    assert error < 0.05
    assert error < np.abs(independent - measured).max() / scale / 3


def test_data_free_channel_feedback_lifts_output_snr(samples_dir, digits_test):
    x, y = digits_test
    original = read_model(samples_dir / "resnet.onnx")
    moments = channel_moments(original)
    folded, _ = fold_batchnorm(original)
    reference = run_onnx(folded, x)
    results = {}
    for feedback in (False, True):
        settings = QuantSettings(qp=-26, error_feedback=feedback)
        plan = plan_quantization(folded, settings, moments=moments)
        data, _ = api.compress_model(folded, settings, moments=moments)
        snr = compare_outputs(reference, run_onnx(api.decompress_model(data), x), y).output_snr_db
        results[feedback] = (len(data), snr, plan.compensated)
    # Measured: 33 320 -> 33 761 bytes, 39.4 -> 41.3 dB; every conv after the stem is rounded.
    assert len(results[True][2]) == 8 and not results[False][2]
    assert results[True][0] < 1.03 * results[False][0]
    assert results[True][1] > results[False][1] + 1.0, results


def test_cli_no_error_feedback_switches_channel_feedback_off(samples_dir, tmp_path):
    runner = CliRunner()
    levels = {}
    for flag in ([], ["--no-error-feedback"]):
        out = tmp_path / f"m{len(flag)}.nnc"
        result = runner.invoke(main, ["encode", str(samples_dir / "resnet.onnx"), "-o", str(out), "--qp", "-26", "-q", *flag])
        assert result.exit_code == 0, result.output
        info = runner.invoke(main, ["info", str(out), "--json"])
        assert json.loads(info.output)["parameters"]["settings"]["error_feedback"] is not bool(flag)
        levels[bool(flag)] = api.decompress_model(out.read_bytes()).tensor_map()
    changed = [name for name, t in levels[False].items() if not np.array_equal(t.array, levels[True][name].array)]
    assert "layer1.conv1.weight" in changed and "conv1.weight" not in changed  # the stem's input is the image


def test_an_indefinite_estimate_falls_back_to_kernel_feedback(samples_dir, monkeypatch):
    from nnc_tool.quantize import feedback

    original = read_model(samples_dir / "resnet.onnx")
    moments = channel_moments(original)
    folded, _ = fold_batchnorm(original)
    estimates = conv_input_second_moments(folded, moments)
    broken = sorted(estimates)[0]

    def indefinite(model, moments):
        found = dict(estimates)
        n = len(found[broken])
        found[broken] = 4.0 * np.eye(n) - 3.0 * np.ones((n, n))  # unit diagonal, eigenvalue 4 - 3n
        return found

    monkeypatch.setattr(feedback, "conv_input_second_moments", indefinite)
    plan = plan_quantization(folded, QuantSettings(qp=-26), moments=moments)
    assert broken not in plan.compensated and len(plan.compensated) == len(estimates) - 1
    data, _ = api.compress_model(folded, QuantSettings(qp=-26), moments=moments)
    assert api.decompress_model(data).tensor_map()[broken].array.shape == folded.tensor_map()[broken].array.shape
