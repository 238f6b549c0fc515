"""Tensor roles follow the data to its real consumers (formats/onnx_roles.py), with reasons."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import onnx_factory as factory
from nnc_tool import api, decoder
from nnc_tool.cli import main
from nnc_tool.formats import onnx_format, role_reasons
from nnc_tool.model import TensorRole

W, N, E = TensorRole.WEIGHT, TensorRole.NONWEIGHT, TensorRole.EXACT
HIDDEN, FEATURES, STEPS, BATCH = 8, 6, 5, 3


def _save(graph: onnx.GraphProto, directory: Path, name: str) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", factory.OPSET)])
    model.ir_version = factory.IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    onnx.save_model(model, path)
    return path


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def _lstm_branch(tag: str, reverse: bool) -> onnx.GraphProto:
    """LSTM(x) with W/R rebuilt from torch-layout tensors the way torch.onnx exports them.

    weight_ih [4H, I] and bias [8H] are main-graph initializers (outer scope); weight_hh is stored
    transposed [H, 4H] and read through Transpose first. Each gate is one Slice; Concat puts
    torch's i, f, g, o into ONNX's i, o, f, c order; Unsqueeze adds the direction axis.
    """
    nodes = []

    def gates(source: str, out: str) -> None:
        parts = []
        for gate in range(4):
            part = f"{tag}.{out}.g{gate}"
            nodes.append(helper.make_node("Slice", [source, f"gate{gate}.start", f"gate{gate}.end", "axis0"], [part]))
            parts.append(part)
        nodes.append(helper.make_node("Concat", [parts[0], parts[3], parts[1], parts[2]], [f"{tag}.{out}.cat"], axis=0))
        nodes.append(helper.make_node("Unsqueeze", [f"{tag}.{out}.cat", "axis0"], [f"{tag}.{out}"]))

    x = "x"
    if reverse:
        nodes.append(helper.make_node("Slice", ["x", "rev.start", "rev.end", "axis0", "rev.step"], [f"{tag}.x"]))
        x = f"{tag}.x"
    gates("lstm.weight_ih", "W")
    nodes.append(helper.make_node("Transpose", ["lstm.weight_hh_t"], [f"{tag}.hh"], perm=[1, 0]))
    gates(f"{tag}.hh", "R")
    nodes.append(helper.make_node("Unsqueeze", ["lstm.bias", "axis0"], [f"{tag}.B"]))
    nodes.append(
        helper.make_node("LSTM", [x, f"{tag}.W", f"{tag}.R", f"{tag}.B"], ["", f"{tag}.h"], hidden_size=HIDDEN)
    )
    nodes.append(helper.make_node("Squeeze", [f"{tag}.h", "axis0"], [f"{tag}.out"]))
    return helper.make_graph(
        nodes, tag, [], [helper.make_tensor_value_info(f"{tag}.out", TensorProto.FLOAT, [BATCH, HIDDEN])]
    )


def build_lstm_in_if(directory: Path) -> Path:
    """h = If(forward, LSTM(x), LSTM(reversed x)) @ head.w: gates sliced inside both branches."""
    rng = np.random.default_rng(11)
    f32 = lambda *shape: (rng.standard_normal(shape) * 0.4).astype(np.float32)  # noqa: E731
    inits = [
        numpy_helper.from_array(f32(4 * HIDDEN, FEATURES), "lstm.weight_ih"),
        numpy_helper.from_array(f32(HIDDEN, 4 * HIDDEN), "lstm.weight_hh_t"),
        numpy_helper.from_array(f32(8 * HIDDEN) * 0.5, "lstm.bias"),
        numpy_helper.from_array(f32(HIDDEN, 4), "head.w"),
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
        numpy_helper.from_array(np.array([-1], np.int64), "rev.start"),
        numpy_helper.from_array(np.array([-STEPS - 1], np.int64), "rev.end"),
        numpy_helper.from_array(np.array([-1], np.int64), "rev.step"),
    ]
    for gate in range(4):
        inits.append(numpy_helper.from_array(np.array([gate * HIDDEN], np.int64), f"gate{gate}.start"))
        inits.append(numpy_helper.from_array(np.array([(gate + 1) * HIDDEN], np.int64), f"gate{gate}.end"))
    nodes = [
        helper.make_node(
            "If", ["forward"], ["h"], name="rnn",
            then_branch=_lstm_branch("fwd", False), else_branch=_lstm_branch("bwd", True),
        ),
        helper.make_node("MatMul", ["h", "head.w"], ["y"], name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "lstm_in_if",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [STEPS, BATCH, FEATURES]),
            helper.make_tensor_value_info("forward", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [BATCH, 4])],
        inits,
    )
    return _save(graph, directory, "lstm_in_if.onnx")


def build_decomposed_layernorm(directory: Path) -> Path:
    """y = (x - mean) / Sqrt(mean((x - mean)^2) + eps) * gamma + beta, op by op, then @ proj.w."""
    rng = np.random.default_rng(12)
    width = 16
    inits = [
        numpy_helper.from_array(np.array([-1], np.int64), "ln.axes"),
        numpy_helper.from_array(np.array(2.0, np.float32), "ln.two"),
        numpy_helper.from_array(np.array(1e-5, np.float32), "ln.eps"),
        numpy_helper.from_array((1.0 + rng.standard_normal(width) * 0.2).astype(np.float32), "ln.gamma"),
        numpy_helper.from_array((rng.standard_normal(width) * 0.2).astype(np.float32), "ln.beta"),
        numpy_helper.from_array((rng.standard_normal((width, 4)) * 0.3).astype(np.float32), "proj.w"),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["x", "ln.axes"], ["mean"]),
        helper.make_node("Sub", ["x", "mean"], ["centred"]),
        helper.make_node("Pow", ["centred", "ln.two"], ["squared"]),
        helper.make_node("ReduceMean", ["squared", "ln.axes"], ["var"]),
        helper.make_node("Add", ["var", "ln.eps"], ["var.eps"]),
        helper.make_node("Sqrt", ["var.eps"], ["std"]),
        helper.make_node("Div", ["centred", "std"], ["normed"]),
        helper.make_node("Mul", ["normed", "ln.gamma"], ["scaled"]),
        helper.make_node("Add", ["scaled", "ln.beta"], ["ln.out"]),
        helper.make_node("MatMul", ["ln.out", "proj.w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "layernorm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        inits,
    )
    return _save(graph, directory, "layernorm.onnx")


def build_small_constants(directory: Path) -> Path:
    """Tiny tensors next to learned ones: which are constants and which are biases.

    x[1,3,4,4] - rgb.mean (3, Sub on the input) -> Conv(conv.w, conv.b: 1 output channel)
    -> Flatten -> Gemm(fc.w, fc.b: 1 output) -> Add(head.b: 1 element) -> Mul(temp: scalar)
    -> MatMul(pair.w [1, 4]) -> Add(pair.b: 4, a MatMul bias) -> Add(offsets: 4, on no layer's
    result after a Relu) -> y; pick.w reaches both a MatMul and a Softmax through Slices.
    """
    rng = np.random.default_rng(13)
    f32 = lambda *shape: (rng.standard_normal(shape) * 0.3).astype(np.float32)  # noqa: E731
    inits = [
        numpy_helper.from_array(np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1), "rgb.mean"),
        numpy_helper.from_array(f32(1, 3, 3, 3), "conv.w"),
        numpy_helper.from_array(f32(1), "conv.b"),
        numpy_helper.from_array(f32(1, 16), "fc.w"),
        numpy_helper.from_array(f32(1), "fc.b"),
        numpy_helper.from_array(f32(1), "head.b"),
        numpy_helper.from_array(np.array(0.7, np.float32), "temp"),
        numpy_helper.from_array(f32(1, 4), "pair.w"),
        numpy_helper.from_array(f32(4), "pair.b"),
        numpy_helper.from_array(f32(4), "offsets"),
        numpy_helper.from_array(f32(8, 4), "pick.w"),
        numpy_helper.from_array(np.array([0], np.int64), "s0"),
        numpy_helper.from_array(np.array([4], np.int64), "s4"),
        numpy_helper.from_array(np.array([8], np.int64), "s8"),
    ]
    nodes = [
        helper.make_node("Sub", ["x", "rgb.mean"], ["centred"]),
        helper.make_node("Conv", ["centred", "conv.w", "conv.b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["g"], transB=1),
        helper.make_node("Add", ["g", "head.b"], ["g2"]),
        helper.make_node("Mul", ["g2", "temp"], ["g3"]),
        helper.make_node("MatMul", ["g3", "pair.w"], ["p"]),
        helper.make_node("Add", ["p", "pair.b"], ["p2"]),
        helper.make_node("Relu", ["p2"], ["r"]),
        helper.make_node("Add", ["r", "offsets"], ["o"]),
        helper.make_node("Slice", ["pick.w", "s0", "s4"], ["pick.top"]),
        helper.make_node("Slice", ["pick.w", "s4", "s8"], ["pick.bottom"]),
        helper.make_node("MatMul", ["o", "pick.top"], ["m"]),
        helper.make_node("Softmax", ["pick.bottom"], ["soft"], axis=0),
        helper.make_node("MatMul", ["m", "soft"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "small_constants",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        inits,
    )
    return _save(graph, directory, "small_constants.onnx")


def _decisions(path: Path) -> dict:
    return onnx_format.tensor_roles(onnx.load_model(path))


def test_lstm_weights_sliced_inside_if_branches_are_weights(tmp_path: Path) -> None:
    path = build_lstm_in_if(tmp_path)
    decisions = _decisions(path)
    assert decisions["lstm.weight_ih"].role == W
    assert decisions["lstm.weight_hh_t"].role == W
    assert decisions["lstm.bias"].role == N
    assert decisions["head.w"].role == W
    assert decisions["lstm.weight_ih"].reason == "weight: Slice -> Concat -> Unsqueeze -> LSTM W in If/else (+1 more use)"
    assert decisions["lstm.weight_hh_t"].reason.startswith("weight: Transpose -> Slice -> Concat -> Unsqueeze -> LSTM R")
    assert decisions["lstm.bias"].reason == "nonweight: Unsqueeze -> bias of LSTM in If/else (+1 more use)"
    assert decisions["gate1.start"] == (E, "exact: int64 data")

    model = onnx_format.read(path)
    assert {t.name: t.role for t in model.tensors} == {name: d.role for name, d in decisions.items()}
    data, reports = api.compress_model(model)
    assert {r.name: r.role for r in reports}["lstm.weight_ih"] == "weight"
    assert {r.name: r.coding for r in reports}["lstm.weight_ih"] == "quantized"
    out = tmp_path / "decoded.onnx"
    onnx_format.write(api.decompress_model(data), out)
    x = np.random.default_rng(5).standard_normal((STEPS, BATCH, FEATURES)).astype(np.float32)
    for forward in (True, False):
        feeds = {"x": x, "forward": np.array(forward)}
        (expected,), (got,) = _run(path, feeds), _run(out, feeds)
        assert not np.array_equal(got, expected)  # the weights really were coded lossily
        np.testing.assert_allclose(got, expected, atol=0.02)
    # Both branches compute different things, so a swapped branch would be caught above.
    ahead = _run(path, {"x": x, "forward": np.array(True)})[0]
    assert np.abs(ahead - _run(path, {"x": x, "forward": np.array(False)})[0]).max() > 0.1


def test_decomposed_layernorm_keeps_epsilon_and_exponent_exact(tmp_path: Path) -> None:
    path = build_decomposed_layernorm(tmp_path)
    decisions = _decisions(path)
    assert decisions["ln.eps"] == (E, "exact: reaches Sqrt (Add -> Sqrt)")
    assert decisions["ln.two"] == (E, "exact: feeds Pow exponent")
    assert decisions["ln.gamma"] == (N, "nonweight: scale (Mul)")
    assert decisions["ln.beta"] == (N, "nonweight: bias (Add)")
    assert decisions["proj.w"].role == W

    model = onnx_format.read(path)
    original = model.tensor_map()
    changed = set()
    for qp in range(-44, -19):
        data, _ = api.compress_model(model, api.EncodeOptions(qp=qp))
        decoded = api.decompress_model(data).tensor_map()
        for name in ("ln.eps", "ln.two"):
            assert decoded[name].array.tobytes() == original[name].array.tobytes(), (name, qp)
        for name in ("ln.gamma", "ln.beta"):
            assert decoded[name].role == N
            np.testing.assert_allclose(decoded[name].array, original[name].array, atol=2e-3)
            if decoded[name].array.tobytes() != original[name].array.tobytes():
                changed.add(name)
    assert changed == {"ln.gamma", "ln.beta"}  # lossy, not silently exact


def test_tiny_tensors_and_biases(tmp_path: Path) -> None:
    decisions = _decisions(build_small_constants(tmp_path))
    assert decisions["rgb.mean"] == (E, "exact: 3 elements, a constant of Sub")
    assert decisions["conv.w"] == (W, "weight: Conv W")
    assert decisions["conv.b"] == (N, "nonweight: bias of Conv")  # 1 element, but Conv's B slot
    assert decisions["fc.w"] == (W, "weight: Gemm B")
    assert decisions["fc.b"] == (N, "nonweight: bias of Gemm")
    assert decisions["head.b"] == (E, "exact: 1 element, a constant of Add")
    assert decisions["temp"] == (E, "exact: 1 element, a constant of Mul")
    assert decisions["pair.w"] == (N, "nonweight: MatMul B")  # 4 values: too few for the coarse step
    assert decisions["pair.b"] == (N, "nonweight: bias of MatMul (Add)")
    assert decisions["offsets"] == (E, "exact: 4 elements, a constant of Add")
    assert decisions["pick.w"] == (E, "exact: Slice -> Softmax")


@pytest.mark.parametrize("name", sorted(factory.EXPECTED_ROLES))
def test_stored_topology_gives_the_readers_decisions(name: str, tmp_path: Path) -> None:
    model = onnx_format.read(factory.BUILDERS[name](tmp_path))
    decisions = onnx_format.tensor_roles(model.topology)  # weightless: what `nnc info` sees
    assert {t.name: t.role for t in model.tensors} == {n: d.role for n, d in decisions.items()}
    assert all(d.reason.startswith(d.role.name.lower() + ":") for d in decisions.values())


def test_info_shows_reasons_in_text_and_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = build_lstm_in_if(tmp_path)
    stream = tmp_path / "lstm.nnc"
    runner = CliRunner()
    assert runner.invoke(main, ["encode", str(path), "-o", str(stream), "-q"]).exit_code == 0
    text = runner.invoke(main, ["info", str(stream)])
    assert text.exit_code == 0
    line = next(row for row in text.output.splitlines() if " lstm.weight_ih " in row)
    assert line.split()[3] == "weight"
    assert line.endswith("[weight: Slice -> Concat -> Unsqueeze -> LSTM W in If/else (+1 more use)]")
    shown = runner.invoke(main, ["info", "--json", str(stream)])
    assert shown.exit_code == 0
    units = json.loads(shown.output)["units"]
    listed = [u["tensor"] for u in units if u["tensor"]] + [t for u in units for t in u.get("packed") or []]
    reasons = {t["name"]: t["reason"] for t in listed}
    assert reasons == {name: d.reason for name, d in _decisions(path).items()}
    # Not stored in the stream: without the reasons the encoder writes the same bytes.
    monkeypatch.setattr(api, "explain_roles", lambda *args: None)
    monkeypatch.setattr(decoder, "explain_roles", lambda *args: None)
    again = tmp_path / "again.nnc"
    assert runner.invoke(main, ["encode", str(path), "-o", str(again), "-q"]).exit_code == 0
    assert again.read_bytes() == stream.read_bytes()
    plain = json.loads(runner.invoke(main, ["info", "--json", str(again)]).output)
    assert all(u["tensor"]["reason"] is None for u in plain["units"] if u["tensor"])


def test_reasons_for_stored_roles_that_differ_and_other_formats(tmp_path: Path) -> None:
    model = onnx_format.read(build_decomposed_layernorm(tmp_path))
    stored = [("ln.gamma", "float32", 1, E), ("ln.eps", "float32", 0, E)]
    assert role_reasons("onnx", model.topology, stored) == [
        "stored as exact; this version decides nonweight: scale (Mul)",
        "exact: reaches Sqrt (Add -> Sqrt)",
    ]
    assert role_reasons("safetensors", b"", [("w", "float32", 2, W), ("b", "float32", 1, N), ("n", "int64", 0, E)]) == [
        "weight: float with 2 axes (no graph to consult)",
        "nonweight: float with 1 axis (no graph to consult)",
        "exact: int64 data",
    ]
    assert role_reasons("torch-state-dict", b"", [("bn.running_mean", "float32", 1, E)]) == [
        "exact: a buffer or constant the torch-state-dict reader keeps exact"
    ]


def test_branch_outputs_lead_to_the_if_outputs_and_graph_outputs_stay_exact(tmp_path: Path) -> None:
    """Each If branch returns its own Constant matrix, which a MatMul after the If reads; a
    weight that is also a graph output, or that feeds a Div denominator, is exact."""
    rng = np.random.default_rng(14)

    def branch(tag: str) -> onnx.GraphProto:
        value = numpy_helper.from_array((rng.standard_normal((4, 4)) * 0.3).astype(np.float32))
        return helper.make_graph(
            [helper.make_node("Constant", [], [f"{tag}.w"], value=value)],
            tag, [], [helper.make_tensor_value_info(f"{tag}.w", TensorProto.FLOAT, [4, 4])],
        )

    inits = [
        numpy_helper.from_array((rng.standard_normal((4, 4)) * 0.3).astype(np.float32), "shown.w"),
        numpy_helper.from_array((1.0 + rng.random(4)).astype(np.float32), "divisor"),
    ]
    nodes = [
        helper.make_node("If", ["flag"], ["chosen"], name="pick", then_branch=branch("a"), else_branch=branch("b")),
        helper.make_node("MatMul", ["x", "chosen"], ["h"]),
        helper.make_node("MatMul", ["h", "shown.w"], ["h2"]),
        helper.make_node("Div", ["h2", "divisor"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "branch_outputs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]), helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4]), helper.make_tensor_value_info("shown.w", TensorProto.FLOAT, [4, 4])],
        inits,
    )
    decisions = _decisions(_save(graph, tmp_path, "branch_outputs.onnx"))
    assert decisions["pick/then_branch/a.w"] == (W, "weight: If -> MatMul B")
    assert decisions["pick/else_branch/b.w"] == (W, "weight: If -> MatMul B")
    assert decisions["shown.w"] == (E, "exact: graph output")
    assert decisions["divisor"] == (E, "exact: feeds Div denominator")


FRAME, BANDS = 64, 16


def _dft_basis() -> np.ndarray:
    """[2 * BANDS, 1, FRAME]: Hann-windowed cosines, then sines, as an STFT is exported as a Conv."""
    t = np.arange(FRAME)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * t / FRAME)
    bins = np.arange(BANDS)[:, None]
    real, imag = window * np.cos(2 * np.pi * bins * t / FRAME), -window * np.sin(2 * np.pi * bins * t / FRAME)
    return np.concatenate([real, imag])[:, None, :].astype(np.float32)


def build_stft_front_end(directory: Path) -> Path:
    """audio [1, 1, L] -> Conv(stft.basis, stride FRAME/2) -> Slice re / im -> Pow 2 -> Add -> Sqrt
    -> Add floor -> Log -> Conv(enc.w, enc.b) -> Relu -> ReduceMean over time -> y [1, 8]: an
    STFT front end as silero-vad and basic-pitch export it, with a log-magnitude spectrogram."""
    rng = np.random.default_rng(14)
    inits = [
        numpy_helper.from_array(_dft_basis(), "stft.basis"),
        numpy_helper.from_array((rng.standard_normal((8, BANDS, 3)) * 0.2).astype(np.float32), "enc.w"),
        numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "enc.b"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array(1e-4, np.float32), "floor"),
        numpy_helper.from_array(np.array([0], np.int64), "s0"),
        numpy_helper.from_array(np.array([BANDS], np.int64), "sb"),
        numpy_helper.from_array(np.array([2 * BANDS], np.int64), "s2b"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([2], np.int64), "axis2"),
    ]
    nodes = [
        helper.make_node("Conv", ["audio", "stft.basis"], ["spec"], strides=[FRAME // 2]),
        helper.make_node("Slice", ["spec", "s0", "sb", "axis1"], ["re"]),
        helper.make_node("Slice", ["spec", "sb", "s2b", "axis1"], ["im"]),
        helper.make_node("Pow", ["re", "two"], ["re2"]),
        helper.make_node("Pow", ["im", "two"], ["im2"]),
        helper.make_node("Add", ["re2", "im2"], ["power"]),
        helper.make_node("Sqrt", ["power"], ["magnitude"]),
        helper.make_node("Add", ["magnitude", "floor"], ["floored"]),
        helper.make_node("Log", ["floored"], ["log.magnitude"]),
        helper.make_node("Conv", ["log.magnitude", "enc.w", "enc.b"], ["enc"], pads=[1, 1]),
        helper.make_node("Relu", ["enc"], ["act"]),
        helper.make_node("ReduceMean", ["act", "axis2"], ["pooled"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "stft_front_end",
        [helper.make_tensor_value_info("audio", TensorProto.FLOAT, [1, 1, 32 * FRAME])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, [1, 8])],
        inits,
    )
    return _save(graph, directory, "stft.onnx")


def _save_projection(nodes: list, inits: list, directory: Path, name: str) -> Path:
    """A graph x [2, 16] -> y [2, 8] (the normalisation tests' projections) saved as NAME.onnx."""
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        inits,
    )
    return _save(graph, directory, f"{name}.onnx")


def build_l2_normalised_embedding(directory: Path) -> Path:
    """y = e / Sqrt(ReduceSum(e * e) + eps) with e = x @ proj.w: a normalisation, not a magnitude."""
    rng = np.random.default_rng(15)
    inits = [
        numpy_helper.from_array((rng.standard_normal((16, 8)) * 0.3).astype(np.float32), "proj.w"),
        numpy_helper.from_array(np.array([-1], np.int64), "last"),
        numpy_helper.from_array(np.array(1e-12, np.float32), "eps"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "proj.w"], ["e"]),
        helper.make_node("Mul", ["e", "e"], ["e2"]),
        helper.make_node("ReduceSum", ["e2", "last"], ["sum"], keepdims=1),
        helper.make_node("Add", ["sum", "eps"], ["sum.eps"]),
        helper.make_node("Sqrt", ["sum.eps"], ["norm"]),
        helper.make_node("Div", ["e", "norm"], ["y"]),
    ]
    return _save_projection(nodes, inits, directory, "l2_embedding")


def _coloured_audio(seconds_frames: int) -> np.ndarray:
    """Harmonics of 2 pitches in the lower bands over a -60 dB noise floor: loud low bands and
    quiet high ones, the spectral range that makes a filterbank's rounding error audible."""
    rng = np.random.default_rng(3)
    t = np.arange(seconds_frames)
    audio = sum(np.sin(2 * np.pi * f * k * t / FRAME + rng.uniform(0, 6)) / k**2
                for f in (1.3, 2.1) for k in range(1, 4))
    return (audio + 1e-3 * rng.standard_normal(t.shape)).astype(np.float32)[None, None, :]


def test_a_filterbank_feeding_a_magnitude_takes_the_fine_step(tmp_path: Path) -> None:
    path = build_stft_front_end(tmp_path)
    decisions = _decisions(path)
    assert decisions["stft.basis"] == (N, "nonweight: Conv W, a filterbank whose output reaches Sqrt")
    assert decisions["enc.w"] == (W, "weight: Conv W")  # reads the magnitude, is not a filterbank
    assert decisions["two"] == (E, "exact: feeds Pow exponent")

    model = onnx_format.read(path)
    data, reports = api.compress_model(model, api.EncodeOptions(qp=-38))
    steps = {r.name: r.step for r in reports}
    assert steps["stft.basis"] < steps["enc.w"] / 8  # the non-weight QP, 16 finer than -38
    out = tmp_path / "decoded.onnx"
    onnx_format.write(api.decompress_model(data), out)
    feeds = {"audio": _coloured_audio(32 * FRAME)}
    (expected,), (got,) = _run(path, feeds), _run(out, feeds)
    snr = 10 * np.log10(np.sum(expected**2) / np.sum((got - expected) ** 2))
    assert snr > 45.0, snr


def build_projection_then_layernorm(directory: Path) -> Path:
    """h = x @ proj.w + proj.b, then h's LayerNorm op by op (its Pow and Sqrt come after a mean)."""
    rng = np.random.default_rng(16)
    inits = [
        numpy_helper.from_array((rng.standard_normal((16, 8)) * 0.3).astype(np.float32), "proj.w"),
        numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "proj.b"),
        numpy_helper.from_array(np.array([-1], np.int64), "axes"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "proj.w"], ["m"]),
        helper.make_node("Add", ["m", "proj.b"], ["h"]),
        helper.make_node("ReduceMean", ["h", "axes"], ["mean"]),
        helper.make_node("Sub", ["h", "mean"], ["centred"]),
        helper.make_node("Pow", ["centred", "two"], ["squared"]),
        helper.make_node("ReduceMean", ["squared", "axes"], ["var"]),
        helper.make_node("Add", ["var", "eps"], ["var.eps"]),
        helper.make_node("Sqrt", ["var.eps"], ["std"]),
        helper.make_node("Div", ["centred", "std"], ["y"]),
    ]
    return _save_projection(nodes, inits, directory, "projection_layernorm")


def test_a_layer_before_a_layernorm_or_an_l2_normalisation_is_no_filterbank(tmp_path: Path) -> None:
    assert _decisions(build_l2_normalised_embedding(tmp_path))["proj.w"] == (W, "weight: MatMul B")
    assert _decisions(build_projection_then_layernorm(tmp_path))["proj.w"] == (W, "weight: MatMul B")


def build_log_mel_front_end(directory: Path) -> Path:
    """log(clip(|STFT|^2 @ mel, eps)) @ head.w: the power spectrum through a mel matrix, then a log."""
    rng = np.random.default_rng(17)
    inits = [
        numpy_helper.from_array(_dft_basis(), "stft.basis"),
        numpy_helper.from_array(np.abs(rng.standard_normal((BANDS, 6))).astype(np.float32), "mel"),
        numpy_helper.from_array((rng.standard_normal((6, 4)) * 0.3).astype(np.float32), "head.w"),
        numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
        numpy_helper.from_array(np.array([0], np.int64), "s0"),
        numpy_helper.from_array(np.array([BANDS], np.int64), "sb"),
        numpy_helper.from_array(np.array([2 * BANDS], np.int64), "s2b"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
    ]
    nodes = [
        helper.make_node("Conv", ["audio", "stft.basis"], ["spec"], strides=[FRAME // 2]),
        helper.make_node("Slice", ["spec", "s0", "sb", "axis1"], ["re"]),
        helper.make_node("Slice", ["spec", "sb", "s2b", "axis1"], ["im"]),
        helper.make_node("Mul", ["re", "re"], ["re2"]),
        helper.make_node("Mul", ["im", "im"], ["im2"]),
        helper.make_node("Add", ["re2", "im2"], ["power"]),
        helper.make_node("Transpose", ["power"], ["frames"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["frames", "mel"], ["mel.power"]),
        helper.make_node("Clip", ["mel.power", "eps"], ["mel.eps"]),  # log(max(x, eps)), as whisper's front end
        helper.make_node("Log", ["mel.eps"], ["log.mel"]),
        helper.make_node("MatMul", ["log.mel", "head.w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "log_mel",
        [helper.make_tensor_value_info("audio", TensorProto.FLOAT, [1, 1, 32 * FRAME])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 63, 4])],
        inits,
    )
    return _save(graph, directory, "log_mel.onnx")


def test_an_stft_under_a_mel_matrix_and_a_log_is_a_filterbank_and_so_is_the_mel_matrix(tmp_path: Path) -> None:
    decisions = _decisions(build_log_mel_front_end(tmp_path))
    assert decisions["stft.basis"] == (N, "nonweight: Conv W, a filterbank whose output reaches Log")
    assert decisions["mel"] == (N, "nonweight: MatMul B, a filterbank whose output reaches Log")
    assert decisions["head.w"] == (W, "weight: MatMul B")
    assert decisions["eps"].role == E


def test_layers_linked_by_an_activation_are_not_one_filterbank(tmp_path: Path) -> None:
    """c1 -> Clip(0, 6) (ReLU6) -> c2 -> Pow 2 -> Sqrt: c2 feeds a magnitude, c1 only c2."""
    rng = np.random.default_rng(18)
    inits = [
        numpy_helper.from_array((rng.standard_normal((4, 1, 3)) * 0.3).astype(np.float32), "c1.w"),
        numpy_helper.from_array((rng.standard_normal((4, 4, 3)) * 0.3).astype(np.float32), "c2.w"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array(6.0, np.float32), "six"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "c1.w"], ["h1"]),
        helper.make_node("Clip", ["h1", "zero", "six"], ["a1"]),
        helper.make_node("Conv", ["a1", "c2.w"], ["h2"]),
        helper.make_node("Pow", ["h2", "two"], ["p"]),
        helper.make_node("Sqrt", ["p"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "relu6_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 12])],
        inits,
    )
    decisions = _decisions(_save(graph, tmp_path, "relu6_chain.onnx"))
    assert decisions["c1.w"] == (W, "weight: Conv W")
    assert decisions["c2.w"] == (N, "nonweight: Conv W, a filterbank whose output reaches Sqrt")
