"""Silero VAD v6, the 16 kHz-only opset-15 export (torch.onnx; LSTM weights read through Slice inside
If branches). Same inputs and fidelity as `silero_vad`."""
from __future__ import annotations

from .silero_vad import zoo_model

MODEL = zoo_model(
    "silero-vad-op15", "silero_vad/data/silero_vad_16k_op15.onnx", "torch.onnx",
    "silero_vad_16k_op15.onnx, MIT (Silero Team) via silero-vad 6.2.3; producer pytorch 2.3.1",
)
