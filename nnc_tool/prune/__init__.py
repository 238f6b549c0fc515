"""The pruning stage: Model in, smaller (or sparser) Model out, before quantization.

Every method takes a `Model` and a `PruneConfig` and returns the pruned `Model` with a
`PruneReport`. Structured and depth pruning rewrite ONNX graphs (channels and branches are
physically removed); on formats without an analysable graph structured pruning zeroes whole
output channels instead, which the coder skips as zero rows.
"""
from __future__ import annotations

from ..errors import UsageError
from ..model import Model
from .config import PruneConfig, PruneReport

__all__ = ["PruneConfig", "PruneReport", "prune"]


def prune(model: Model, config: PruneConfig) -> tuple[Model, PruneReport]:
    """Apply `config` to `model` (its calibration inputs checked against the model's inputs first)."""
    from dataclasses import replace

    from ..graph.layout import weight_layouts
    from ..inputs import as_model_inputs

    if config.calibration is not None:
        config = replace(config, calibration=as_model_inputs(config.calibration, model))

    if config.method == "unstructured":
        from .unstructured import prune_unstructured

        return prune_unstructured(model, config, weight_layouts(model))
    if config.method == "nm":
        from .nm import prune_nm

        return prune_nm(model, config, weight_layouts(model))
    if config.method == "structured":
        if model.format == "onnx":
            from .structured import prune_structured_onnx

            return prune_structured_onnx(model, config)
        from .channel_zero import zero_channels

        return zero_channels(model, config, weight_layouts(model))
    if config.method == "depth":
        if model.format != "onnx":
            raise UsageError(None, "depth pruning needs an ONNX model (it rewrites the graph)")
        from .depth import prune_depth_onnx

        return prune_depth_onnx(model, config)
    raise UsageError(None, f"unknown pruning method {config.method!r}")
