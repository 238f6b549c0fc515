"""Structured pruning of ONNX graphs: whole channels are physically removed.

Pipeline: `analyse_channels` (nnc_tool.graph.onnx_channels) finds the channel groups -> an
importance score per channel -> an allocation (how many channels each group loses) ->
`remove_channels` slices every producer/consumer tensor, fixes Conv ``group`` attributes and
shape constants -> optionally `refit.refit_pruned` repairs the damage with calibration data.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import UsageError
from ..formats import onnx_format
from ..graph.onnx_channels import ChannelGroup, ChannelSlice, analyse_channels, constant_arrays, node_labels
from ..model import Model, TensorRole
from .config import LayerChange, PruneConfig, PruneReport, calibration_rows

__all__ = [
    "prune_structured_onnx",
    "channel_scores",
    "allocate",
    "choose_channels",
    "remove_channels",
    "weight_parameter_count",
]

_LEARNED_ROLES = (TensorRole.WEIGHT, TensorRole.NONWEIGHT)

# Shapley coalitions are sampled down to (1 - sparsity - margin) of a layer's channels.
SHAPLEY_COALITION_MARGIN = 0.15


def _parameters(model: Model) -> tuple[int, int]:
    """(float weight/non-weight parameters, how many of them are zero)."""
    count = zeros = 0
    for tensor in model.tensors:
        if tensor.role in _LEARNED_ROLES and tensor.is_float:
            count += tensor.array.size
            zeros += int(np.count_nonzero(tensor.array == 0))
    return count, zeros


def weight_parameter_count(
    proto: onnx.ModelProto, ops: tuple[str, ...] = ("Conv", "ConvTranspose", "Gemm", "MatMul")
) -> int:
    """Elements of the constant weight inputs (input 1) of `ops` nodes in the main graph."""
    arrays = constant_arrays(proto.graph)
    seen: set[str] = set()
    total = 0
    for node in proto.graph.node:
        if node.op_type in ops and len(node.input) > 1 and node.input[1] in arrays and node.input[1] not in seen:
            seen.add(node.input[1])
            total += arrays[node.input[1]].size
    return total


# ---- importance ------------------------------------------------------------------------------------
def _unit_rows(array: np.ndarray, piece: ChannelSlice, size: int) -> np.ndarray:
    """The slice as a [size, -1] matrix: row u holds everything of the group's channel u."""
    moved = np.moveaxis(np.asarray(array, dtype=np.float64), piece.axis, 0)
    return moved[piece.offset : piece.offset + size * piece.block].reshape(size, -1)


def _normalised(score: np.ndarray) -> np.ndarray:
    mean = float(np.mean(score)) if score.size else 0.0
    return score / mean if mean > 0 else np.ones_like(score)


def _norm_scores(
    arrays: dict[str, np.ndarray],
    group: ChannelGroup,
    kinds: tuple[str, ...],
    order: int,
) -> np.ndarray | None:
    """Mean over the group's producers of `kinds` of per-channel norms, each normalised by its layer's mean."""
    total = np.zeros(group.size)
    used = 0
    for piece in group.producers:
        if piece.kind not in kinds or piece.tensor not in arrays:
            continue
        rows = _unit_rows(arrays[piece.tensor], piece, group.size)
        norm = np.abs(rows).sum(axis=1) if order == 1 else np.sqrt((rows**2).sum(axis=1))
        total += _normalised(norm)
        used += 1
    return total / used if used else None


def channel_scores(
    proto: onnx.ModelProto, groups: list[ChannelGroup], config: PruneConfig, notes: list[str] | None = None
) -> dict[str, np.ndarray]:
    """Importance of every channel of every group (higher = more important), by `config.importance`."""
    notes = notes if notes is not None else []
    arrays = constant_arrays(proto.graph)
    scores: dict[str, np.ndarray] = {}
    method = config.importance
    if method == "random":
        rng = np.random.default_rng(config.seed)
        return {g.name: rng.random(g.size) for g in groups}
    if method in ("activation", "shapley"):
        from . import importance as data_importance  # written separately; imported only when needed

        if config.calibration is None:
            raise UsageError(None, f"{method} importance needs calibration data (--calib)")
        sites = [data_importance.MaskSite(g.name, g.size, list(g.mask_values)) for g in groups if g.mask_values]
        work = onnx.ModelProto()
        work.CopyFrom(proto)
        calibration = calibration_rows(config.calibration)
        if not sites:
            found = {}
        elif method == "activation":
            found = data_importance.activation_importance(work, sites, calibration)
        else:
            # Restrict the game to coalitions a bit larger than what pruning keeps: measured on the
            # samples, this ranks far better than the plain average over all coalition sizes
            # (resnet 50 % without refit: 28 % vs 12 % accuracy; mobilenet: 37 % vs 22 %).
            found = data_importance.shapley_importance(
                work, sites, calibration, config.shapley_permutations, config.seed,
                min_kept_fraction=max(0.0, 1.0 - config.sparsity - SHAPLEY_COALITION_MARGIN),
            )
        for group in groups:
            if group.name in found:
                scores[group.name] = np.asarray(found[group.name], dtype=np.float64).reshape(group.size)
        missing = [g for g in groups if g.name not in scores]
        if missing:
            notes.append(
                f"{method} importance unavailable for {len(missing)} group(s) without a mask site; used l1 for: "
                + ", ".join(g.name for g in missing[:8])
                + (" ..." if len(missing) > 8 else "")
            )
        groups = missing
        method = "l1"
    fallback: list[str] = []
    for group in groups:
        score = None
        if method == "bn":
            score = _norm_scores(arrays, group, ("bn_scale", "norm_scale"), 1)
            if score is None:
                fallback.append(group.name)
        if score is None:
            score = _norm_scores(arrays, group, ("weight",), 2 if method == "l2" else 1)
        if score is None:  # cannot happen for prunable groups (they have a weight producer)
            score = np.ones(group.size)
        scores[group.name] = score
    if fallback:
        notes.append(
            f"bn importance: {len(fallback)} group(s) without BatchNorm ranked by l1 instead: "
            + ", ".join(fallback[:8])
            + (" ..." if len(fallback) > 8 else "")
        )
    return scores


# ---- allocation ------------------------------------------------------------------------------------
def _round(value: float) -> int:
    return int(np.floor(value + 0.5))


def allocate(
    proto: onnx.ModelProto,
    groups: list[ChannelGroup],
    scores: dict[str, np.ndarray],
    config: PruneConfig,
    notes: list[str] | None = None,
) -> dict[str, int]:
    """Channels to remove per group (never all of a group), keeping multiples of config.channel_multiple."""
    counts = _allocate_exact(proto, groups, scores, config, notes)
    return round_to_channel_multiple(counts, groups, config.channel_multiple)


def round_to_channel_multiple(counts: dict[str, int], groups: list[ChannelGroup], multiple: int) -> dict[str, int]:
    """Adjust removals so each group with at least `multiple` channels keeps a multiple of it (nearest, >= one block)."""
    if multiple <= 1:
        return counts
    adjusted = dict(counts)
    for group in groups:
        if group.size < multiple or group.name not in counts:
            continue
        keep = group.size - counts[group.name]
        keep = min(group.size, max(multiple, _round(keep / multiple) * multiple))
        adjusted[group.name] = group.size - keep
    return adjusted


def _allocate_exact(
    proto: onnx.ModelProto,
    groups: list[ChannelGroup],
    scores: dict[str, np.ndarray],
    config: PruneConfig,
    notes: list[str] | None = None,
) -> dict[str, int]:
    notes = notes if notes is not None else []
    sparsity = config.sparsity
    counts: dict[str, int] = {}
    if config.allocation == "uniform":
        for group in groups:
            counts[group.name] = max(0, min(_round(sparsity * group.size), group.size - 1))
        return counts
    if config.allocation == "global":
        entries: list[tuple[float, int, int]] = []
        for gi, group in enumerate(groups):
            normalised = _normalised(np.asarray(scores[group.name], dtype=np.float64))
            entries.extend((float(v), gi, ci) for ci, v in enumerate(normalised))
        budget = _round(sparsity * len(entries))
        left = {g.name: g.size for g in groups}
        for group in groups:
            counts[group.name] = 0
        for _value, gi, _ci in sorted(entries):
            if budget <= 0:
                break
            name = groups[gi].name
            if left[name] > 1:
                left[name] -= 1
                counts[name] += 1
                budget -= 1
        return counts
    if config.allocation == "sensitivity":
        from . import importance as data_importance

        if config.calibration is None:
            raise UsageError(None, "sensitivity allocation needs calibration data (--calib)")
        with_sites = [g for g in groups if g.mask_values]
        sites = [data_importance.MaskSite(g.name, g.size, list(g.mask_values)) for g in with_sites]
        work = onnx.ModelProto()
        work.CopyFrom(proto)
        found = {}
        if sites:
            found = data_importance.sensitivity_allocation(
                work, sites, {g.name: scores[g.name] for g in with_sites}, calibration_rows(config.calibration), sparsity
            )
        for group in groups:
            if group.name in found:
                counts[group.name] = max(0, min(int(found[group.name]), group.size - 1))
            else:
                counts[group.name] = max(0, min(_round(sparsity * group.size), group.size - 1))
        without = [g.name for g in groups if g.name not in found]
        if without:
            notes.append(f"sensitivity allocation: uniform share for {len(without)} group(s) without a mask site")
        return counts
    raise UsageError(None, f"unknown allocation {config.allocation!r}")


def choose_channels(scores: dict[str, np.ndarray], counts: dict[str, int]) -> dict[str, np.ndarray]:
    """The `counts[name]` lowest-scoring channels of every group, sorted."""
    chosen: dict[str, np.ndarray] = {}
    for name, count in counts.items():
        if count > 0:
            order = np.argsort(np.asarray(scores[name]), kind="stable")
            chosen[name] = np.sort(order[:count])
    return chosen


# ---- the rewrite --------------------------------------------------------------------------------------
def _indices(piece: ChannelSlice, units: np.ndarray) -> np.ndarray:
    if units.size == 0:
        return np.zeros(0, dtype=np.int64)
    starts = piece.offset + np.asarray(units, dtype=np.int64) * piece.block
    return (starts[:, None] + np.arange(piece.block)[None, :]).reshape(-1)


def remove_channels(
    proto: onnx.ModelProto, groups: list[ChannelGroup], removal: dict[str, np.ndarray]
) -> tuple[onnx.ModelProto, dict[tuple[str, int], np.ndarray]]:
    """A copy of `proto` with channels `removal[group name]` (channel indices) physically removed.

    Returns the new model and, for every sliced (tensor, axis), the kept indices of the original.
    Only prunable groups may be named in `removal`.
    """
    by_name = {g.name: g for g in groups}
    deleted: dict[tuple[str, int], set[int]] = defaultdict(set)
    fixes: dict[tuple[str, int], int] = defaultdict(int)
    touched_values: set[str] = set()
    for name, units in removal.items():
        group = by_name[name]
        units = np.unique(np.asarray(units, dtype=np.int64))
        if units.size == 0:
            continue
        if not group.prunable:
            raise ValueError(f"channel group {name} is not prunable: {group.reason}")
        if units[0] < 0 or units[-1] >= group.size or units.size >= group.size:
            raise ValueError(f"invalid channels to remove from {name}")
        for piece in group.producers + group.consumers:
            deleted[(piece.tensor, piece.axis)].update(_indices(piece, units).tolist())
        for fix in group.shape_fixes:
            fixes[(fix.tensor, fix.index)] += int(units.size) * fix.block
        touched_values.update(group.values)

    result = onnx.ModelProto()
    result.CopyFrom(proto)
    graph = result.graph
    arrays = constant_arrays(graph)
    holders: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    holders[node.output[0]] = attr.t

    new_arrays: dict[str, np.ndarray] = {}
    kept: dict[tuple[str, int], np.ndarray] = {}
    for (tensor, axis), indices in sorted(deleted.items()):
        array = new_arrays.get(tensor, arrays[tensor])
        original_len = arrays[tensor].shape[axis]
        keep = np.setdiff1d(np.arange(original_len), np.fromiter(indices, dtype=np.int64))
        kept[(tensor, axis)] = keep
        new_arrays[tensor] = np.take(array, keep, axis=axis)
    for (tensor, index), amount in fixes.items():
        array = np.array(new_arrays.get(tensor, arrays[tensor]), copy=True)
        flat = array.reshape(-1)
        flat[index] -= amount
        new_arrays[tensor] = flat.reshape(array.shape)
    for tensor, array in new_arrays.items():
        holder = holders[tensor]
        replacement = numpy_helper.from_array(np.ascontiguousarray(array).astype(arrays[tensor].dtype), holder.name)
        doc = holder.doc_string
        holder.CopyFrom(replacement)
        if doc:
            holder.doc_string = doc

    # grouped / depthwise convolutions lose whole conv groups
    for node in graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in new_arrays:
            continue
        for attr in node.attribute:
            if attr.name == "group" and attr.i > 1:
                old_out = arrays[node.input[1]].shape[0]
                new_out = new_arrays[node.input[1]].shape[0]
                per_group = old_out // attr.i
                if new_out % per_group:
                    raise ValueError(f"Conv {node.name}: removal does not take whole conv groups")
                attr.i = new_out // per_group

    # shapes recorded for changed values are stale now
    stale = [v for v in graph.value_info if v.name in touched_values]
    for value in stale:
        graph.value_info.remove(value)
    return result, kept


# ---- entry point --------------------------------------------------------------------------------------
def prune_structured_onnx(model: Model, config: PruneConfig) -> tuple[Model, PruneReport]:
    """Remove `config.sparsity` of the channels of every prunable channel group of an ONNX model."""
    before, zeros_before = _parameters(model)
    report = PruneReport(
        method="structured", parameters_before=before, parameters_after=before, zeros_after=zeros_before
    )
    proto = onnx_format.to_proto(model)
    groups = analyse_channels(proto)
    prunable = [g for g in groups if g.prunable]
    report.skipped = [f"{g.name}: {g.reason}" for g in groups if not g.prunable]
    if config.sparsity == 0 or not prunable:
        report.layers = [LayerChange(g.name, g.size, g.size) for g in prunable]
        report.notes.append("nothing to prune" if not prunable else "sparsity 0: model unchanged")
        return model, report

    notes: list[str] = []
    scores = channel_scores(proto, prunable, config, notes)
    counts = allocate(proto, prunable, scores, config, notes)
    removal = choose_channels(scores, counts)
    pruned, kept = remove_channels(proto, groups, removal)
    report.layers = [LayerChange(g.name, g.size, g.size - counts.get(g.name, 0)) for g in prunable]
    notes.append(f"importance {config.importance}, allocation {config.allocation}")

    if config.calibration is not None and config.refit and removal:
        from .refit import refit_pruned

        order = {label: i for i, label in enumerate(node_labels(proto.graph))}
        consumers = sorted(
            {piece.node for g in prunable if g.name in removal for piece in g.consumers}, key=order.__getitem__
        )
        pruned, refit_notes = refit_pruned(proto, pruned, consumers, kept, calibration_rows(config.calibration))
        notes.extend(refit_notes)

    onnx.checker.check_model(pruned, full_check=True)
    weights_before = weight_parameter_count(proto)
    weights_after = weight_parameter_count(pruned)
    if weights_before:
        share = 100.0 * weights_after / weights_before
        notes.append(f"conv/linear weights: {weights_after} of {weights_before} kept ({share:.1f} %)")
    result = onnx_format.from_proto(pruned, model.metadata)
    report.parameters_after, report.zeros_after = _parameters(result)
    report.notes.extend(notes)
    return result, report
