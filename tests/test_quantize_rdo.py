"""Rate-aware rounding (RDOQ), per-tensor QP allocation and GPTQ error feedback (quantize/)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest

from nnc_tool import Model, Tensor, TensorRole, read_model
from nnc_tool.coding.integers import encode_integers
from nnc_tool.coding.tensors import decode_tensor, encode_tensor
from nnc_tool.formats.onnx_format import to_proto
from nnc_tool.quantize import hessians, sensitivity
from nnc_tool.quantize.allocation import MAX_QP_OFFSET, allocate_qps
from nnc_tool.quantize.plan import plan_quantization
from nnc_tool.quantize.sensitivity import measure_sensitivities
from nnc_tool.quantize.rdo import (
    DEFAULT_LAMBDA, block_layout, diagonal_blocks, estimated_bits, gptq_factor, gptq_gain, gptq_round,
    kernel_feedback_reach, kernel_feedback_round, rdo_round,
)
from nnc_tool.quantize.uniform import NONWEIGHT_QP_OFFSET, QuantSettings, effective_nonweight_qp, quantize, step_for_qp

RNG = np.random.default_rng(20240601)


def entropy_bits(levels: np.ndarray) -> float:
    _, counts = np.unique(levels, return_counts=True)
    return float(-(counts * np.log2(counts / counts.sum())).sum())


# --------------------------------------------------------------------------------------------
# RDOQ


@pytest.mark.parametrize("seed", range(12))
def test_rdoq_moves_at_most_one_step_and_never_raises_entropy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(17, 30_000))
    source = (rng.laplace, rng.normal, lambda size: rng.uniform(-1, 1, size))[seed % 3]
    scaled = source(size=n) * 10 ** rng.uniform(-1.5, 2.5)  # values / step, from ~0.03 to ~300 steps
    lam = float(rng.choice([0.05, DEFAULT_LAMBDA, 0.3, 1.0, 4.0]))
    plain = np.rint(scaled).astype(np.int64)
    levels = rdo_round(scaled, lam)
    assert levels.dtype == np.int64 and levels.shape == scaled.shape
    assert np.abs(levels - plain).max() <= 1
    assert entropy_bits(levels) <= entropy_bits(plain) + 1e-9
    # The quantity RDOQ minimises, D + lambda * R (R: the coder model's estimated size), never rises.
    cost = lambda q: float(np.square(scaled - q).sum()) + lam * estimated_bits(q)  # noqa: E731
    assert cost(levels) <= cost(plain) + 1e-9


def test_rdoq_beats_plain_rounding_at_equal_bytes_on_a_laplacian() -> None:
    """At ~2.4 bits/value, RDOQ's point lies above plain rounding's RD curve (real coded bytes)."""
    x = RNG.laplace(size=60_000)

    def point(scale: float, lam: float) -> tuple[float, float]:
        u = x * scale
        levels = rdo_round(u, lam) if lam else np.rint(u).astype(np.int64)
        bits = 8.0 * len(encode_integers(levels))
        snr = 10 * np.log10(float(np.square(u).sum()) / float(np.square(u - levels).sum()))
        return bits, snr

    bits_rdo, snr_rdo = point(1.0, DEFAULT_LAMBDA)
    # Plain rounding on a fine grid of steps around it; interpolate its SNR at RDOQ's size.
    curve = sorted(point(2.0 ** (k / 16), 0.0) for k in range(-8, 3))
    sizes, snrs = np.array([c[0] for c in curve]), np.array([c[1] for c in curve])
    assert sizes[0] < bits_rdo < sizes[-1]
    snr_plain = float(np.interp(bits_rdo, sizes, snrs))
    assert snr_rdo > snr_plain + 0.1, (snr_rdo, snr_plain)


def test_rdo_setting_through_quantize() -> None:
    values = (RNG.laplace(size=(64, 200)) * 0.05).astype(np.float32)
    plain = quantize(values, TensorRole.WEIGHT, QuantSettings(qp=-24, rdo=0.0))
    rdo = quantize(values, TensorRole.WEIGHT, QuantSettings(qp=-24, rdo=True))
    assert QuantSettings(rdo=True).rdo == DEFAULT_LAMBDA and QuantSettings(rdo=False).rdo == 0.0
    assert np.abs(rdo.levels - plain.levels).max() == 1
    np.testing.assert_array_equal(rdo.steps, plain.steps)
    assert len(encode_integers(rdo.levels)) < len(encode_integers(plain.levels))
    # Small and non-weight tensors are always rounded to nearest.
    bias = values[0, :50]
    np.testing.assert_array_equal(
        quantize(bias, TensorRole.NONWEIGHT, QuantSettings(rdo=1.0)).levels,
        quantize(bias, TensorRole.NONWEIGHT, QuantSettings(rdo=0.0)).levels,
    )
    with pytest.raises(ValueError):
        QuantSettings(rdo=-1.0)


def test_nonweight_qp_is_tied_to_qp_unless_given() -> None:
    assert effective_nonweight_qp(QuantSettings(qp=-30)) == -30 - NONWEIGHT_QP_OFFSET
    assert effective_nonweight_qp(QuantSettings(qp=-30, nonweight_qp=-75)) == -75
    bias = RNG.normal(size=40).astype(np.float32)
    q = quantize(bias, TensorRole.NONWEIGHT, QuantSettings(qp=-30))
    assert q.qps.tolist() == [-30 - NONWEIGHT_QP_OFFSET]


# --------------------------------------------------------------------------------------------
# GPTQ


def test_gptq_with_uncorrelated_inputs_is_plain_rounding() -> None:
    w = RNG.normal(size=(6, 30))
    h = np.diag(RNG.uniform(0.5, 2.0, 30))
    np.testing.assert_array_equal(gptq_round(w, h, 0.07, damping=0.0), np.rint(w / 0.07).astype(np.int64))
    assert gptq_gain(h, damping=0.0) == pytest.approx(1.0)


def test_gptq_lowers_the_layer_output_error() -> None:
    # Correlated inputs (like neighbouring pixels): error feedback pays off.
    x = RNG.normal(size=(4000, 24)) @ (np.eye(24) + 0.9 * RNG.normal(size=(24, 24)) / 5)
    x[:, 5] = 0.0  # a dead input: its weights are rounded to nearest (or zeroed on request)
    h = x.T @ x
    w = RNG.normal(size=(16, 24))
    step = 0.2
    levels = gptq_round(w, h, step)
    plain = np.rint(w / step)
    np.testing.assert_array_equal(levels[:, 5], plain[:, 5])
    assert (gptq_round(w, h, step, zero_dead=True)[:, 5] == 0).all()
    err_gptq = np.square(x @ (w - levels * step).T).sum()
    err_plain = np.square(x @ (w - plain * step).T).sum()
    assert err_gptq < 0.7 * err_plain
    assert gptq_gain(h) < 0.9


def _smooth_patches(count: int, kernel: int, rho: float) -> np.ndarray:
    """count x (kernel*kernel) patches of a stationary field with correlation rho^(L1 distance)."""
    taps = np.stack([a.ravel() for a in np.meshgrid(np.arange(kernel), np.arange(kernel), indexing="ij")], axis=1)
    cov = rho ** np.abs(taps[:, None] - taps[None]).sum(axis=2)
    return RNG.normal(size=(count, kernel * kernel)) @ np.linalg.cholesky(cov).T


def test_kernel_feedback_is_gptq_with_the_tap_correlation_prior() -> None:
    scaled = RNG.normal(0, 6, (200, 9))
    taps = np.stack([a.ravel() for a in np.meshgrid(np.arange(3), np.arange(3), indexing="ij")], axis=1)
    prior = 0.3 ** np.abs(taps[:, None] - taps[None]).sum(axis=2)
    np.testing.assert_array_equal(kernel_feedback_round(scaled, (3, 3), 0.3), gptq_round(scaled, prior, 1.0, damping=0.0))
    np.testing.assert_array_equal(kernel_feedback_round(scaled, (3, 3), 0.0), np.rint(scaled))
    np.testing.assert_array_equal(kernel_feedback_round(scaled[:, :1], (1,), 0.3), np.rint(scaled[:, :1]))
    with pytest.raises(ValueError, match="taps"):
        kernel_feedback_round(scaled, (2, 2), 0.3)
    # Pruned (exactly zero) taps keep level 0: sparsity and N:M patterns survive.
    sparse = scaled * (RNG.random(scaled.shape) < 0.5)
    levels = kernel_feedback_round(sparse, (3, 3), 0.3)
    assert (levels[sparse == 0] == 0).all()
    assert not np.array_equal(levels, np.rint(sparse))


def test_kernel_feedback_lowers_the_output_error_on_smooth_inputs_for_about_the_same_bits() -> None:
    weights = RNG.normal(0, 1, (4000, 9))
    plain = np.rint(weights / 0.5)
    shaped = kernel_feedback_round(weights / 0.5, (3, 3), 0.3)
    assert np.abs(shaped * 0.5 - weights).max() <= (0.5 + kernel_feedback_reach((3, 3), 0.3)) * 0.5 + 1e-12
    for rho, most in ((0.3, 0.9), (0.7, 0.75)):
        x = _smooth_patches(3000, 3, rho)
        err_plain = np.square((weights - plain * 0.5) @ x.T).mean()
        err_shaped = np.square((weights - shaped * 0.5) @ x.T).mean()
        assert err_shaped < most * err_plain
    # Uncorrelated inputs lose a little to the mild prior (12 %, about 0.5 dB), never much.
    x = RNG.normal(size=(3000, 9))
    assert np.square((weights - shaped * 0.5) @ x.T).mean() < 1.15 * np.square((weights - plain * 0.5) @ x.T).mean()
    assert entropy_bits(shaped) < 1.02 * entropy_bits(plain)


def test_quantize_applies_kernel_feedback_to_conv_kernels_only() -> None:
    kernel = RNG.normal(0, 0.1, (8, 4, 3, 3)).astype(np.float32)
    settings = QuantSettings(qp=-30)
    step = float(step_for_qp(-30))
    q = quantize(kernel, TensorRole.WEIGHT, settings)
    expected = kernel_feedback_round((kernel / np.float32(step)).reshape(-1, 9), (3, 3), settings.kernel_correlation)
    np.testing.assert_array_equal(q.levels.reshape(-1, 9), expected)
    assert not np.array_equal(q.levels, quantize(kernel, TensorRole.WEIGHT, replace(settings, kernel_correlation=0.0)).levels)
    # Per-channel steps: every kernel uses its output channel's step.
    per_channel = quantize(kernel * np.array([1, 10, 1, 1, 1, 1, 1, 0.1], np.float32)[:, None, None, None],
                           TensorRole.WEIGHT, replace(settings, per_channel=True))
    assert len(set(per_channel.qps.tolist())) > 1
    scaled = (kernel * np.array([1, 10, 1, 1, 1, 1, 1, 0.1], np.float32)[:, None, None, None]) / per_channel.steps[:, None, None, None]
    np.testing.assert_array_equal(per_channel.levels.reshape(-1, 9), kernel_feedback_round(scaled.reshape(-1, 9), (3, 3), 0.3))
    # 1x1 kernels, matrices, biases, dependent quantization and rdo round as before.
    for values, role, own in (
        (kernel[:, :, :1, :1].copy(), TensorRole.WEIGHT, settings),
        (kernel.reshape(8, 36), TensorRole.WEIGHT, settings),
        (kernel.reshape(-1), TensorRole.NONWEIGHT, settings),
        (kernel, TensorRole.WEIGHT, replace(settings, rdo=DEFAULT_LAMBDA)),
        (kernel, TensorRole.WEIGHT, replace(settings, dependent=True)),
    ):
        np.testing.assert_array_equal(
            quantize(values, role, own).levels, quantize(values, role, replace(own, kernel_correlation=0.0)).levels
        )
    # The decoder rebuilds level * step exactly.
    tensor = Tensor("conv.weight", kernel, TensorRole.WEIGHT)
    np.testing.assert_array_equal(decode_tensor(encode_tensor(tensor, settings)).array, np.multiply(q.levels, np.float32(step), dtype=np.float32))
    with pytest.raises(ValueError, match="kernel_correlation"):
        QuantSettings(kernel_correlation=0.99)


def test_gptq_keeps_pruned_weights_at_zero() -> None:
    x = RNG.normal(size=(2000, 24)) @ (np.eye(24) + 0.9 * RNG.normal(size=(24, 24)) / 5)
    h = x.T @ x
    w = RNG.normal(size=(16, 24))
    w[:, ::2] = 0.0  # 1:2 pruned
    levels = gptq_round(w, h, 0.2)
    assert (levels[:, ::2] == 0).all()
    assert np.square(x @ (w - levels * 0.2).T).sum() < np.square(x @ (w - np.rint(w / 0.2) * 0.2).T).sum()


@pytest.mark.parametrize("cols,block", [(1030, 512), (700, 256), (96, 512)])
def test_block_layout_covers_the_columns_with_little_padding(cols: int, block: int) -> None:
    count, width = block_layout(cols, block)
    assert width <= block and count * width >= cols and count * width - cols < count


def test_blocked_gptq_is_gptq_on_each_block_alone() -> None:
    # 70 columns in blocks of at most 32: 3 blocks of 24, the last holding 22 real columns.
    # Neighbouring inputs correlate (a moving average, like neighbouring pixels).
    noise = RNG.normal(size=(3000, 74))
    x = sum(noise[:, k : k + 70] for k in range(5))
    x[:, 9] = 0.0
    h = x.T @ x
    w = RNG.normal(size=(12, 70))
    steps = RNG.uniform(0.1, 0.3, 12)
    blocks = diagonal_blocks(h, block=32)
    assert blocks.shape == (3, 24, 24)
    np.testing.assert_array_equal(blocks[2, 22:], 0.0)  # padding
    levels = gptq_round(w, blocks, steps)
    # Damping follows the whole layer's mean diagonal, so each block alone is damped to match.
    mean = np.trace(h) / 70
    for k in range(3):
        cols = slice(24 * k, min(24 * (k + 1), 70))
        own = h[cols, cols]
        damping = 0.01 * mean / (np.trace(own) / own.shape[0])
        np.testing.assert_array_equal(levels[:, cols], gptq_round(w[:, cols], own, steps, damping=damping))
    # Feedback within blocks still beats plain rounding on the layer output.
    plain = np.rint(w / steps[:, None])
    err = lambda q: np.square(x @ (w - q * steps[:, None]).T).sum()
    assert err(levels) < 0.7 * err(plain)
    assert gptq_gain(h) <= gptq_gain(blocks) < 0.8
    with pytest.raises(ValueError, match="70 columns"):
        gptq_round(w[:, :60], None, steps, factor=gptq_factor(blocks, cols=70))


def test_layer_hessian_blocks_are_the_diagonal_blocks_of_the_gram_matrix() -> None:
    x = RNG.normal(size=(5000, 1100)).astype(np.float32)
    blocks = hessians._gram(x, chunk=1024)
    expected = diagonal_blocks(x.T.astype(np.float64) @ x.astype(np.float64))
    assert blocks.shape == expected.shape == (3, 367, 367)
    np.testing.assert_allclose(blocks, expected, rtol=1e-4, atol=1e-2)


def test_sensitivity_runs_use_fewer_inputs_for_large_models() -> None:
    def model_of(parameters: int) -> Model:
        return Model("onnx", b"", [Tensor("w", np.zeros((parameters // 100, 100), np.float32), TensorRole.WEIGHT)], {})

    assert sensitivity.sensitivity_samples(model_of(50_000)) == sensitivity.SENSITIVITY_SAMPLES
    assert sensitivity.sensitivity_samples(model_of(4 << 20)) == 8
    assert sensitivity.sensitivity_samples(model_of(100_000_000)) == sensitivity.MIN_SENSITIVITY_SAMPLES


# --------------------------------------------------------------------------------------------
# Allocation and the calibrated plan on the sample ResNet


def _run(model: Model, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0]


def _code(model: Model, settings: QuantSettings, per_tensor: dict[str, QuantSettings]) -> tuple[int, Model]:
    payloads = [encode_tensor(t, per_tensor.get(t.name, settings)) for t in model.tensors]
    rebuilt = replace(model, tensors=[decode_tensor(p) for p in payloads])
    return sum(len(p) for p in payloads), rebuilt


def _snr(reference: np.ndarray, output: np.ndarray) -> float:
    return float(10 * np.log10(np.square(reference).sum() / np.square(reference - output).sum()))


@pytest.fixture(scope="module")
def resnet(samples_dir):
    model = read_model(samples_dir / "resnet.onnx")
    with np.load(samples_dir / "digits_calib.npz") as data:
        calibration = data["x"][:64]
    with np.load(samples_dir / "digits_test.npz") as data:
        test = data["x"]
    return model, calibration, test, _run(model, test)


def test_allocation_gives_integer_qps_deterministically(resnet) -> None:
    model, calibration, _, _ = resnet
    settings = QuantSettings(qp=-30)
    weights = {t.name for t in model.tensors if t.role == TensorRole.WEIGHT}
    nonweights = {t.name for t in model.tensors if t.role == TensorRole.NONWEIGHT}
    for calib in (None, calibration):
        qps = allocate_qps(model, settings, calib, _run)
        assert set(qps) == weights | nonweights
        assert all(isinstance(q, int) for q in qps.values())
        assert all(abs(qps[n] - settings.qp) <= MAX_QP_OFFSET for n in weights)
        assert allocate_qps(model, settings, calib, _run) == qps
        # The size-weighted mean weight QP stays at settings.qp (up to rounding to the QP grid).
        sizes = {t.name: t.array.size for t in model.tensors}
        mean = sum(qps[n] * sizes[n] for n in weights) / sum(sizes[n] for n in weights)
        assert abs(mean - settings.qp) <= 1.0
    # Data-free: non-weights sit at the tied QP; an explicit nonweight_qp always wins.
    assert {allocate_qps(model, settings)[n] for n in nonweights} == {effective_nonweight_qp(settings)}
    fixed = allocate_qps(model, replace(settings, nonweight_qp=-60), calibration, _run)
    assert {fixed[n] for n in nonweights} == {-60}


def test_sensitivities_are_positive_and_finite(resnet) -> None:
    model, calibration, _, _ = resnet
    s = measure_sensitivities(model, calibration[:32], _run)
    assert set(s) == {t.name for t in model.tensors if t.role != TensorRole.EXACT}
    assert all(np.isfinite(v) and v > 0 for v in s.values())
    # The stem's 144 weights matter more per weight than layer3's 20 736.
    sizes = {t.name: t.array.size for t in model.tensors}
    assert s["stem.0.weight"] / sizes["stem.0.weight"] > 10 * s["layer3.conv2.weight"] / sizes["layer3.conv2.weight"]


def test_calibrated_allocation_beats_uniform_qp_at_equal_size(resnet) -> None:
    model, calibration, test, reference = resnet
    uniform = {}
    for qp in range(-38, -21):
        size, rebuilt = _code(model, QuantSettings(qp=qp), {})
        uniform[qp] = (size, _snr(reference, _run(rebuilt, test)))

    for error_feedback in (False, True):
        settings = QuantSettings(qp=-30)
        plan = plan_quantization(model, settings, calibration, _run, error_feedback=error_feedback)
        assert bool(plan.compensated) == error_feedback
        size, rebuilt = _code(plan.model, settings, plan.settings)
        snr = _snr(reference, _run(rebuilt, test))
        # The uniform point of about the same size (within 2 %), else the next larger one.
        qp_u, (size_u, snr_u) = min(
            ((q, v) for q, v in uniform.items() if v[0] >= 0.98 * size), key=lambda item: item[1][0]
        )
        assert size_u >= 0.98 * size
        margin = 6.0 if error_feedback else 2.0  # measured at -34 / -30 / -26: +3.3-4.8 dB, +10.7-11.8 dB
        assert snr > snr_u + margin, (error_feedback, size, snr, qp_u, size_u, snr_u)


def test_compensated_weights_are_coded_exactly(resnet) -> None:
    model, calibration, _, _ = resnet
    settings = QuantSettings(qp=-26)
    plan = plan_quantization(model, settings, calibration, _run)
    assert "layer3.conv2.weight" in plan.compensated and "fc.weight" in plan.compensated
    planned = plan.model.tensor_map()
    for name in plan.compensated:
        own = plan.settings[name]
        assert own.rdo == 0.0
        decoded = decode_tensor(encode_tensor(planned[name], own))
        np.testing.assert_array_equal(decoded.array, planned[name].array)
        step = float(step_for_qp(own.qp))
        levels = planned[name].array.astype(np.float64) / step
        assert np.abs(levels - np.rint(levels)).max() < 1e-3


def test_calibration_without_a_runner_falls_back_to_data_free(resnet) -> None:
    model, calibration, _, _ = resnet
    settings = QuantSettings(qp=-30)
    other = replace(model, format="safetensors")  # no graph we can run without a callback
    plan = plan_quantization(other, settings, calibration)
    assert plan.notes and not plan.compensated
    assert plan.qps == allocate_qps(other, settings)


def test_sensitivity_runs_alongside_the_hessians_change_nothing(resnet) -> None:
    # Without run_model, the sensitivity runs overlap the Hessians in a thread; the plan must
    # be the one that measures them first and computes the Hessians afterwards.
    model, calibration, _, _ = resnet
    settings = QuantSettings(qp=-30)
    overlapped = plan_quantization(model, settings, calibration)
    sequential = plan_quantization(model, settings, calibration, cache={"sensitivities": measure_sensitivities(model, calibration)})
    assert overlapped.compensated and overlapped.qps == sequential.qps
    for a, b in zip(overlapped.model.tensors, sequential.model.tensors):
        np.testing.assert_array_equal(a.array, b.array)


def test_error_feedback_on_a_wide_matmul_weight(tmp_path) -> None:
    # A MatMul weight is stored [cols, rows]; 1100 input columns make three feedback blocks, the
    # last one padded. Neighbouring inputs correlate, so feedback must beat plain rounding.
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    cols, rows = 1100, 16
    rng = np.random.default_rng(5)
    weight = rng.normal(scale=0.05, size=(cols, rows)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, cols])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, rows])],
        [numpy_helper.from_array(weight, "w")],
    )
    path = tmp_path / "wide.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    model = read_model(path)
    noise = rng.normal(size=(600, cols + 8))
    x = sum(noise[:, k : k + cols] for k in range(9)).astype(np.float32)
    calibration, test = x[:400], x[400:]

    settings = QuantSettings(qp=-24)
    plan = plan_quantization(model, settings, calibration, allocate=False)
    assert plan.compensated == ["w"]
    compensated = plan.model.tensor_map()["w"].array
    rounded = quantize(weight, TensorRole.WEIGHT, settings)
    step = float(rounded.steps[0])
    plain = rounded.levels * step
    np.testing.assert_array_equal(compensated / step, np.rint(compensated / step))  # on the grid
    reference = test @ weight
    err = lambda w: float(np.square(test @ w - reference).mean())
    assert err(compensated) < 0.5 * err(plain)
