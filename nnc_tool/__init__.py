"""nnc: compress neural networks (ONNX, PyTorch, safetensors) into MPEG-NNC-style bitstreams."""
__version__ = "0.1.0"

from .api import (  # noqa: E402 - the version must exist before api imports it
    DecodeReport,
    EncodeOptions,
    EncodeReport,
    PreparedModel,
    StreamInfo,
    compress_model,
    decode,
    decompress_model,
    encode,
    info,
    prepare_model,
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
    "PreparedModel",
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
    "prepare_model",
    "read_model",
    "write_model",
]
