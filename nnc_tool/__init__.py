"""nnc: compress neural networks (ONNX, PyTorch, safetensors) into MPEG-NNC-style bitstreams.

The public API is importable from here (`nnc_tool.encode`, `nnc_tool.Model`, ...). Names resolve
on first use, so `nnc --help`, `nnc info` and `nnc decode` do not import the encoder's stack
(onnxruntime, the quantizer, pruning) that they never run.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    **dict.fromkeys(
        ["EncodeOptions", "EncodeReport", "PreparedModel", "compress_model", "encode", "prepare_model"], ".api"),
    **dict.fromkeys(["DecodeReport", "StreamInfo", "decode", "decompress_model", "info"], ".decoder"),
    **dict.fromkeys(["BitstreamError", "FormatError", "NncError", "UsageError"], ".errors"),
    **dict.fromkeys(["detect_format", "read_model", "write_model"], ".formats"),
    **dict.fromkeys(["Model", "Tensor", "TensorRole"], ".model"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nnc_tool' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from .api import EncodeOptions, EncodeReport, PreparedModel, compress_model, encode, prepare_model
    from .decoder import DecodeReport, StreamInfo, decode, decompress_model, info
    from .errors import BitstreamError, FormatError, NncError, UsageError
    from .formats import detect_format, read_model, write_model
    from .model import Model, Tensor, TensorRole
