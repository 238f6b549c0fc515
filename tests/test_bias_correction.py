"""Data-free bias correction: activation moments from BatchNorm statistics (graph/activation_stats.py)
and the bias change that cancels the mean output shift of rounded weights (quantize/bias_correction.py)."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from nnc_tool import api, read_model
from nnc_tool.bench.runner import compare_outputs
from nnc_tool.cli import main
from nnc_tool.formats.onnx_format import from_proto, to_proto
from nnc_tool.graph.activation_stats import channel_moments, layer_inputs
from nnc_tool.quantize.fold import fold_batchnorm
from nnc_tool.quantize.plan import plan_quantization
from nnc_tool.quantize.uniform import QuantSettings

RNG = np.random.default_rng(7)
C = 6


def _bn_relu_conv(spatial: int, pads: int, add_branch: bool = False) -> onnx.ModelProto:
    """x[N,C,s,s] -> BN -> Relu (-> + BN2 -> Relu) -> Conv 3x3 (bias) -> y; BN stats = x's law."""
    rng = np.random.default_rng(3)
    inits = {
        "bn.scale": 0.5 + rng.random(C),
        "bn.bias": rng.normal(size=C) * 0.8,
        "bn.mean": rng.normal(size=C),
        "bn.var": 0.2 + rng.random(C) * 2,
        "conv.weight": rng.normal(size=(8, C, 3, 3)) * 0.3,
        "conv.bias": rng.normal(size=8) * 0.1,
    }
    nodes = [
        helper.make_node("BatchNormalization", ["x", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["b"], epsilon=1e-5),
        helper.make_node("Relu", ["b"], ["r"]),
    ]
    act = "r"
    if add_branch:
        inits.update({"bn2.scale": 0.5 + rng.random(C), "bn2.bias": rng.normal(size=C) * 0.5,
                      "bn2.mean": rng.normal(size=C), "bn2.var": 0.2 + rng.random(C)})
        nodes += [
            helper.make_node("BatchNormalization", ["x2", "bn2.scale", "bn2.bias", "bn2.mean", "bn2.var"], ["b2"]),
            helper.make_node("Add", ["r", "b2"], ["s"]),
            helper.make_node("Relu", ["s"], ["r2"]),
        ]
        act = "r2"
    nodes.append(helper.make_node("Conv", [act, "conv.weight", "conv.bias"], ["y"], pads=[pads] * 4, kernel_shape=[3, 3]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", C, spatial, spatial])]
    if add_branch:
        inputs.append(helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["n", C, spatial, spatial]))
    graph = helper.make_graph(
        nodes, "bn_relu_conv", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _as_model(proto: onnx.ModelProto):
    """Our Model of a copy of `proto` (reading strips the tensors out of the proto it reads)."""
    return from_proto(onnx.ModelProto.FromString(proto.SerializeToString()))


def _feeds(proto: onnx.ModelProto, n: int) -> dict[str, np.ndarray]:
    """Inputs drawn from the laws each input's BatchNorm statistics describe."""
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    feeds = {}
    for value, prefix in (("x", "bn"), ("x2", "bn2")):
        if f"{prefix}.mean" not in inits:
            continue
        shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]]
        mean, std = inits[f"{prefix}.mean"], np.sqrt(inits[f"{prefix}.var"])
        feeds[value] = (RNG.normal(size=(n, *shape)) * std[:, None, None] + mean[:, None, None]).astype(np.float32)
    return feeds


def _run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    for name in outputs or []:
        proto.graph.output.append(helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.parametrize("add_branch", [False, True])
def test_moments_match_sampled_activations(add_branch: bool) -> None:
    proto = _bn_relu_conv(4, 1, add_branch)
    moments = channel_moments(_as_model(proto))
    act = "r2" if add_branch else "r"
    assert {"b", "r", act} <= set(moments) and "y" not in moments  # a conv output is not known
    _, sampled = _run(proto, _feeds(proto, 20_000), [act])
    mean = sampled.mean(axis=(0, 2, 3))
    var = sampled.var(axis=(0, 2, 3))
    np.testing.assert_allclose(moments[act].mean, mean, rtol=0.02, atol=0.01)
    # After an Add the sum of a rectified and a Gaussian channel is taken as Gaussian: exact
    # in the mean, a few per cent off in the variance (measured: up to 6.6 %).
    np.testing.assert_allclose(moments[act].var, var, rtol=0.10 if add_branch else 0.03, atol=0.01)


def test_expected_input_counts_padding_per_tap() -> None:
    # 2x2 input, 3x3 kernel, pad 1: the centre tap always reads the input, edge taps half the
    # time, corner taps a quarter of the time.
    model = _as_model(_bn_relu_conv(2, 1))
    moments = channel_moments(model)
    layer = layer_inputs(model, moments)["conv.weight"]
    assert layer.bias == "conv.bias" and layer.out_axis == 0 and layer.expected.shape == (1, C, 3, 3)
    coverage = np.outer([0.5, 1, 0.5], [0.5, 1, 0.5])
    np.testing.assert_allclose(layer.expected[0], moments["r"].mean[:, None, None] * coverage)
    # Without padding every tap reads the input at every output position.
    unpadded = _as_model(_bn_relu_conv(4, 0))
    np.testing.assert_allclose(layer_inputs(unpadded, channel_moments(unpadded))["conv.weight"].expected[0],
                               np.broadcast_to(moments["r"].mean[:, None, None], (C, 3, 3)))


def test_removable_share_matches_sampled_layer_errors() -> None:
    # Random weight errors dW: the share of the output error energy sum(dW x)^2 that is the
    # per-channel mean over positions (what bias correction removes) is `removable`.
    proto = _bn_relu_conv(4, 1)
    model = _as_model(proto)
    layer = layer_inputs(model, channel_moments(model))["conv.weight"]
    assert 0.2 < layer.removable < 0.8
    _, act = _run(proto, _feeds(proto, 2000), ["r"])
    padded = np.pad(act, ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))  # n, C, 4, 4, 3, 3
    patches = windows.transpose(0, 2, 3, 1, 4, 5).reshape(-1, 4 * 4, C * 9)  # n, positions, taps
    errors = RNG.normal(size=(400, C * 9))
    out = np.einsum("npk,ek->enp", patches, errors)  # error output per (error draw, sample, position)
    total = np.mean(out**2)
    mean_shift = np.mean(out.mean(axis=(1, 2)) ** 2)
    assert abs(mean_shift / total - layer.removable) < 0.05, (mean_shift / total, layer.removable)


def test_bias_correction_cancels_the_mean_output_shift() -> None:
    proto = _bn_relu_conv(4, 1)
    model = _as_model(proto)
    moments = channel_moments(model)
    feeds = _feeds(proto, 4000)
    (reference,) = _run(proto, feeds)
    shifts = {}
    for correct in (False, True):
        data, _ = api.compress_model(model, QuantSettings(qp=-10, bias_correction=correct), moments=moments)
        (output,) = _run(to_proto(api.decompress_model(data)), feeds)
        shifts[correct] = np.abs((output - reference).mean(axis=(0, 2, 3)))
    # Coarse steps (QP -10, step 0.18 against weights of RMS 0.3) shift channel means by up to
    # ~0.4; the corrected bias leaves only sampling noise and the bias's own rounding.
    assert shifts[False].max() > 0.1, shifts
    assert shifts[True].max() < 0.2 * shifts[False].max(), shifts


def test_correction_lifts_output_snr_of_the_sample_resnet(samples_dir, digits_test) -> None:
    x, y = digits_test
    original = read_model(samples_dir / "resnet.onnx")
    moments = channel_moments(original)
    folded, _ = fold_batchnorm(original)
    assert len(layer_inputs(folded, moments)) >= 8  # every conv after the stem, and the classifier
    (reference,) = _run(to_proto(folded), {"input": x})
    results = {}
    for correct in (False, True):
        # Without error feedback: Kronecker feedback would round these convolutions itself and take
        # them out of bias correction.
        settings = QuantSettings(qp=-26, bias_correction=correct, error_feedback=False)
        data, _ = api.compress_model(folded, settings, moments=moments)
        (output,) = _run(to_proto(api.decompress_model(data)), {"input": x})
        results[correct] = (len(data), compare_outputs(reference, output, y).output_snr_db)
    # Measured: 36.8 -> 39.0 dB at 33 296 bytes either way.
    assert abs(results[True][0] - results[False][0]) <= 16
    assert results[True][1] > results[False][1] + 1.0, results


def test_cli_switch_changes_only_biases(samples_dir, tmp_path) -> None:
    runner = CliRunner()
    decoded = {}
    for flag in ([], ["--no-bias-correction"]):
        out = tmp_path / f"m{len(flag)}.nnc"
        # One QP for every weight: the allocation (which also credits bias correction) stays out of it.
        result = runner.invoke(main, ["encode", str(samples_dir / "mobilenet.onnx"), "-o", str(out), "--qp", "-30",
                                      "--uniform-qp", "-q", *flag])
        assert result.exit_code == 0, result.output
        info = runner.invoke(main, ["info", str(out), "--json"])
        assert json.loads(info.output)["parameters"]["settings"]["bias_correction"] is not bool(flag)
        decoded[bool(flag)] = api.decompress_model(out.read_bytes()).tensor_map()
    corrected, plain = decoded[False], decoded[True]
    assert corrected.keys() == plain.keys()
    changed = {name for name in plain if not np.array_equal(plain[name].array, corrected[name].array)}
    # Weights are rounded the same way; only the biases of layers after a BatchNorm + Relu move.
    assert changed and all(name.endswith("bias") for name in changed), changed
    assert all(plain[name].role.name == "NONWEIGHT" for name in changed)


def test_allocation_credits_the_corrected_share(samples_dir) -> None:
    original = read_model(samples_dir / "resnet.onnx")
    moments = channel_moments(original)
    folded, _ = fold_batchnorm(original)
    inputs = layer_inputs(folded, moments)
    settings = QuantSettings(qp=-30, error_feedback=False)  # else Kronecker feedback rounds these layers
    plain = plan_quantization(folded, replace(settings, bias_correction=False), moments=moments).qps
    credited = plan_quantization(folded, settings, moments=moments).qps
    sizes = {t.name: t.array.size for t in folded.tensors}
    weights = [n for n in plain if n in sizes and folded.tensor_map()[n].role.name == "WEIGHT"]
    # Corrected layers lose a third or more of their error: relative to the others they get
    # coarser steps, and the size-weighted mean QP stays at the requested one.
    shift = {n: credited[n] - plain[n] for n in weights}
    corrected = [n for n in weights if n in inputs and inputs[n].removable > 0.2]
    others = [n for n in weights if n not in corrected]
    assert corrected and others
    assert min(shift[n] for n in corrected) >= max(shift[n] for n in others), shift
    assert np.mean([shift[n] for n in corrected]) > np.mean([shift[n] for n in others]), shift
    mean = sum(credited[n] * sizes[n] for n in weights) / sum(sizes[n] for n in weights)
    assert abs(mean - settings.qp) <= 1.0


def test_error_feedback_layers_are_left_to_gptq(samples_dir) -> None:
    """With calibration data GPTQ cancels each layer's mean shift as the data has it; the
    BatchNorm estimate must not correct those biases again (it cost 1.3-2.6 dB when it did)."""
    original = read_model(samples_dir / "resnet.onnx")
    moments = channel_moments(original)
    folded, _ = fold_batchnorm(original)
    with np.load(samples_dir / "digits_calib.npz") as data:
        calibration = data["x"][:64]
    plan = plan_quantization(folded, QuantSettings(qp=-30), calibration, moments=moments)
    assert plan.compensated
    inputs = layer_inputs(folded, moments)
    assert not {inputs[w].bias for w in plan.compensated if w in inputs} & set(plan.corrected)
    plain = plan_quantization(folded, QuantSettings(qp=-30, bias_correction=False), calibration, moments=moments)
    for name, tensor in plain.model.tensor_map().items():
        np.testing.assert_array_equal(tensor.array, plan.model.tensor_map()[name].array)


def test_encode_report_counts_corrected_layers(samples_dir) -> None:
    path = samples_dir / "resnet.onnx"
    # Every conv after the stem (whose input is the image) and the classifier: 8 + 1.
    assert api.encode(path, None, QuantSettings(qp=-30, error_feedback=False)).corrected_biases == 9
    # Kronecker error feedback rounds those 8 convs itself (its Hessian holds their mean input).
    report = api.encode(path, None, QuantSettings(qp=-30))
    assert (report.corrected_biases, report.feedback_layers) == (1, 8)
    assert api.encode(path, None, QuantSettings(qp=-30, bias_correction=False)).corrected_biases == 0
    with np.load(samples_dir / "digits_calib.npz") as data:
        calibration = data["x"][:64]
    # With calibration data every layer gets GPTQ error feedback instead.
    assert api.encode(path, None, QuantSettings(qp=-30), calibration=calibration).corrected_biases == 0


def test_name_uses_counts_subgraph_reads_and_outputs():
    from onnx import helper

    from nnc_tool.graph.onnx_util import name_uses

    branch = helper.make_graph([helper.make_node("Identity", ["w"], ["b_out"])], "branch", [], [helper.make_tensor_value_info("b_out", 1, None)])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("If", ["cond"], ["z"], then_branch=branch, else_branch=branch)],
        "main", [], [helper.make_tensor_value_info("y", 1, None), helper.make_tensor_value_info("z", 1, None)],
    )
    uses = name_uses(graph)
    # w: the MatMul and both If branches; y is read as a graph output only.
    assert uses == {"x": 1, "w": 3, "cond": 1, "y": 1, "z": 1}
