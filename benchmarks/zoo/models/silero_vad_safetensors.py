"""Silero VAD v6 (16 kHz) as the safetensors file shipped in the silero-vad wheel, rebuilt in torch.

The network follows the wheel's own tinygrad_model.TinySileroVAD (the reader of this file):
a 256-tap STFT as a Conv1d (stride 128) on each 576-sample window (64 samples of context + a
512-sample chunk, right-padded by 64 with reflection), magnitude, four Conv1d+ReLU, an LSTMCell
carried from chunk to chunk, ReLU, a 1x1 Conv1d and a sigmoid: one speech probability per
32 ms chunk. Inputs are synthetic utterances with silent and noisy stretches around them.

This file's weights are not those of the wheel's silero_vad.jit (an older training, it seems);
the forward here reproduces the .jit's outputs to 7e-6 when given the .jit's weights.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from .. import synthetic_voice
from ..base import Fidelity, Inputs, ZooModel, fetch_wheel_member
from ..embedding_fidelity import snr_db
from ..threads import single_torch_thread

PACKAGE = "silero-vad"
VERSION = "6.2.3"
CHUNK = 512
CONTEXT = 64
CLIP_SECONDS = 2.0
SPEECH_THRESHOLD = 0.5  # silero's default speech threshold


def fetch() -> Path:
    return fetch_wheel_member(PACKAGE, VERSION, "silero_vad/data/silero_vad_16k.safetensors")


class SileroVad(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stft_conv = nn.Conv1d(1, 258, kernel_size=256, stride=128, bias=False)
        self.conv1 = nn.Conv1d(129, 128, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(128, 64, kernel_size=3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(64, 64, kernel_size=3, stride=2, padding=1)
        self.conv4 = nn.Conv1d(64, 128, kernel_size=3, padding=1)
        self.lstm_cell = nn.LSTMCell(128, 128)
        self.final_conv = nn.Conv1d(128, 1, 1)

    def step(self, window: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None):
        """One chunk: window [batch, 576] -> (speech probability [batch], LSTM state)."""
        x = self.stft_conv(F.pad(window[:, None, :], (0, 64), mode="reflect"))
        x = torch.sqrt(x[:, :129] ** 2 + x[:, 129:] ** 2)
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = torch.relu(conv(x))
        hidden, cell = self.lstm_cell(x.squeeze(-1), state)
        probability = torch.sigmoid(self.final_conv(torch.relu(hidden).unsqueeze(-1))).squeeze(1).mean(dim=1)
        return probability, (hidden, cell)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """Stream audio [batch, samples] (a multiple of 512) chunk by chunk -> probabilities [batch, chunks]."""
        padded = F.pad(audio, (CONTEXT, 0))
        state, probabilities = None, []
        for start in range(CONTEXT, padded.shape[1], CHUNK):
            probability, state = self.step(padded[:, start - CONTEXT : start + CHUNK], state)
            probabilities.append(probability)
        return torch.stack(probabilities, dim=1)


def load(path: Path) -> SileroVad:
    network = SileroVad()
    network.load_state_dict(load_file(str(path)), strict=True)
    return network.eval()


def make_inputs(_model_path: Path, samples: int) -> Inputs:
    """Clips of 2 s: silence or low noise, a 0.6-1.4 s utterance of a random voice, then noise again."""
    rng = np.random.default_rng(0)
    voices = synthetic_voice.random_voices(samples, rng)
    length = int(CLIP_SECONDS * synthetic_voice.SAMPLE_RATE) // CHUNK * CHUNK
    clips = np.empty((samples, length), dtype=np.float32)
    for row, voice in enumerate(voices):
        speech = synthetic_voice.utterance(voice, rng.uniform(0.6, 1.4), rng) * rng.uniform(0.2, 1.0)
        start = rng.integers(0, length - len(speech))
        clip = rng.normal(0.0, rng.choice([0.0, 0.002, 0.01]), length)
        clip[start : start + len(speech)] += speech
        clips[row] = clip
    return {"audio": clips}


def probabilities(network: SileroVad, inputs: Inputs) -> np.ndarray:
    with single_torch_thread(), torch.inference_mode():
        return network(torch.from_numpy(inputs["audio"])).numpy()


def decision_fidelity(reference: np.ndarray, decoded: np.ndarray) -> Fidelity:
    """Agreement of the per-chunk speech decision (probability > 0.5) over all chunks of all clips."""
    return Fidelity(
        output_snr_db=snr_db(reference, decoded),
        agreement=100.0 * float(np.mean((reference > SPEECH_THRESHOLD) == (decoded > SPEECH_THRESHOLD))),
        measure="speech decision",
        extra={
            "max_abs_probability": float(np.max(np.abs(reference - decoded))),
            "original_speech_chunks": 100.0 * float(np.mean(reference > SPEECH_THRESHOLD)),
        },
    )


def evaluate(original: Path, rebuilt: Path, inputs: Inputs) -> Fidelity:
    return decision_fidelity(probabilities(load(original), inputs), probabilities(load(rebuilt), inputs))


MODEL = ZooModel(
    name="silero-vad-safetensors",
    exporter="safetensors",
    task="voice activity detector (STFT conv + LSTMCell)",
    fetch=fetch,
    make_inputs=make_inputs,
    evaluate=evaluate,
    small=True,
    notes=f"{PACKAGE}=={VERSION} silero_vad/data/silero_vad_16k.safetensors; streamed in 512-sample chunks with 64 of context",
)
