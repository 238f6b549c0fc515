"""The format-neutral model that flows through the pipeline.

A model file is split into two parts: its *topology* (everything but the tensor
payloads, as format-specific bytes that only the format module interprets) and an
ordered list of named tensors. Pruning, quantization and coding only ever see the
tensors; the format module alone knows how to put them back.
"""
from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np


class TensorRole(enum.IntEnum):
    """How a tensor may be coded.

    WEIGHT: a learned multi-dimensional parameter (conv kernel, matrix) - lossy with the weight step.
    NONWEIGHT: a learned 1-D parameter (bias, norm scale, running stats), or a filterbank whose
    output becomes a magnitude (an STFT basis as a Conv) - lossy with the finer step.
    EXACT: anything whose value steers shapes or control flow, integer data, small constants
    (epsilons, 1/N, temperatures), or data we cannot prove is a learned parameter - always coded
    losslessly.

    ONNX roles come from a graph analysis with a reason for each (formats/onnx_roles.py).
    """

    WEIGHT = 0
    NONWEIGHT = 1
    EXACT = 2


# Stable numeric codes for the bitstream; never renumber, only append.
DTYPE_CODES: dict[str, int] = {
    "float32": 0,
    "float16": 1,
    "bfloat16": 2,
    "float64": 3,
    "int8": 4,
    "uint8": 5,
    "int16": 6,
    "uint16": 7,
    "int32": 8,
    "uint32": 9,
    "int64": 10,
    "uint64": 11,
    "bool": 12,
}
DTYPE_NAMES: dict[int, str] = {code: name for name, code in DTYPE_CODES.items()}
FLOAT_DTYPES = frozenset({"float32", "float16", "bfloat16", "float64"})


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype for one of our dtype names (bfloat16 via ml_dtypes)."""
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def dtype_name(dtype: np.dtype) -> str:
    """Our dtype name for a numpy dtype; raises ValueError for unsupported ones."""
    return _dtype_name(np.dtype(dtype))


@functools.lru_cache(maxsize=64)
def _dtype_name(dtype: np.dtype) -> str:
    # Every Tensor.dtype asks; numpy's dtype comparisons cost ~5 us each (ppocr-cls lossless: 4 of 14 ms).
    if dtype == np.dtype(ml_dtypes.bfloat16):
        return "bfloat16"
    name = dtype.name
    if name not in DTYPE_CODES:
        raise ValueError(f"unsupported tensor dtype {name}")
    return name


def default_role(dtype: str, ndim: int) -> TensorRole:
    """Role of a tensor from dtype and rank alone, for formats without a graph to consult.

    Multi-dimensional floats are the bulk of learned weights; 1-D/0-D floats are biases,
    norm scales and running statistics that need a finer step; anything integer or bool
    (counters, indices, masks) must survive exactly.
    """
    if dtype in FLOAT_DTYPES:
        return TensorRole.WEIGHT if ndim >= 2 else TensorRole.NONWEIGHT
    return TensorRole.EXACT


@dataclass
class Tensor:
    """One named tensor of a model.

    `array` holds the values in their stored dtype (bfloat16 as ml_dtypes.bfloat16) and
    shape; `name` is unique within a model and is the key the format module uses to put
    the tensor back.
    """

    name: str
    array: np.ndarray
    role: TensorRole

    @property
    def dtype(self) -> str:
        return dtype_name(self.array.dtype)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


@dataclass
class Model:
    """A model as the pipeline sees it.

    `format` names the file format it came from (see nnc_tool.formats.FORMATS) and decides
    how `topology` is interpreted and which file suffixes a decoded model may have.
    """

    format: str
    topology: bytes
    tensors: list[Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    def tensor_map(self) -> dict[str, Tensor]:
        return {t.name: t for t in self.tensors}

    @property
    def parameter_count(self) -> int:
        return int(sum(t.array.size for t in self.tensors))
