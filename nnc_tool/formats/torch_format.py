"""PyTorch files: torch.save state_dicts/checkpoints, TorchScript archives and torch.export programs.

Topology layout (all three kinds)::

    b"NNCTORCH" | version byte (1) | u64 LE length n | n bytes UTF-8 JSON header | archive bytes

The JSON header always has "kind" and "tensors" (one entry per stored Tensor: name, dtype,
shape). The trailing archive is empty for state_dicts; for TorchScript and torch.export it
is the model re-saved by torch itself with every stored tensor zeroed, so it carries the
code/graph but no weight information (and compresses to almost nothing).

Security: state_dicts are only ever opened with `torch.load(..., weights_only=True)`; a
file that needs more than that is refused, never unpickled. We never put pickles of our own
in a topology (JSON only); the TorchScript/.pt2 archives are written and read by torch's
own restricted loaders.
"""
from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import os
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import torch

from ..errors import FormatError, UsageError
from ..fileio import atomic_output
from ..model import default_role, dtype_name, Model, numpy_dtype, Tensor, TensorRole

KINDS = ("torch-state-dict", "torchscript", "torch-export")

_MAGIC = b"NNCTORCH"
_VERSION = 1

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "uint16": torch.uint16,
    "int32": torch.int32,
    "uint32": torch.uint32,
    "int64": torch.int64,
    "uint64": torch.uint64,
    "bool": torch.bool,
}
_DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in _TORCH_DTYPES.items()}


# --------------------------------------------------------------------------- public API


def read(path: str | os.PathLike, kind: str) -> Model:
    """Read a PyTorch file of the given kind ("torch-state-dict", "torchscript", "torch-export")."""
    path = Path(path)
    if kind not in KINDS:
        raise ValueError(f"unknown torch file kind {kind!r}")
    if not path.is_file():
        raise FormatError(path, "no such file")
    if path.stat().st_size == 0:
        raise FormatError(path, "file is empty")
    with _quiet() as log:
        if kind == "torch-state-dict":
            return _read_state_dict(path)
        if kind == "torchscript":
            return _read_torchscript(path)
        return _read_export(path, log)


def write(model: Model, path: str | os.PathLike) -> None:
    """Write a Model read by `read` back in its original kind, atomically."""
    path = Path(path)
    header, blob = _unpack_topology(path, model.topology)
    if header.get("kind") != model.format or model.format not in KINDS:
        raise FormatError(path, f"topology is for '{header.get('kind')}', but the model is '{model.format}'")
    try:
        tensors = _stored_tensors(path, header, model)
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(path, f"model topology is damaged ({_reason(exc)})") from None
    with _quiet():
        if model.format == "torch-state-dict":
            _write_state_dict(path, header, tensors)
        elif model.format == "torchscript":
            _write_torchscript(path, header, blob, tensors)
        else:
            _write_export(path, header, blob, tensors)


# --------------------------------------------------------------------------- helpers


class _LogCapture(logging.Handler):
    """Keeps torch log records away from the user; remembers logged exceptions for our message."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.exceptions: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.exceptions.append(record.exc_info[1])


@contextmanager
def _quiet() -> Iterator[_LogCapture]:
    # torch warns about protocol versions and deprecated APIs, and torch.export.load logs
    # full tracebacks before raising a vague error; users should see our one line only.
    # torch installs its own stderr handler on this logger, so the handlers are swapped.
    capture = _LogCapture()
    logger = logging.getLogger("torch.export")
    handlers, propagate = logger.handlers, logger.propagate
    logger.handlers, logger.propagate = [capture], False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield capture
    finally:
        logger.handlers, logger.propagate = handlers, propagate


def _reason(exc: BaseException) -> str:
    """First sentence of an exception message, without ANSI codes, for a one-line error."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    line = text.splitlines()[0].strip() if text else ""
    line = line.split(". ")[0].rstrip(".")
    if not line:
        line = type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def _pack_topology(header: dict[str, Any], blob: bytes = b"") -> bytes:
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return _MAGIC + bytes([_VERSION]) + struct.pack("<Q", len(text)) + text + blob


def _unpack_topology(path: Path, topology: bytes) -> tuple[dict[str, Any], bytes]:
    start = len(_MAGIC) + 9
    if len(topology) < start or not topology.startswith(_MAGIC) or topology[len(_MAGIC)] != _VERSION:
        raise FormatError(path, "model topology is not a PyTorch topology of a known version")
    (length,) = struct.unpack("<Q", topology[len(_MAGIC) + 1 : start])
    if length > len(topology) - start:
        raise FormatError(path, "model topology is truncated")
    try:
        header = json.loads(topology[start : start + length].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise FormatError(path, "model topology header is not valid JSON") from None
    return header, bytes(topology[start + length :])


def _torch_dtype_name(path: Path, name: str, tensor: torch.Tensor) -> str:
    if tensor.layout != torch.strided or tensor.is_quantized:
        raise FormatError(path, f"tensor '{name}' is sparse or quantized, which is not supported")
    if tensor.dtype not in _DTYPE_NAMES:
        raise FormatError(path, f"tensor '{name}' has dtype {tensor.dtype}, which is not supported")
    return _DTYPE_NAMES[tensor.dtype]


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A C-contiguous numpy copy that owns its data, in the tensor's own dtype."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        # numpy has no bfloat16; reinterpret the bits so no value ever passes through float32.
        array = tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
        array = tensor.contiguous().numpy()
    return np.array(array, copy=True, order="C")


def _from_numpy(array: np.ndarray, name: str) -> torch.Tensor:
    """A torch tensor with dtype `name` holding `array`'s values."""
    if dtype_name(array.dtype) != name:
        array = array.astype(numpy_dtype(name))
    # Not np.ascontiguousarray: it turns 0-d arrays into 1-d ones.
    if not (array.flags.c_contiguous and array.flags.writeable):  # torch.from_numpy warns on read-only memory
        array = array.copy(order="C")
    if name == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _make_tensor(path: Path, name: str, tensor: torch.Tensor, role: TensorRole | None = None) -> tuple[Tensor, dict[str, Any]]:
    dtype = _torch_dtype_name(path, name, tensor)
    array = _to_numpy(tensor)
    entry = {"name": name, "dtype": dtype, "shape": list(array.shape)}
    return Tensor(name, array, default_role(dtype, array.ndim) if role is None else role), entry


def _stored_tensors(path: Path, header: dict[str, Any], model: Model) -> dict[str, torch.Tensor]:
    """The model's tensors as torch tensors, checked against the dtypes/shapes in the topology."""
    by_name = model.tensor_map()
    # Entries with "same_as" are aliases: they take their source's values and store nothing.
    expected = {e["name"]: e for e in header.get("tensors", []) if "same_as" not in e}
    unknown = by_name.keys() - expected.keys()
    if unknown:
        raise FormatError(path, f"tensor '{sorted(unknown)[0]}' is not part of this model")
    result = {}
    for name, entry in expected.items():
        if name not in by_name:
            raise FormatError(path, f"tensor '{name}' is missing from the model")
        array = by_name[name].array
        if list(array.shape) != entry["shape"]:
            raise FormatError(path, f"tensor '{name}' has shape {tuple(array.shape)}, expected {tuple(entry['shape'])}")
        result[name] = _from_numpy(array, entry["dtype"])
    return result


def _view_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    return (tensor.dtype, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))


def _storage_key(tensor: torch.Tensor) -> tuple[int, int] | None:
    storage = tensor.untyped_storage()
    # Empty storages all report data_ptr 0; they share nothing worth keeping.
    if storage.nbytes() == 0:
        return None
    return storage.data_ptr(), storage.nbytes()


# --------------------------------------------------------------------------- state_dicts


# Matches the class/function torch's weights-only unpickler refused. A damaged legacy file
# can also trip this check, but then the name is cut short (e.g. "torch._utils.").
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([A-Za-z_][\w.]*\.[A-Za-z_]\w*)\b(?!\.)")


def _load_weights_only(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        match = _REFUSED_GLOBAL.search(re.sub(r"\x1b\[[0-9;]*m", "", str(exc)))
        if match:
            raise FormatError(
                path,
                f"file contains arbitrary Python objects ({match.group(1)}); we refuse to unpickle it "
                "(torch.load weights_only=True failed) - re-save it as a state_dict "
                "(torch.save(model.state_dict(), ...)) or as safetensors",
            ) from None
        raise FormatError(path, f"damaged or not a torch.save file ({_reason(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - torch raises anything from RuntimeError to IndexError on bad bytes
        raise FormatError(path, f"damaged or not a torch.save file ({_reason(exc)})") from None


_TRAINING_STATE_KEYS = re.compile(r"optim|scheduler|scaler|ema_state|rng_state", re.IGNORECASE)
# The keys that make a dict the state_dict() of a torch.optim.Optimizer, an LR scheduler or an AMP
# GradScaler, whatever key holds it.
_TRAINING_STATE_SHAPES = (
    frozenset({"state", "param_groups"}),
    frozenset({"last_epoch", "base_lrs"}),
    frozenset({"scale", "growth_factor", "backoff_factor", "growth_interval"}),
)


def _has_training_state_keys(keys: set[Any]) -> bool:
    return any(shape <= keys for shape in _TRAINING_STATE_SHAPES)


def _is_training_state(keys: list[Any]) -> bool:
    """Checkpoint entries that the network never consumes (optimizer moments, scheduler state).

    Their scale has nothing to do with the weights' (Adam moments are ~1e-4), so quantizing
    them with the weight step would wipe them out; they are coded losslessly instead.
    """
    return any(isinstance(k, str) and _TRAINING_STATE_KEYS.search(k) for k in keys)


class _Collector:
    """Turns a loaded object tree into JSON nodes plus a list of unique tensors.

    Tensors sharing storage are stored once when they are the same view, or as views of a
    base tensor that covers its whole storage; other partial overlaps are stored as copies
    (sharing is then lost, values are kept).
    """

    def __init__(self, path: Path):
        self.path = path
        self.leaves: list[tuple[str, torch.Tensor, dict[str, Any]]] = []
        self.used_names: set[str] = set()
        self.training_state: set[str] = set()  # optimizer/scheduler tensors: kept exact
        self._training_depth = 0  # > 0 inside a dict recognised as optimizer/scheduler/scaler state

    def unique_name(self, keys: list[Any]) -> str:
        # Names are labels only: the JSON node says where a tensor goes, so keys containing
        # "." or "/" need no escaping. A top-level state_dict keeps its keys as names.
        base = "/".join(str(k) for k in keys) or "tensor"
        name, n = base, 1
        while name in self.used_names:
            n += 1
            name = f"{base}#{n}"
        self.used_names.add(name)
        return name

    def encode(self, obj: Any, keys: list[Any]) -> Any:
        if isinstance(obj, torch.Tensor):
            node: dict[str, Any] = {}
            if isinstance(obj, torch.nn.Parameter):
                node["param"] = True
            if obj.requires_grad:
                node["grad"] = True
            name = self.unique_name(keys)
            if self._training_depth or _is_training_state(keys):
                self.training_state.add(name)
            self.leaves.append((name, obj, node))
            return node
        if type(obj) in (dict, collections.OrderedDict):
            training = _has_training_state_keys(set(obj))
            self._training_depth += training
            try:
                node = {"dict": [[self.encode_key(k), self.encode(v, keys + [k])] for k, v in obj.items()]}
            finally:
                self._training_depth -= training
            if type(obj) is collections.OrderedDict:
                node["ordered"] = True
                # state_dict() attaches per-module versions as `_metadata`; load_state_dict
                # uses them to upgrade old layouts (e.g. BatchNorm's num_batches_tracked).
                attrs = vars(obj)
                if attrs:
                    node["attrs"] = [[k, self.encode(v, keys + [k])] for k, v in attrs.items()]
            return node
        if type(obj) is list:
            return {"list": [self.encode(v, keys + [i]) for i, v in enumerate(obj)]}
        if type(obj) is tuple:
            return {"tuple": [self.encode(v, keys + [i]) for i, v in enumerate(obj)]}
        if type(obj) in (set, frozenset):
            return {type(obj).__name__: [self.encode(v, keys + [i]) for i, v in enumerate(obj)]}
        return self.encode_plain(obj, keys)

    def encode_key(self, key: Any) -> Any:
        if isinstance(key, torch.Tensor):
            raise FormatError(self.path, "a dict key is a tensor, which is not supported")
        return self.encode(key, ["<key>"]) if type(key) is tuple else self.encode_plain(key, [])

    def encode_plain(self, obj: Any, keys: list[Any]) -> Any:
        if obj is None or type(obj) in (bool, int, float, str):
            return {"v": obj}
        if type(obj) is bytes:
            return {"bytes": obj.hex()}
        if type(obj) is complex:
            return {"complex": [obj.real, obj.imag]}
        if type(obj) is torch.Size:
            return {"size": list(obj)}
        if type(obj) is torch.dtype:
            return {"torch_dtype": str(obj).removeprefix("torch.")}
        if type(obj) is torch.device:
            return {"device": str(obj)}
        where = "/".join(str(k) for k in keys) or "the top level"
        raise FormatError(self.path, f"value of type {type(obj).__name__} at '{where}' is not supported")

    def finish(self) -> tuple[list[Tensor], list[dict[str, Any]]]:
        """Decide storage sharing, fill in the tensor nodes, and convert the unique tensors."""
        groups: dict[Any, list[int]] = {}
        for index, (_, tensor, _) in enumerate(self.leaves):
            key = _storage_key(tensor)
            groups.setdefault(key if key is not None else ("alone", index), []).append(index)
        stored: dict[int, str] = {}  # leaf index -> stored tensor name
        for members in groups.values():
            views: dict[tuple[Any, ...], int] = {}
            for i in members:
                views.setdefault(_view_key(self.leaves[i][1]), i)
            base = self._whole_storage_base(list(views.values()))
            for i in members:
                name, tensor, node = self.leaves[i]
                first = views[_view_key(tensor)]
                if base is not None and first != base:
                    node["tensor"] = self.leaves[base][0]
                    node["view"] = [tensor.storage_offset(), list(tensor.shape), list(tensor.stride())]
                else:
                    node["tensor"] = self.leaves[first][0]
                    stored.setdefault(first, self.leaves[first][0])
                    if base is not None:
                        stored.setdefault(base, self.leaves[base][0])
        tensors, entries = [], []
        for i in sorted(stored):
            role = TensorRole.EXACT if stored[i] in self.training_state else None
            tensor, entry = _make_tensor(self.path, stored[i], self.leaves[i][1], role)
            tensors.append(tensor)
            entries.append(entry)
        return tensors, entries

    def _whole_storage_base(self, firsts: list[int]) -> int | None:
        """A leaf that is a plain contiguous tensor over its entire storage, if views differ."""
        if len(firsts) < 2 or len({self.leaves[i][1].dtype for i in firsts}) != 1:
            return None
        for i in firsts:
            tensor = self.leaves[i][1]
            if (
                tensor.storage_offset() == 0
                and tensor.is_contiguous()
                and tensor.numel() * tensor.element_size() == tensor.untyped_storage().nbytes()
            ):
                return i
        return None


def optimizer_state_tensors(model: Model) -> set[str]:
    """Names of the stored tensors that only optimizer, LR-scheduler or GradScaler state holds.

    A torch-state-dict checkpoint's state is recognised by shape, under any key: a dict with
    'state' and 'param_groups' (torch.optim.Optimizer.state_dict()), with 'last_epoch' and
    'base_lrs' (LR schedulers), or with GradScaler's 'scale' and growth settings. Empty for
    every other model.
    """
    if model.format != "torch-state-dict":
        return set()
    header, _ = _unpack_topology(Path("<model>"), model.topology)
    kept = _tensor_references(_without_training_state(header["root"]))
    return {t.name for t in model.tensors} - kept


def drop_optimizer_state(model: Model, path: str | os.PathLike | None = None) -> tuple[Model, int]:
    """The checkpoint without its optimizer/scheduler/scaler state (see `optimizer_state_tensors`),
    and how many stored tensors went with it. The rest (model weights, epoch, step, ...) is kept as
    it was; a model without such state comes back unchanged with 0."""
    dropped = optimizer_state_tensors(model)
    if model.format != "torch-state-dict" or not dropped:
        return model, 0
    header, blob = _unpack_topology(Path("<model>"), model.topology)
    root = _without_training_state(header["root"])
    if root is None:
        raise UsageError(path, "the checkpoint holds nothing but optimizer state: --drop-optimizer-state would leave nothing")
    header = {**header, "root": root, "tensors": [e for e in header["tensors"] if e["name"] not in dropped]}
    tensors = [t for t in model.tensors if t.name not in dropped]
    return replace(model, topology=_pack_topology(header, blob), tensors=tensors), len(dropped)


def _is_training_state_node(node: Any) -> bool:
    if not isinstance(node, dict) or "dict" not in node:
        return False
    keys = {key["v"] for key, _ in node["dict"] if isinstance(key, dict) and "v" in key}
    return _has_training_state_keys(keys)


def _without_training_state(node: Any) -> Any:
    """The topology node with every dict entry that holds training state (or a list/tuple of
    only such states, as Lightning's 'optimizer_states') removed; None if the node itself is one."""
    if _is_training_state_node(node):
        return None
    if not isinstance(node, dict):
        return node
    if "dict" in node:
        entries = []
        for key, value in node["dict"]:
            items = value.get("list", value.get("tuple")) if isinstance(value, dict) else None
            if _is_training_state_node(value) or (items and all(_is_training_state_node(v) for v in items)):
                continue
            entries.append([key, _without_training_state(value)])
        return {**node, "dict": entries}
    for container in ("list", "tuple", "set", "frozenset"):
        if container in node:
            return {**node, container: [_without_training_state(v) for v in node[container]]}
    return node


def _tensor_references(node: Any) -> set[str]:
    """Names of the stored tensors a topology node refers to."""
    names: set[str] = set()
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("tensor"), str):
                names.add(item["tensor"])
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return names


def _read_state_dict(path: Path) -> Model:
    with path.open("rb") as f:
        legacy = f.read(4) != b"PK\x03\x04"
    obj = _load_weights_only(path)
    collector = _Collector(path)
    try:
        root = collector.encode(obj, [])
        tensors, entries = collector.finish()
        header = {"kind": "torch-state-dict", "legacy": legacy, "root": root, "tensors": entries}
        topology = _pack_topology(header)
    except (RecursionError, ValueError) as exc:  # a circular or absurdly deep structure
        raise FormatError(path, f"checkpoint structure cannot be stored ({_reason(exc)})") from None
    return Model(format="torch-state-dict", topology=topology, tensors=tensors)


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if "tensor" in node:
        value = tensors[node["tensor"]]
        if "view" in node:
            offset, shape, stride = node["view"]
            value = value.as_strided(shape, stride, offset)
        if node.get("param"):
            return torch.nn.Parameter(value, requires_grad=bool(node.get("grad")))
        return value.requires_grad_() if node.get("grad") else value
    if "dict" in node:
        items = [(_decode(k, tensors), _decode(v, tensors)) for k, v in node["dict"]]
        if not node.get("ordered"):
            return dict(items)
        result = collections.OrderedDict(items)
        for attr, value in node.get("attrs", []):
            setattr(result, attr, _decode(value, tensors))
        return result
    if "list" in node:
        return [_decode(v, tensors) for v in node["list"]]
    if "tuple" in node:
        return tuple(_decode(v, tensors) for v in node["tuple"])
    if "set" in node:
        return {_decode(v, tensors) for v in node["set"]}
    if "frozenset" in node:
        return frozenset(_decode(v, tensors) for v in node["frozenset"])
    if "v" in node:
        return node["v"]
    if "bytes" in node:
        return bytes.fromhex(node["bytes"])
    if "complex" in node:
        return complex(*node["complex"])
    if "size" in node:
        return torch.Size(node["size"])
    if "torch_dtype" in node:
        return getattr(torch, node["torch_dtype"])
    if "device" in node:
        return torch.device(node["device"])
    raise ValueError(f"unknown topology node {sorted(node)}")


def _write_state_dict(path: Path, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    try:
        obj = _decode(header["root"], tensors)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise FormatError(path, f"model topology is damaged ({_reason(exc)})") from None
    with atomic_output(path) as tmp, tmp.open("wb") as f:
        # A file object (not the temp path) keeps torch's archive folder name neutral.
        torch.save(obj, f, _use_new_zipfile_serialization=not header.get("legacy", False))


# --------------------------------------------------------------------------- archives


def _alias_entries(path: Path, named: list[tuple[str, torch.Tensor]], role: TensorRole | None = None) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """Tensors and header entries for an archive's named tensors; exact aliases are stored once."""
    tensors, entries = [], []
    seen: dict[tuple[Any, ...], str] = {}
    for name, tensor in named:
        storage = _storage_key(tensor)
        view = (storage, _view_key(tensor)) if storage is not None else None
        if view is not None and view in seen:
            entries.append({"name": name, "same_as": seen[view]})
            continue
        if view is not None:
            seen[view] = name
        tensor_obj, entry = _make_tensor(path, name, tensor, role)
        tensors.append(tensor_obj)
        entries.append(entry)
    return tensors, entries


def _fill(targets: list[tuple[str, torch.Tensor]], entries: list[dict[str, Any]], tensors: dict[str, torch.Tensor]) -> None:
    """Copy decoded values into an archive's own tensors (aliases get their source's values)."""
    by_name = {e["name"]: e for e in entries}
    with torch.no_grad():
        for name, target in targets:
            entry = by_name[name]
            target.copy_(tensors[entry.get("same_as", name)])


def _archive_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise FormatError(path, f"damaged or not a zip archive ({_reason(exc)})") from None


def _torchscript_tensors(module: torch.jit.ScriptModule) -> list[tuple[str, torch.Tensor]]:
    # keep_vars so in-place edits reach the module's own parameters and buffers.
    return list(module.state_dict(keep_vars=True).items())


def _read_torchscript(path: Path) -> Model:
    names = _archive_names(path)
    extra = {n.split("/extra/", 1)[1]: "" for n in names if "/extra/" in n and not n.endswith("/")}
    try:
        module = torch.jit.load(path, map_location="cpu", _extra_files=extra)
    except Exception as exc:  # noqa: BLE001 - torch's loader raises RuntimeError and friends
        raise FormatError(path, f"damaged or not a TorchScript archive ({_reason(exc)})") from None
    named = _torchscript_tensors(module)
    tensors, entries = _alias_entries(path, named)
    with torch.no_grad():
        for _, tensor in named:
            tensor.zero_()
    buffer = io.BytesIO()
    torch.jit.save(module, buffer, _extra_files=extra)
    header = {"kind": "torchscript", "tensors": entries, "extra_files": sorted(extra)}
    archive = _without_debug_info(buffer.getvalue())
    return Model(format="torchscript", topology=_pack_topology(header, archive), tensors=tensors)


def _without_debug_info(archive: bytes) -> bytes:
    """Drop TorchScript's *.debug_pkl entries (source ranges for error messages only).

    They are more than half of a small model's compressed topology, and torch.jit.load
    works without them.
    """
    stripped = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as source, zipfile.ZipFile(stripped, "w", zipfile.ZIP_STORED) as target:
        for entry in source.infolist():
            if not entry.filename.endswith(".debug_pkl"):
                target.writestr(entry, source.read(entry.filename))
    return stripped.getvalue()


@contextlib.contextmanager
def _damaged_topology_errors(path: Path) -> Iterator[None]:
    """torch's loaders fail in many ways on a bad archive; the user gets one line."""
    try:
        yield
    except FormatError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise FormatError(path, f"model topology is damaged ({_reason(exc)})") from None


def _write_torchscript(path: Path, header: dict[str, Any], blob: bytes, tensors: dict[str, torch.Tensor]) -> None:
    extra = {name: "" for name in header.get("extra_files", [])}
    with _damaged_topology_errors(path):
        module = torch.jit.load(io.BytesIO(blob), map_location="cpu", _extra_files=extra)
        targets = _torchscript_tensors(module)
        _check_targets(header, targets)
        _fill(targets, header["tensors"], tensors)
    with atomic_output(path) as tmp, tmp.open("wb") as f:
        torch.jit.save(module, f, _extra_files=extra)


def _export_tensors(program: Any) -> list[tuple[str, torch.Tensor, str]]:
    """(key, tensor, source) for the program's parameters/buffers and tensor constants."""
    items = [(k, v, "state_dict") for k, v in program.state_dict.items()]
    # Constants may also hold script objects; only tensors carry numbers we can code.
    items += [(k, v, "constants") for k, v in program.constants.items() if isinstance(v, torch.Tensor)]
    return items


def _export_names(items: list[tuple[str, torch.Tensor, str]]) -> list[str]:
    # State-dict keys are module paths and cannot collide among themselves; a constant named
    # like one (should torch ever allow it) gets a prefix so names stay unique.
    taken = {k for k, _, source in items if source == "state_dict"}
    return [k if source == "state_dict" or k not in taken else f"constants/{k}" for k, _, source in items]


def _read_export(path: Path, log: _LogCapture) -> Model:
    _archive_names(path)
    try:
        # A file object, because torch.export.load only takes paths ending in ".pt2" directly.
        with path.open("rb") as f:
            program = torch.export.load(f)
    except Exception as exc:  # noqa: BLE001
        # torch.export.load raises a generic error and logs the real cause; report the cause.
        cause = log.exceptions[-1] if log.exceptions else exc
        raise FormatError(path, f"damaged or not a torch.export archive ({_reason(cause)})") from None
    items = _export_tensors(program)
    names = _export_names(items)
    tensors, entries = [], []
    state = [(n, t) for n, (_, t, s) in zip(names, items) if s == "state_dict"]
    consts = [(n, t) for n, (_, t, s) in zip(names, items) if s == "constants"]
    for group, role in ((state, None), (consts, TensorRole.EXACT)):
        # Constants are lifted literals and non-persistent buffers (masks, tables, indices):
        # nothing proves they are learned, so they are coded exactly.
        group_tensors, group_entries = _alias_entries(path, group, role)
        tensors += group_tensors
        entries += group_entries
    with torch.no_grad():
        for _, tensor, _ in items:
            tensor.zero_()
    buffer = io.BytesIO()
    try:
        torch.export.save(program, buffer)
    except Exception as exc:  # noqa: BLE001
        raise FormatError(path, f"cannot re-save the exported program ({_reason(exc)})") from None
    header = {"kind": "torch-export", "tensors": entries}
    return Model(format="torch-export", topology=_pack_topology(header, buffer.getvalue()), tensors=tensors)


def _write_export(path: Path, header: dict[str, Any], blob: bytes, tensors: dict[str, torch.Tensor]) -> None:
    with _damaged_topology_errors(path):
        program = torch.export.load(io.BytesIO(blob))
        items = _export_tensors(program)
        targets = [(n, t) for n, (_, t, _) in zip(_export_names(items), items)]
        _check_targets(header, targets)
        _fill(targets, header["tensors"], tensors)
    with atomic_output(path) as tmp, tmp.open("wb") as f:
        torch.export.save(program, f)


def _check_targets(header: dict[str, Any], targets: list[tuple[str, torch.Tensor]]) -> None:
    if [name for name, _ in targets] != [e["name"] for e in header["tensors"]]:
        raise ValueError("archive tensors do not match the topology header")
