"""nnc: compress neural networks (ONNX, PyTorch, safetensors) into MPEG-NNC-style bitstreams."""
__version__ = "0.1.0"

from .api import (  # noqa: E402 - the version must exist before api imports it
    DecodeReport,
    EncodeOptions,
    EncodeReport,
    StreamInfo,
    compress_model,
    decode,
    decompress_model,
    encode,
    info,
)
from .errors import BitstreamError, FormatError, NncError, UsageError  # noqa: E402
from .formats import detect_format, read_model, write_model  # noqa: E402
from .model import Model, Tensor, TensorRole  # noqa: E402

__all__ = [
    "BitstreamError",
    "DecodeReport",
    "EncodeOptions",
    "EncodeReport",
    "FormatError",
    "Model",
    "NncError",
    "StreamInfo",
    "Tensor",
    "TensorRole",
    "UsageError",
    "compress_model",
    "decode",
    "decompress_model",
    "detect_format",
    "encode",
    "info",
    "read_model",
    "write_model",
]
