"""Every supported model layout through the whole pipeline (quantize, code, container, rebuild)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import nnc_tool
import onnx_factory
import torch_factory
from nnc_tool import TensorRole


def run_onnx(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def snr_db(reference: np.ndarray, approximation: np.ndarray) -> float:
    reference = reference.astype(np.float64)
    noise = float(((reference - approximation.astype(np.float64)) ** 2).sum())
    return float("inf") if noise == 0 else 10 * np.log10(float((reference**2).sum()) / noise)


@pytest.mark.parametrize("builder", sorted(onnx_factory.BUILDERS))
def test_onnx_layouts_survive_the_pipeline(tmp_path: Path, builder: str) -> None:
    source = onnx_factory.BUILDERS[builder](_subdir(tmp_path, "src"))
    out_dir = _subdir(tmp_path, "out")
    bitstream = out_dir / "model.nnc"
    rebuilt = out_dir / "rebuilt.onnx"
    original_model = nnc_tool.read_model(source)
    report = nnc_tool.encode(source, bitstream)
    nnc_tool.decode(bitstream, rebuilt)
    onnx.checker.check_model(str(rebuilt), full_check=True)

    restored = nnc_tool.read_model(rebuilt).tensor_map()
    for tensor in original_model.tensors:
        if tensor.name not in restored:  # BatchNorm parameters folded into the layer before
            assert report.folded_batchnorms and tensor.role == TensorRole.NONWEIGHT, tensor.name
            continue
        assert restored[tensor.name].array.dtype == tensor.array.dtype
        if tensor.role == TensorRole.EXACT:
            assert restored[tensor.name].array.tobytes() == tensor.array.tobytes(), tensor.name

    if original_model.metadata.get("onnx.external_data") == "1":
        assert (out_dir / "rebuilt.onnx.data").is_file()
        assert report.original_bytes > source.stat().st_size  # the data file counts too

    if builder in onnx_factory.NOT_RUNNABLE:
        return
    feeds = onnx_factory.sample_inputs(source)
    for before, after in zip(run_onnx(source, feeds), run_onnx(rebuilt, feeds)):
        if before.dtype.kind == "f":
            assert snr_db(before, after) > 25.0, builder
        else:
            np.testing.assert_array_equal(before, after)


def _subdir(root: Path, name: str) -> Path:
    path = root / name
    path.mkdir(exist_ok=True)
    return path


def test_constant_node_weights_are_quantized(tmp_path: Path) -> None:
    source = onnx_factory.build_conv_bn_gemm_constants(tmp_path)
    model = nnc_tool.read_model(source)
    assert any(t.role == TensorRole.WEIGHT for t in model.tensors)
    lossy = nnc_tool.encode(source, None).bitstream_bytes
    lossless = nnc_tool.encode(source, None, nnc_tool.EncodeOptions(lossless=True)).bitstream_bytes
    assert lossy < 0.6 * lossless


@pytest.mark.parametrize("name", sorted(torch_factory.BUILDERS))
def test_torch_layouts_survive_the_pipeline(tmp_path: Path, name: str) -> None:
    builder, fmt = torch_factory.BUILDERS[name]
    source = builder(_subdir(tmp_path, "src"))
    bitstream = tmp_path / "model.nnc"
    rebuilt = tmp_path / f"rebuilt{source.suffix if fmt != 'torchscript' else '.pt'}"
    report = nnc_tool.encode(source, bitstream)
    assert report.format == fmt
    nnc_tool.decode(bitstream, rebuilt)
    assert nnc_tool.detect_format(rebuilt) == fmt

    original = nnc_tool.read_model(source)
    restored = nnc_tool.read_model(rebuilt).tensor_map()
    assert list(restored) == [t.name for t in original.tensors]
    for tensor in original.tensors:
        got = restored[tensor.name].array
        assert got.dtype == tensor.array.dtype and got.shape == tensor.array.shape, tensor.name
        if tensor.role == TensorRole.EXACT:
            assert got.tobytes() == tensor.array.tobytes(), tensor.name
        else:
            assert snr_db(tensor.array.astype(np.float32), got.astype(np.float32)) > 30.0, tensor.name

    if fmt == "torchscript" and "tied" not in name:
        x = torch_factory.example_input()
        expected = torch.jit.load(str(source))(x)
        got = torch.jit.load(str(rebuilt))(x)
        assert snr_db(expected.detach().numpy(), got.detach().numpy()) > 25.0
    if fmt == "torch-export" and "tied" not in name:
        x = torch_factory.example_input()
        expected = torch.export.load(str(source)).module()(x)
        got = torch.export.load(str(rebuilt)).module()(x)
        assert snr_db(expected.detach().numpy(), got.detach().numpy()) > 25.0
