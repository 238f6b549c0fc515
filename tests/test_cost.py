"""Counted cost of a model run (nnc_tool/graph/cost.py) and the sensitivity budget built on it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from inputs_factory import _save
from nnc_tool.formats import read_model
from nnc_tool.graph.cost import multiply_accumulates
from nnc_tool.inputs import as_model_inputs
from nnc_tool.quantize import sensitivity


def _conv_gemm(tmp_path: Path) -> Path:
    """[batch, 3, H, W] -> Conv 4x3x3x3 (same padding) -> Flatten -> Gemm to 10 classes."""
    rng = np.random.default_rng(0)
    conv = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "conv.w")
    dense = numpy_helper.from_array(rng.standard_normal((256, 10)).astype(np.float32), "fc.w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "conv.w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Flatten", ["c"], ["f"]),
         helper.make_node("Gemm", ["f", "fc.w"], ["y"])],
        "cost", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])], [conv, dense])
    return _save(graph, tmp_path, "cost.onnx")


def test_multiply_accumulates_count_every_output_times_its_fan_in(tmp_path: Path) -> None:
    model = read_model(_conv_gemm(tmp_path))
    one = {"x": np.zeros((1, 3, 8, 8), np.float32)}
    # Conv: 4 x 8 x 8 outputs x (3 x 3 x 3) taps; Gemm: 10 outputs x 256 inputs.
    assert multiply_accumulates(model, one) == 4 * 8 * 8 * 27 + 10 * 256
    assert multiply_accumulates(model, {"x": np.zeros((2, 3, 8, 8), np.float32)}) == 2 * (4 * 8 * 8 * 27 + 10 * 256)


def test_sensitivity_runs_use_fewer_inputs_past_the_budget(tmp_path: Path, monkeypatch) -> None:
    model = read_model(_conv_gemm(tmp_path))
    calibration = as_model_inputs({"x": np.random.default_rng(1).standard_normal((40, 3, 8, 8)).astype(np.float32)}, model)
    assert sensitivity.affordable_samples(model, calibration) == sensitivity.SENSITIVITY_SAMPLES
    per_input, runs = 4 * 8 * 8 * 27 + 10 * 256, 2  # two quantizable tensors
    monkeypatch.setattr(sensitivity, "SENSITIVITY_MACS", 5 * per_input * runs)
    assert sensitivity.affordable_samples(model, calibration) == 5
    monkeypatch.setattr(sensitivity, "SENSITIVITY_MACS", 1.0)
    assert sensitivity.affordable_samples(model, calibration) == sensitivity.MIN_SENSITIVITY_SAMPLES
    measured = sensitivity.measure_sensitivities(model, calibration)
    assert set(measured) == {"conv.w", "fc.w"} and all(s > 0 for s in measured.values())
