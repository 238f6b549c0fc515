"""Dependent (trellis-coded) quantization: the decoder's state machine, the encoder's search, the
bitstream flag, and the encoder pipeline around it (quantize/trellis.py, `--dq`)."""
from __future__ import annotations

import itertools
import json
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

from nnc_tool import api, read_model
from nnc_tool.bitstream.primitives import ByteReader
from nnc_tool.cli import main
from nnc_tool.coding.tensors import decode_tensor, encode_tensor, read_header
from nnc_tool.errors import BitstreamError
from nnc_tool.graph.activation_stats import channel_moments
from nnc_tool.model import Tensor, TensorRole
from nnc_tool.quantize.plan import plan_quantization
from nnc_tool.quantize.fold import fold_batchnorm
from nnc_tool.quantize.trellis import chain_length, grid_values, trellis_levels
from nnc_tool.quantize.uniform import QuantSettings, dequantize, quantize, step_for_qp

# VVC's transition table: state -> (next state after an even level, after an odd one).
TRANSITIONS = {0: (0, 2), 1: (2, 0), 2: (1, 3), 3: (3, 1)}


def _reference_grid(levels: np.ndarray, chain: int) -> np.ndarray:
    """Grid points the way a sequential decoder walks the state machine."""
    out = []
    for start in range(0, levels.size, chain):
        state = 0
        for k in levels[start : start + chain].tolist():
            out.append(2 * k if state < 2 else 2 * k - int(np.sign(k)))
            state = TRANSITIONS[state][k & 1]
    return np.array(out, dtype=np.int64)


@pytest.mark.parametrize("chain", [1, 2, 3, 8, 64])
def test_grid_values_follow_the_state_machine(chain: int) -> None:
    levels = np.random.default_rng(chain).integers(-40, 41, size=1000)  # 1000: a partial last chain
    np.testing.assert_array_equal(grid_values(levels, chain), _reference_grid(levels, chain))
    np.testing.assert_array_equal(grid_values(levels.astype(np.int32), chain), _reference_grid(levels, chain))


def test_search_finds_the_best_level_sequence() -> None:
    rng = np.random.default_rng(0)
    for _ in range(25):
        x = rng.normal(0.0, 3.0, size=5).astype(np.float32)
        levels = trellis_levels(x[None], 8, np.ones(1, dtype=np.float32))[0]
        error = float(np.sum((grid_values(levels, 8) - x) ** 2))
        best = min(
            float(np.sum((_reference_grid(np.array(c), 8) - x) ** 2)) for c in itertools.product(range(-4, 5), repeat=5)
        )
        assert error <= best + 1e-4


def test_dependent_quantization_beats_rounding_at_equal_entropy() -> None:
    # Laplacian weights: the trellis puts the two quantizers' points closer to the values than one
    # quantizer of the same step can, for about the same level entropy.
    x = np.random.default_rng(1).laplace(0.0, 1.0, size=(256, 1024)).astype(np.float32)
    settings = QuantSettings(qp=-6)  # step ~0.35: about 3.5 bits per value
    plain, dependent = quantize(x, TensorRole.WEIGHT, settings), quantize(x, TensorRole.WEIGHT, replace(settings, dependent=True))
    assert plain.chain == 0 and dependent.chain == chain_length(x.size) == 128

    def snr(q) -> float:
        error = dequantize(q.levels, q.steps, q.chain) - x
        return 10 * np.log10(np.mean(x**2) / np.mean(error**2))

    def entropy(levels: np.ndarray) -> float:
        _, counts = np.unique(levels, return_counts=True)
        p = counts / counts.sum()
        return float(-(p * np.log2(p)).sum())

    gain_db = snr(dependent) - snr(plain)
    extra_bits = entropy(dependent.levels) - entropy(plain.levels)
    # 6.02 dB per bit: the SNR gained beyond what the extra entropy would buy a scalar quantizer.
    assert gain_db - 6.02 * extra_bits > 0.6


@pytest.mark.parametrize("per_channel", [False, True])
def test_tensor_round_trip_reconstructs_the_chosen_levels(per_channel: bool) -> None:
    rng = np.random.default_rng(2)
    array = (rng.normal(size=(24, 16, 3, 3)) * np.linspace(0.1, 2.0, 24)[:, None, None, None]).astype(np.float32)
    array[[3, 17]] = 0.0  # pruned rows: skipped by the row mask, zeros in the chains
    settings = QuantSettings(qp=-24, per_channel=per_channel, dependent=True)
    quantized = quantize(array, TensorRole.WEIGHT, settings)
    assert quantized.chain > 0
    payload = encode_tensor(Tensor("w", array, TensorRole.WEIGHT), settings)
    header = read_header(ByteReader(payload, "unit"))
    assert header.chain == quantized.chain and header.zero_rows == 2
    decoded = decode_tensor(payload).array
    np.testing.assert_array_equal(decoded, dequantize(quantized.levels, quantized.steps, quantized.chain))
    assert not decoded[[3, 17]].any()
    # Reconstruction points are multiples of half the step.
    if not per_channel:
        half = float(step_for_qp(-24)) / 2
        assert np.array_equal(np.round(decoded / half), decoded / half)


def test_small_tensors_biases_and_rdo_stay_independent() -> None:
    rng = np.random.default_rng(3)
    settings = QuantSettings(qp=-20, dependent=True)
    assert quantize(rng.normal(size=(8, 8)).astype(np.float32), TensorRole.WEIGHT, settings).chain == 0
    assert quantize(rng.normal(size=4096).astype(np.float32), TensorRole.NONWEIGHT, settings).chain == 0
    big = rng.normal(size=(64, 64)).astype(np.float32)
    assert quantize(big, TensorRole.WEIGHT, replace(settings, rdo=1.0)).chain == 0
    assert quantize(big, TensorRole.WEIGHT, replace(settings, bits=6)).chain == 0


def test_bad_chain_length_is_rejected() -> None:
    array = np.random.default_rng(4).normal(size=(32, 64)).astype(np.float32)
    payload = bytearray(encode_tensor(Tensor("w", array, TensorRole.WEIGHT), QuantSettings(qp=-20, dependent=True)))
    reader = ByteReader(bytes(payload), "unit")
    header = read_header(reader)
    assert header.chain and header.coded_rows is None
    position = reader.position - 1  # the chain byte ends the header when no row mask follows
    assert payload[position] == header.chain.bit_length() - 1
    payload[position] = 17
    with pytest.raises(BitstreamError, match="chain"):
        decode_tensor(bytes(payload))


def test_plan_keeps_the_levels_bias_correction_used(samples_dir) -> None:
    model = read_model(samples_dir / "resnet.onnx")
    moments = channel_moments(model)
    folded, _ = fold_batchnorm(model)
    settings = QuantSettings(qp=-30, dependent=True)
    plan = plan_quantization(folded, settings, moments=moments)
    assert plan.corrected and plan.quantized
    tensors = plan.model.tensor_map()
    assert any(kept.chain > 0 for kept in plan.quantized.values())
    for name, kept in plan.quantized.items():
        again = quantize(tensors[name].array, TensorRole.WEIGHT, plan.settings_for(tensors[name], settings))
        np.testing.assert_array_equal(kept.levels, again.levels)
    # The decoder rebuilds exactly the reconstruction bias correction was computed for.
    decoded = api.decompress_model(api.compress_model(folded, settings, moments=moments)[0]).tensor_map()
    for name, kept in plan.quantized.items():
        np.testing.assert_array_equal(decoded[name].array, dequantize(kept.levels, kept.steps, kept.chain))


def test_calibrated_error_feedback_layers_are_not_trellis_coded(samples_dir, digits_test) -> None:
    model, _ = fold_batchnorm(read_model(samples_dir / "lenet.onnx"))
    plan = plan_quantization(model, QuantSettings(qp=-30, dependent=True), digits_test[0][:64])
    assert plan.compensated
    assert all(not plan.settings[name].dependent for name in plan.compensated)


def test_cli_dq_round_trip(tmp_path, samples_dir, digits_test) -> None:
    out, plain, rebuilt = tmp_path / "m.nnc", tmp_path / "p.nnc", tmp_path / "m.onnx"
    runner = CliRunner()
    source = str(samples_dir / "resnet.onnx")
    for args in (["encode", source, "-o", str(out), "--qp", "-30", "--dq", "--json"], ["encode", source, "-o", str(plain), "--qp", "-30"]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
    info = runner.invoke(main, ["info", str(out), "--json"])
    assert json.loads(info.output)["parameters"]["settings"]["dependent"] is True
    assert runner.invoke(main, ["decode", str(out), "-o", str(rebuilt)]).exit_code == 0
    import onnxruntime as ort

    x, y = digits_test
    session = ort.InferenceSession(str(rebuilt), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0]
    assert (logits.argmax(axis=1) == y).mean() > 0.95
    assert out.read_bytes() != plain.read_bytes()
