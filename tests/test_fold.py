"""BatchNormalization folding (nnc_tool.quantize.fold)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import nnc_tool
from nnc_tool.formats import onnx_format
from nnc_tool.model import Model, Tensor, TensorRole
from nnc_tool.quantize.fold import fold_batchnorm

F32 = TensorProto.FLOAT


def _model(nodes, inits, inputs, outputs, opset: int = 17) -> Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 9
    onnx.checker.check_model(proto, full_check=True)
    return onnx_format.from_proto(proto, {"onnx.external_data": "0"})


def _proto(model: Model) -> onnx.ModelProto:
    return onnx_format.to_proto(model)


def _run(model: Model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _ops(model: Model) -> list[str]:
    return [n.op_type for n in _proto(model).graph.node]


def _bn(rng, channels: int, prefix: str = "bn", dtype=np.float32) -> list[onnx.TensorProto]:
    values = {
        "scale": 1.0 + 0.3 * rng.standard_normal(channels),
        "bias": 0.2 * rng.standard_normal(channels),
        "mean": 0.3 * rng.standard_normal(channels),
        "var": 0.2 + rng.random(channels),
    }
    return [numpy_helper.from_array(v.astype(dtype), f"{prefix}.{k}") for k, v in values.items()]


def _bn_node(x: str, y: str, prefix: str = "bn") -> onnx.NodeProto:
    names = [f"{prefix}.{k}" for k in ("scale", "bias", "mean", "var")]
    return helper.make_node("BatchNormalization", [x, *names], [y], name=prefix, epsilon=1e-3)


def _check_folded(original: Model, expected: int, feeds: dict[str, np.ndarray], tol: float = 1e-5) -> Model:
    folded, count = fold_batchnorm(original)
    assert count == expected
    onnx.checker.check_model(_proto(folded), full_check=True)
    assert "BatchNormalization" not in _ops(folded)
    want, got = _run(original, feeds), _run(folded, feeds)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.abs(got - want).max() <= tol * max(1.0, float(np.abs(want).max()))
    return folded


def _assert_untouched(model: Model) -> None:
    folded, count = fold_batchnorm(model)
    assert count == 0 and folded is model


# ---- the sample models -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet", "mobilenet"])
def test_sample_models_fold_and_stay_equivalent(samples_dir, digits_test, name):
    model = nnc_tool.read_model(samples_dir / f"{name}.onnx")
    before = {t.name: t.array.copy() for t in model.tensors}
    bn_count = _ops(model).count("BatchNormalization")
    folded = _check_folded(model, bn_count, {"input": digits_test[0]}, tol=1e-5)

    # input model untouched
    assert all(np.array_equal(t.array, before[t.name]) for t in model.tensors)
    # 4 BN tensors gone per BN, at most one bias added per BN
    assert len(folded.tensors) == len(model.tensors) - 4 * bn_count + sum(
        1 for n in _proto(model).graph.node if n.op_type == "Conv" and len(n.input) == 2
    )
    assert len(folded.tensors) < len(model.tensors)
    # weight names kept, every Conv now has a (non-weight) bias
    names = {t.name: t for t in folded.tensors}
    for t in model.tensors:
        if t.role == TensorRole.WEIGHT:
            assert t.name in names and names[t.name].role == TensorRole.WEIGHT
    for node in _proto(folded).graph.node:
        if node.op_type == "Conv":
            assert len(node.input) == 3 and names[node.input[2]].role == TensorRole.NONWEIGHT
    assert folded.metadata == model.metadata


# ---- Conv / ConvTranspose ----------------------------------------------------------------------


def test_conv_without_bias_gets_one():
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((0.3 * rng.standard_normal((6, 3, 3, 3))).astype(np.float32), "conv.weight")]
    inits += _bn(rng, 6)
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        _bn_node("c", "b"),
        helper.make_node("Relu", ["b"], ["y"]),
    ]
    model = _model(nodes, inits, [helper.make_tensor_value_info("x", F32, [2, 3, 5, 5])],
                   [helper.make_tensor_value_info("y", F32, [2, 6, 5, 5])])
    x = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
    folded = _check_folded(model, 1, {"x": x})
    conv = _proto(folded).graph.node[0]
    assert list(conv.input) == ["x", "conv.weight", "conv.bias"] and conv.output[0] == "b"
    assert [(t.name, t.role) for t in folded.tensors] == [
        ("conv.weight", TensorRole.WEIGHT),
        ("conv.bias", TensorRole.NONWEIGHT),
    ]


def test_conv_bn_chain_and_constant_nodes():
    """Existing bias, BN parameters in Constant nodes, and two BNs in a row."""
    rng = np.random.default_rng(1)
    consts = [numpy_helper.from_array((0.3 * rng.standard_normal((4, 2, 3, 3))).astype(np.float32), "w"),
              numpy_helper.from_array((0.1 * rng.standard_normal(4)).astype(np.float32), "b")]
    consts += _bn(rng, 4, "bn1") + _bn(rng, 4, "bn2")
    nodes = [helper.make_node("Constant", [], [t.name], value=t) for t in consts]
    nodes += [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], group=2),
        _bn_node("c", "m", "bn1"),
        _bn_node("m", "y", "bn2"),
    ]
    model = _model(nodes, [], [helper.make_tensor_value_info("x", F32, [1, 4, 6, 6])],
                   [helper.make_tensor_value_info("y", F32, [1, 4, 4, 4])])
    folded = _check_folded(model, 2, {"x": rng.standard_normal((1, 4, 6, 6)).astype(np.float32)})
    assert _ops(folded) == ["Constant", "Constant", "Conv"]
    assert [t.name for t in folded.tensors] == ["w", "b"]


@pytest.mark.parametrize("group", [1, 2, 3])
def test_conv_transpose_groups(group):
    rng = np.random.default_rng(2)
    c_in, c_out_per_group = 6, 2
    c_out = group * c_out_per_group
    inits = [numpy_helper.from_array(
        (0.3 * rng.standard_normal((c_in, c_out_per_group, 3, 3))).astype(np.float32), "deconv.weight")]
    inits += _bn(rng, c_out)
    nodes = [
        helper.make_node("ConvTranspose", ["x", "deconv.weight"], ["c"], group=group, strides=[2, 2]),
        _bn_node("c", "y"),
    ]
    model = _model(nodes, inits, [helper.make_tensor_value_info("x", F32, [2, c_in, 4, 4])],
                   [helper.make_tensor_value_info("y", F32, [2, c_out, 9, 9])])
    folded = _check_folded(model, 1, {"x": rng.standard_normal((2, c_in, 4, 4)).astype(np.float32)})
    assert [t.name for t in folded.tensors] == ["deconv.weight", "deconv.bias"]


# ---- what must not be folded -------------------------------------------------------------------


def _conv_bn_parts(rng):
    inits = [numpy_helper.from_array((0.3 * rng.standard_normal((4, 3, 1, 1))).astype(np.float32), "w")]
    return inits + _bn(rng, 4)


def test_conv_output_with_another_consumer_is_not_folded():
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        _bn_node("c", "b"),
        helper.make_node("Add", ["b", "c"], ["y"]),  # the raw conv output is needed too
    ]
    _assert_untouched(_model(nodes, _conv_bn_parts(rng), [helper.make_tensor_value_info("x", F32, [1, 3, 4, 4])],
                             [helper.make_tensor_value_info("y", F32, [1, 4, 4, 4])]))


def test_conv_output_that_is_a_graph_output_is_not_folded():
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), _bn_node("c", "y")]
    outputs = [helper.make_tensor_value_info(n, F32, [1, 4, 4, 4]) for n in ("y", "c")]
    inputs = [helper.make_tensor_value_info("x", F32, [1, 3, 4, 4])]
    _assert_untouched(_model(nodes, _conv_bn_parts(rng), inputs, outputs))


def test_shared_weight_is_not_folded():
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c1"]),
        _bn_node("c1", "b1"),
        helper.make_node("Conv", ["x", "w"], ["c2"]),
        helper.make_node("Add", ["b1", "c2"], ["y"]),
    ]
    _assert_untouched(_model(nodes, _conv_bn_parts(rng), [helper.make_tensor_value_info("x", F32, [1, 3, 4, 4])],
                             [helper.make_tensor_value_info("y", F32, [1, 4, 4, 4])]))


def test_conv_output_used_in_subgraph_is_not_folded():
    rng = np.random.default_rng(6)
    branch = helper.make_graph([helper.make_node("Identity", ["c"], ["o"])], "branch", [],
                               [helper.make_tensor_value_info("o", F32, [1, 4, 4, 4])])
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        _bn_node("c", "b"),
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["z"], then_branch=branch, else_branch=branch),
        helper.make_node("Add", ["b", "z"], ["y"]),
    ]
    inits = _conv_bn_parts(rng) + [numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    _assert_untouched(_model(nodes, inits, [helper.make_tensor_value_info("x", F32, [1, 3, 4, 4])],
                             [helper.make_tensor_value_info("y", F32, [1, 4, 4, 4])]))


def test_non_onnx_model_is_unchanged():
    model = Model(format="safetensors", topology=b"{}",
                  tensors=[Tensor("bn.weight", np.ones(4, np.float32), TensorRole.NONWEIGHT)])
    folded, count = fold_batchnorm(model)
    assert count == 0 and folded is model


# ---- Gemm / MatMul ----------------------------------------------------------------------------


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape, beta", [(None, 1.0), ((5,), 1.0), ((1, 5), 0.5), ((1,), 2.0)])
def test_gemm(trans_b, c_shape, beta):
    rng = np.random.default_rng(7)
    w_shape = (5, 8) if trans_b else (8, 5)
    inits = [numpy_helper.from_array((0.3 * rng.standard_normal(w_shape)).astype(np.float32), "fc.weight")]
    inputs = ["x", "fc.weight"]
    if c_shape is not None:
        inits.append(numpy_helper.from_array((0.2 * rng.standard_normal(c_shape)).astype(np.float32), "fc.bias"))
        inputs.append("fc.bias")
    inits += _bn(rng, 5)
    nodes = [
        helper.make_node("Gemm", inputs, ["g"], transB=trans_b, alpha=1.5, beta=beta),
        _bn_node("g", "y"),
    ]
    model = _model(nodes, inits, [helper.make_tensor_value_info("x", F32, [3, 8])],
                   [helper.make_tensor_value_info("y", F32, [3, 5])])
    folded = _check_folded(model, 1, {"x": rng.standard_normal((3, 8)).astype(np.float32)})
    assert [t.name for t in folded.tensors] == ["fc.weight", "fc.bias"]
    assert folded.tensors[0].array.shape == w_shape


def test_gemm_with_per_row_bias_is_not_folded():
    rng = np.random.default_rng(8)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 5)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((3, 5)).astype(np.float32), "c")] + _bn(rng, 5)
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["g"]), _bn_node("g", "y")]
    _assert_untouched(_model(nodes, inits, [helper.make_tensor_value_info("x", F32, [3, 8])],
                             [helper.make_tensor_value_info("y", F32, [3, 5])]))


def test_matmul_gets_an_add():
    rng = np.random.default_rng(9)
    inits = [numpy_helper.from_array((0.3 * rng.standard_normal((8, 5))).astype(np.float32), "lin.weight")]
    inits += _bn(rng, 5)
    nodes = [helper.make_node("MatMul", ["x", "lin.weight"], ["m"], name="lin"), _bn_node("m", "y")]
    model = _model(nodes, inits, [helper.make_tensor_value_info("x", F32, ["n", 8])],
                   [helper.make_tensor_value_info("y", F32, ["n", 5])])
    folded = _check_folded(model, 1, {"x": rng.standard_normal((4, 8)).astype(np.float32)})
    assert _ops(folded) == ["MatMul", "Add"]
    assert [(t.name, t.role) for t in folded.tensors] == [
        ("lin.weight", TensorRole.WEIGHT), ("lin.bias", TensorRole.NONWEIGHT)]


def test_matmul_on_3d_input_is_not_folded():
    """BN's channel axis 1 is then the sequence axis, not the MatMul's feature axis."""
    rng = np.random.default_rng(10)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 5)).astype(np.float32), "w")] + _bn(rng, 5)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), _bn_node("m", "y")]
    _assert_untouched(_model(nodes, inits, [helper.make_tensor_value_info("x", F32, [2, 5, 8])],
                             [helper.make_tensor_value_info("y", F32, [2, 5, 5])]))


# ---- dtypes ------------------------------------------------------------------------------------


def test_fp16_model():
    rng = np.random.default_rng(11)
    w = (0.3 * rng.standard_normal((6, 3, 3, 3))).astype(np.float16)
    bn = _bn(rng, 6, dtype=np.float16)
    inits = [numpy_helper.from_array(w, "conv.weight")] + bn
    nodes = [helper.make_node("Conv", ["x", "conv.weight"], ["c"], pads=[1, 1, 1, 1]), _bn_node("c", "y")]
    model = _model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 3, 6, 6])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 6, 6, 6])])
    x = rng.standard_normal((1, 3, 6, 6)).astype(np.float16)
    folded = _check_folded(model, 1, {"x": x}, tol=4e-3)  # a few fp16 ulps
    arrays = {t.name: t.array for t in folded.tensors}
    assert arrays["conv.weight"].dtype == np.float16 and arrays["conv.bias"].dtype == np.float16
    gamma, beta, mean, var = (numpy_helper.to_array(t).astype(np.float64) for t in bn)
    s = gamma / np.sqrt(var + float(np.float32(1e-3)))
    want_w = (w.astype(np.float64) * s[:, None, None, None]).astype(np.float16)
    np.testing.assert_array_equal(arrays["conv.weight"], want_w)
    np.testing.assert_array_equal(arrays["conv.bias"], (beta - mean * s).astype(np.float16))


def _tiny_scale_bn_model() -> Model:
    """conv1 -> BN whose scale s ~ 1e-4 (a variance of ~1e8, as real exports have) -> conv2 -> out.

    conv2's weights are trained for the BN's output range, so the network is well conditioned
    unfolded; folded, conv1's weights shrink 10^4-fold below every other weight.
    """
    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((16, 3, 3, 3)).astype(np.float32) * 0.3
    w2 = rng.standard_normal((8, 16, 3, 3)).astype(np.float32) * 0.1
    bn = {
        "bn.scale": 1.0 + 0.2 * rng.standard_normal(16),
        "bn.bias": 0.1 * rng.standard_normal(16),
        "bn.mean": 0.1 * rng.standard_normal(16),
        "bn.var": (1e4 * (1.0 + rng.random(16))) ** 2,
    }
    inits = [numpy_helper.from_array(w1, "conv1.weight"), numpy_helper.from_array(w2, "conv2.weight")]
    inits += [numpy_helper.from_array(v.astype(np.float32), k) for k, v in bn.items()]
    nodes = [
        helper.make_node("Conv", ["x", "conv1.weight"], ["c1"], pads=[1, 1, 1, 1]),
        _bn_node("c1", "b1"),
        helper.make_node("Relu", ["b1"], ["r1"]),
        helper.make_node("Conv", ["r1", "conv2.weight"], ["y"], pads=[1, 1, 1, 1]),
    ]
    x = helper.make_tensor_value_info("x", F32, [None, 3, 16, 16])
    y = helper.make_tensor_value_info("y", F32, [None, 8, 16, 16])
    # Inputs of the scale BN's variance expects: activations of ~1e4.
    return _model(nodes, inits, [x], [y])


@pytest.mark.parametrize("allocate", [True, False])
def test_folding_a_tiny_scale_batchnorm_never_costs_fidelity(allocate: bool) -> None:
    """Folded weights get the step their unfolded weights would have had: folding s ~ 1e-4 into
    conv1 must not round conv1 to zero (one absolute step for all weights did: 0 dB)."""
    model = _tiny_scale_bn_model()
    x = (1e4 * np.random.default_rng(4).standard_normal((4, 3, 16, 16))).astype(np.float32)
    reference = _run(model, {"x": x})
    options = nnc_tool.EncodeOptions(qp=-32, allocate=allocate)

    def snr(fold: bool) -> float:
        prepared = nnc_tool.api.prepare_model(model, options, None, fold_batchnorm=fold)
        assert prepared.folded == int(fold)
        data, _ = nnc_tool.api.compress_model(prepared.model, options, plan_cache=prepared.plan_cache, moments=prepared.moments)
        rebuilt = _run(nnc_tool.decompress_model(data), {"x": x})
        return 10 * np.log10((reference**2).sum() / ((reference - rebuilt) ** 2).sum())

    folded, unfolded = snr(True), snr(False)
    assert unfolded > 30
    assert folded > unfolded - 1.0


def test_fold_reports_the_scale_of_every_rewritten_weight() -> None:
    from nnc_tool.quantize.fold import fold_batchnorms

    model = _tiny_scale_bn_model()
    result = fold_batchnorms(model)
    assert result.count == 1 and set(result.scales) == {"conv1.weight"}
    bn = {t.name: t.array.astype(np.float64) for t in model.tensors if t.name.startswith("bn.")}
    expected = np.abs(bn["bn.scale"] / np.sqrt(bn["bn.var"] + np.float32(1e-3)))
    np.testing.assert_allclose(result.scales["conv1.weight"], expected, rtol=1e-12)


def test_rows_folding_scaled_differently_keep_their_unfolded_steps() -> None:
    """Channel scales spanning 10^4 (real exports have them): each folded row gets the step its
    unfolded row had (per-row QPs 4 log2(s_r / median s) around the tensor's), so no row is
    rounded coarser, relative to its values, than it would have been unfolded."""
    from nnc_tool.quantize.plan import plan_quantization

    rng = np.random.default_rng(7)
    w1 = rng.standard_normal((16, 3, 3, 3)).astype(np.float32) * 0.3
    w2 = rng.standard_normal((8, 16, 3, 3)).astype(np.float32) * 0.1
    spread = np.logspace(-2, 2, 16)  # BN scale s from 0.01 to 100 across channels
    bn = {"bn.scale": spread, "bn.bias": 0.1 * rng.standard_normal(16), "bn.mean": np.zeros(16), "bn.var": np.ones(16)}
    inits = [numpy_helper.from_array(w1, "conv1.weight"), numpy_helper.from_array(w2, "conv2.weight")]
    inits += [numpy_helper.from_array(v.astype(np.float32), k) for k, v in bn.items()]
    nodes = [
        helper.make_node("Conv", ["x", "conv1.weight"], ["c1"], pads=[1, 1, 1, 1]),
        _bn_node("c1", "b1"),
        helper.make_node("Conv", ["b1", "conv2.weight"], ["y"], pads=[1, 1, 1, 1]),
    ]
    x = helper.make_tensor_value_info("x", F32, [None, 3, 16, 16])
    y = helper.make_tensor_value_info("y", F32, [None, 8, 16, 16])
    model = _model(nodes, inits, [x], [y])
    feeds = {"x": np.random.default_rng(8).standard_normal((4, 3, 16, 16)).astype(np.float32)}
    reference = _run(model, feeds)
    options = nnc_tool.EncodeOptions(qp=-30, allocate=False, error_feedback=False, bias_correction=False, kernel_correlation=0.0)

    def encode(fold: bool) -> tuple[float, object]:
        prepared = nnc_tool.api.prepare_model(model, options, None, fold_batchnorm=fold)
        plan = plan_quantization(prepared.model, options, cache=prepared.plan_cache, moments=prepared.moments)
        data, _ = nnc_tool.api.compress_model(prepared.model, options, plan_cache=prepared.plan_cache, moments=prepared.moments)
        rebuilt = _run(nnc_tool.decompress_model(data), feeds)
        return 10 * np.log10((reference**2).sum() / ((reference - rebuilt) ** 2).sum()), plan

    folded, plan = encode(True)
    unfolded, _ = encode(False)
    assert folded > unfolded - 1.0 and folded > 30
    scales = spread / np.sqrt(1.0 + np.float32(1e-3))
    expected = np.rint(4 * np.log2(scales / np.median(scales))).astype(int)
    assert plan.settings["conv1.weight"].row_qp_offsets == tuple(expected)
