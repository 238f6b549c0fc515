"""Model file formats: detect, read into a `Model`, and write a `Model` back.

Each format module exposes `read(path) -> Model` and `write(model, path) -> None`.
`write` receives the final destination path and is responsible for writing atomically
(see nnc_tool.fileio.atomic_output); it must never leave a partial file behind.
"""
from __future__ import annotations

import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import FormatError, UsageError
from ..model import FLOAT_DTYPES, Model, TensorRole, default_role


@dataclass(frozen=True)
class FormatSpec:
    name: str
    description: str
    suffixes: tuple[str, ...]
    read: Callable[[Path], Model]
    write: Callable[[Model, Path], None]


def _onnx_read(path: Path) -> Model:
    from . import onnx_format

    return onnx_format.read(path)


def _onnx_write(model: Model, path: Path) -> None:
    from . import onnx_format

    onnx_format.write(model, path)


def _torch_reader(kind: str) -> Callable[[Path], Model]:
    def read(path: Path) -> Model:
        from . import torch_format

        return torch_format.read(path, kind)

    return read


def _torch_write(model: Model, path: Path) -> None:
    from . import torch_format

    torch_format.write(model, path)


def _safetensors_read(path: Path) -> Model:
    from . import safetensors_format

    return safetensors_format.read(path)


def _safetensors_write(model: Model, path: Path) -> None:
    from . import safetensors_format

    safetensors_format.write(model, path)


FORMATS: dict[str, FormatSpec] = {
    spec.name: spec
    for spec in (
        FormatSpec("onnx", "ONNX model", (".onnx",), _onnx_read, _onnx_write),
        FormatSpec(
            "torch-state-dict",
            "PyTorch state_dict (torch.save)",
            (".pt", ".pth", ".bin", ".ckpt"),
            _torch_reader("torch-state-dict"),
            _torch_write,
        ),
        FormatSpec(
            "torchscript",
            "TorchScript archive (torch.jit.save)",
            (".pt", ".pth", ".ptl", ".jit", ".torchscript"),
            _torch_reader("torchscript"),
            _torch_write,
        ),
        FormatSpec(
            "torch-export",
            "torch.export program (torch.export.save)",
            (".pt2",),
            _torch_reader("torch-export"),
            _torch_write,
        ),
        FormatSpec("safetensors", "safetensors file", (".safetensors",), _safetensors_read, _safetensors_write),
    )
}

_ZIP_MAGIC = b"PK\x03\x04"


def _classify_torch_zip(path: Path) -> str | None:
    """Tell TorchScript, torch.export and torch.save archives apart by their entries."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    stems = {name.split("/", 1)[1] if "/" in name else name for name in names}
    if any(s.startswith("serialized_exported_program") or s.startswith("models/") for s in stems) or (
        "archive_format" in stems
    ):
        return "torch-export"
    if any(s.startswith("code/") for s in stems) and "constants.pkl" in stems:
        return "torchscript"
    if "data.pkl" in stems:
        return "torch-state-dict"
    return None


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 10:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 2 <= header_len <= size - 8 and head[8:9] == b"{"


def _looks_like_onnx(path: Path) -> bool:
    import onnx

    try:
        proto = onnx.load_model(os.fspath(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - any parse failure means "not ONNX"
        return False
    return proto.ir_version > 0 and proto.HasField("graph")


def detect_format(path: str | os.PathLike) -> str:
    """Name the format of a model file from its content, not its suffix."""
    path = Path(path)
    if not path.exists():
        raise FormatError(path, "no such file")
    if path.is_dir():
        raise FormatError(path, "is a directory, not a model file")
    size = path.stat().st_size
    if size == 0:
        raise FormatError(path, "file is empty")
    with path.open("rb") as f:
        head = f.read(64)
    if head.startswith(_ZIP_MAGIC):
        kind = _classify_torch_zip(path)
        if kind is None:
            raise FormatError(path, "zip archive that is not a PyTorch model (or is damaged)")
        return kind
    if _looks_like_safetensors(head, size):
        return "safetensors"
    if head[:1] == b"\x80":  # legacy (pre-zip) torch.save pickle stream
        return "torch-state-dict"
    if _looks_like_onnx(path):
        return "onnx"
    raise FormatError(path, "unknown model format (expected ONNX, PyTorch or safetensors)")


def read_model(path: str | os.PathLike) -> Model:
    """Read any supported model file."""
    path = Path(path)
    return FORMATS[detect_format(path)].read(path)


def model_files(path: str | os.PathLike, format_name: str) -> list[Path]:
    """Every file a model occupies on disk: the model file plus any ONNX external data files."""
    path = Path(path)
    if format_name != "onnx":
        return [path]
    from . import onnx_format

    return [path, *onnx_format.external_files(path)]


def check_output_suffix(format_name: str, path: str | os.PathLike) -> None:
    """Refuse an output name whose suffix does not fit the stored format."""
    spec = FORMATS[format_name]
    suffix = Path(path).suffix.lower()
    if suffix not in spec.suffixes:
        raise UsageError(
            path,
            f"suffix '{suffix or '(none)'}' does not fit a {spec.description}; use {' or '.join(spec.suffixes)}",
        )


def optimizer_state_tensors(model: Model) -> set[str]:
    """Names of the tensors that only a training checkpoint's optimizer (scheduler, scaler) state holds."""
    if model.format != "torch-state-dict":
        return set()
    from . import torch_format

    return torch_format.optimizer_state_tensors(model)


def drop_optimizer_state(model: Model, path: str | os.PathLike | None = None) -> tuple[Model, int]:
    """The model without its optimizer (scheduler, scaler) state, and how many tensors were dropped;
    models without any (every format but torch-state-dict checkpoints) come back unchanged with 0."""
    if model.format != "torch-state-dict":
        return model, 0
    from . import torch_format

    return torch_format.drop_optimizer_state(model, path)


def write_model(model: Model, path: str | os.PathLike) -> None:
    """Write a model in the format it came from."""
    check_output_suffix(model.format, path)
    FORMATS[model.format].write(model, Path(path))


def role_reasons(format_name: str, topology: bytes, tensors: list[tuple[str, str, int, TensorRole]]) -> list[str]:
    """Why each tensor (name, dtype, rank, stored role) has its role, recomputed from the topology.

    ONNX: the graph analysis the reader ran (formats.onnx_roles); a stored role that differs from
    what this version decides (an older encoder) is said so. Other formats have no graph to
    consult: dtype and rank decide, and the torch readers keep buffers and constants exact.
    """
    if format_name == "onnx":
        from . import onnx_format

        decisions = onnx_format.tensor_roles(topology)
        reasons = []
        for name, _dtype, _rank, role in tensors:
            decision = decisions.get(name)
            if decision is None:
                reasons.append("? not in the stored graph")
            elif decision.role != role:
                reasons.append(f"stored as {role.name.lower()}; this version decides {decision.reason}")
            else:
                reasons.append(decision.reason)
        return reasons
    reasons = []
    for _name, dtype, rank, role in tensors:
        if role != default_role(dtype, rank):
            reasons.append(f"{role.name.lower()}: a buffer or constant the {format_name} reader keeps exact")
        elif dtype in FLOAT_DTYPES:
            reasons.append(f"{role.name.lower()}: float with {rank} ax{'i' if rank == 1 else 'e'}s (no graph to consult)")
        else:
            reasons.append(f"exact: {dtype} data")
    return reasons
