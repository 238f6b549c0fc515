"""all-MiniLM-L6-v2 exported to ONNX here with torch.onnx from the wheel's safetensors (cached, not committed)."""
from __future__ import annotations

from pathlib import Path

from .. import minilm
from ..base import ZooModel


def fetch() -> Path:
    target = minilm.derived_path("all-MiniLM-L6-v2.onnx")
    return target if target.exists() else minilm.export_onnx(target)


MODEL = ZooModel(
    name="minilm-onnx",
    exporter="torch.onnx (exported here)",
    task="sentence encoder (BERT, 6 layers, 384 wide)",
    fetch=fetch,
    make_inputs=minilm.make_inputs,
    evaluate=minilm.evaluate_onnx,
    notes=f"from {minilm.PACKAGE}=={minilm.VERSION} model.safetensors, opset 17, dynamic batch/sequence; run with onnxruntime",
)
