"""Structured pruning without a graph: zero whole output channels, keep every shape.

For formats whose graph we cannot analyse (state_dict, TorchScript, .pt2, safetensors) the next
layer's inputs of a pruned channel cannot be located and removed safely, so channels are zeroed
instead of removed: every row (axis 0 = output channel) chosen for pruning becomes all-zero and
the coder skips such rows with its row mask, which is where the size saving comes from. Use an
ONNX model for physical removal.

Which tensors: float WEIGHT tensors whose layout (`nnc_tool.graph.layout`) has ``out_axis == 0``,
except
  * the last weight tensor of the model (by tensor order), which in torch models is the output
    layer: its rows are the model's outputs (e.g. class logits), not hidden channels;
  * tensors with "embed" in their name: embedding rows are vocabulary entries, not channels.
Both are listed in `report.skipped`.

Per tensor of C output channels, ``floor(sparsity * C + 0.5)`` channels are zeroed (at most C-1,
so a layer is never wiped out), those with the lowest importance: "l1" (sum |w| of the row),
"l2" (its Euclidean norm) or "random" (seeded by `config.seed` and the tensor's name).
Other importances fall back to l1 and allocations other than "uniform" to uniform, with a note.
Ties go to the lower channel index.

Alongside a zeroed row the matching entries of `<prefix>.bias` (next to `<prefix>.weight`) are
zeroed, and of a directly following BatchNorm when torch naming identifies it safely: a module B
with weight, bias, running_mean and running_var of shape [C] that is the next module in tensor
order after the conv and whose name is the conv's with the last Sequential index + 1
(``stem.0`` -> ``stem.1``), "conv" replaced by "bn" in the last component (``conv1`` -> ``bn1``)
or "_bn" appended (``dw`` -> ``dw_bn``). Its weight, bias and running_mean entries are zeroed
(running_var is kept positive), so the channel's output is exactly zero, as after removal.
"""
from __future__ import annotations

import zlib

import numpy as np

from ..graph.layout import WeightLayout
from ..model import Model, Tensor, TensorRole
from .config import LayerChange, PruneConfig, PruneReport
from .unstructured import make_report, replace_arrays, smallest_indices

__all__ = ["zero_channels"]

_IMPORTANCES = ("l1", "l2", "random")
_BN_FIELDS = ("weight", "bias", "running_mean")


def zero_channels(model: Model, config: PruneConfig, layouts: dict[str, WeightLayout]) -> tuple[Model, PruneReport]:
    """Zero the least important output channels of every eligible weight tensor."""
    notes: list[str] = []
    importance = config.importance
    if importance not in _IMPORTANCES:
        notes.append(f"importance '{importance}' needs a graph or calibration here; ranked by l1 instead")
        importance = "l1"
    if config.allocation != "uniform":
        notes.append(f"allocation '{config.allocation}' is not available without a graph; uniform instead")

    by_name = {t.name: i for i, t in enumerate(model.tensors)}
    weights = [i for i, t in enumerate(model.tensors) if t.role == TensorRole.WEIGHT and t.is_float]
    head = weights[-1] if weights else None
    modules = _module_order(model.tensors)

    replaced: dict[int, np.ndarray] = {}
    changes: list[LayerChange] = []
    skipped: list[str] = []
    for index in weights:
        tensor = model.tensors[index]
        layout = layouts.get(tensor.name)
        array = tensor.array
        if layout is None or layout.out_axis != 0 or array.ndim < 2:
            skipped.append(f"{tensor.name}: output channels are not known to lie on axis 0")
            continue
        if index == head:
            skipped.append(f"{tensor.name}: last weight tensor, probably the output layer (its rows are model outputs)")
            continue
        if "embed" in tensor.name.lower():
            skipped.append(f"{tensor.name}: embedding table (rows are vocabulary entries, not channels)")
            continue
        channels = array.shape[0]
        rows = array.reshape(channels, -1)
        before = int(np.count_nonzero(rows.any(axis=1)))
        count = min(int(np.floor(config.sparsity * channels + 0.5)), channels - 1)
        scores = _importance(rows, importance, config.seed, tensor.name)
        chosen = smallest_indices(scores, count)
        if chosen.size == 0:
            changes.append(LayerChange(tensor.name, before, before))
            continue
        out = np.array(array, copy=True, order="C")
        out[chosen] = 0
        replaced[index] = out
        changes.append(LayerChange(tensor.name, before, int(np.count_nonzero(out.reshape(channels, -1).any(axis=1)))))

        prefix = tensor.name[: -len(".weight")] if tensor.name.endswith(".weight") else None
        if prefix is None:
            continue
        followers = [f"{prefix}.bias"]
        bn = _following_batchnorm(prefix, channels, model.tensors, by_name, modules)
        if bn is not None:
            followers += [f"{bn}.{field}" for field in _BN_FIELDS]
        for name in followers:
            j = by_name.get(name)
            if j is None:
                continue
            other = replaced.get(j, model.tensors[j].array)
            if other.shape == (channels,) and model.tensors[j].is_float and model.tensors[j].role != TensorRole.EXACT:
                other = np.array(other, copy=True)
                other[chosen] = 0
                replaced[j] = other

    notes.append(
        "channels are zeroed, not removed: tensors keep their shape because without an analysable graph the"
        " next layer's inputs cannot be removed safely (use an ONNX model for physical removal);"
        " the coder skips the all-zero rows"
    )
    pruned = replace_arrays(model, replaced)
    return pruned, make_report("structured", model, pruned, changes, skipped, notes)


def _importance(rows: np.ndarray, importance: str, seed: int, name: str) -> np.ndarray:
    if importance == "random":
        # Seeded by the tensor's name, so the same model gives the same choice in every format.
        return np.random.default_rng([seed, zlib.crc32(name.encode())]).random(rows.shape[0])
    work = rows.astype(np.float64)
    if importance == "l2":
        return np.sqrt(np.square(work).sum(axis=1))
    return np.abs(work).sum(axis=1)


def _prefix(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _module_order(tensors: list[Tensor]) -> list[str]:
    """Module prefixes in order of their first tensor."""
    seen: dict[str, None] = {}
    for t in tensors:
        seen.setdefault(_prefix(t.name), None)
    return list(seen)


def _bn_candidates(prefix: str) -> set[str]:
    parent, _, last = prefix.rpartition(".")
    join = (parent + ".") if parent else ""
    found = {prefix + "_bn"}
    if last.isdigit():
        found.add(f"{join}{int(last) + 1}")
    if "conv" in last:
        found.add(join + last.replace("conv", "bn", 1))
    return found


def _following_batchnorm(
    prefix: str, channels: int, tensors: list[Tensor], by_name: dict[str, int], modules: list[str]
) -> str | None:
    """The BatchNorm module directly after module `prefix`, if naming and order identify it."""
    try:
        position = modules.index(prefix)
    except ValueError:
        return None
    if position + 1 >= len(modules):
        return None
    following = modules[position + 1]
    if following not in _bn_candidates(prefix):
        return None
    for field in ("weight", "bias", "running_mean", "running_var"):
        j = by_name.get(f"{following}.{field}")
        if j is None or tensors[j].array.shape != (channels,) or not tensors[j].is_float:
            return None
    return following
