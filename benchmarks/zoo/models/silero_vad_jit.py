"""Silero VAD v6 as the TorchScript archive shipped in the silero-vad wheel (silero_vad.jit), run as is."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..base import Fidelity, Inputs, ZooModel, fetch_wheel_member
from ..threads import single_torch_thread
from . import silero_vad_safetensors as vad


def fetch() -> Path:
    return fetch_wheel_member(vad.PACKAGE, vad.VERSION, "silero_vad/data/silero_vad.jit")


def probabilities(path: Path, inputs: Inputs) -> np.ndarray:
    """The archive's own streaming forward (it keeps context and LSTM state between calls), [clips, chunks]."""
    model = torch.jit.load(str(path), map_location="cpu").eval()
    model.reset_states()
    audio = torch.from_numpy(inputs["audio"])
    with single_torch_thread(), torch.inference_mode():
        chunks = [model(audio[:, start : start + vad.CHUNK], 16000) for start in range(0, audio.shape[1], vad.CHUNK)]
    return torch.cat(chunks, dim=1).numpy()


def evaluate(original: Path, rebuilt: Path, inputs: Inputs) -> Fidelity:
    return vad.decision_fidelity(probabilities(original, inputs), probabilities(rebuilt, inputs))


MODEL = ZooModel(
    name="silero-vad-jit",
    exporter="TorchScript",
    task="voice activity detector (STFT conv + LSTMCell)",
    fetch=fetch,
    make_inputs=vad.make_inputs,
    evaluate=evaluate,
    small=True,
    notes=f"{vad.PACKAGE}=={vad.VERSION} silero_vad/data/silero_vad.jit (16 kHz and 8 kHz branches); 512-sample chunks",
)
