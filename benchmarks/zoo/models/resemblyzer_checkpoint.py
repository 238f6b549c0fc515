"""Resemblyzer's speaker encoder: a training checkpoint (step, model_state, Adam optimizer_state) from the wheel.

The network is resemblyzer 0.1.4's VoiceEncoder: LSTM(40, 256, 3 layers, batch_first) over
160-frame mel partials, Linear(256, 256), ReLU, L2 norm of the last layer's final hidden state;
an utterance's embedding is the L2-normed mean of its partials' (embed_utterance, rate 1.3,
min_coverage 0.75). The mel spectrogram is librosa.feature.melspectrogram's defaults as resemblyzer
calls it (25 ms Hann window, 10 ms hop, 40 Slaney mel bands, power 2, centred with zero padding),
in numpy. preprocess_wav's volume normalisation (-30 dBFS, increase only) is applied; its
webrtcvad silence trimming is not, as the synthetic utterances have no long silences.
Only model_state feeds the network; optimizer_state rides along in the file nnc compresses.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import synthetic_voice
from ..base import Fidelity, Inputs, ZooModel, fetch_wheel_member
from ..embedding_fidelity import embedding_fidelity
from ..threads import single_torch_thread

PACKAGE = "resemblyzer"
VERSION = "0.1.4"

SAMPLE_RATE = 16000
WINDOW = SAMPLE_RATE * 25 // 1000  # n_fft = win_length = 400
HOP = SAMPLE_RATE * 10 // 1000  # 160
MEL_BANDS = 40
PARTIAL_FRAMES = 160
PARTIALS_PER_SECOND = 1.3
MIN_COVERAGE = 0.75
UTTERANCE_SECONDS = 3.0
UTTERANCES_PER_SPEAKER = 4


def fetch() -> Path:
    return fetch_wheel_member(PACKAGE, VERSION, "resemblyzer/pretrained.pt")


# --------------------------------------------------------------------------- features


def _hz_to_slaney_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / (200.0 / 3)
    log_step = np.log(6.4) / 27.0
    return np.where(hz >= 1000.0, 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / log_step, linear)


def _slaney_mel_to_hz(mel: np.ndarray) -> np.ndarray:
    log_step = np.log(6.4) / 27.0
    return np.where(mel >= 15.0, 1000.0 * np.exp(log_step * (mel - 15.0)), mel * (200.0 / 3))


@lru_cache(maxsize=1)
def mel_filterbank() -> np.ndarray:
    """librosa.filters.mel(sr=16000, n_fft=400, n_mels=40): Slaney scale and area normalisation, [40, 201]."""
    fft_hz = np.linspace(0.0, SAMPLE_RATE / 2, 1 + WINDOW // 2)
    mel_hz = _slaney_mel_to_hz(np.linspace(_hz_to_slaney_mel(0.0), _hz_to_slaney_mel(SAMPLE_RATE / 2), MEL_BANDS + 2))
    spacing = np.diff(mel_hz)
    ramps = mel_hz[:, None] - fft_hz[None, :]
    rising = -ramps[:-2] / spacing[:-1, None]
    falling = ramps[2:] / spacing[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    return weights * (2.0 / (mel_hz[2:] - mel_hz[:-2]))[:, None]


def mel_spectrogram(wav: np.ndarray) -> np.ndarray:
    """resemblyzer.audio.wav_to_mel_spectrogram: power mel spectrogram, [frames, 40] float32."""
    padded = np.pad(wav.astype(np.float64), WINDOW // 2)
    frame_count = 1 + (len(padded) - WINDOW) // HOP
    starts = np.arange(frame_count)[:, None] * HOP + np.arange(WINDOW)[None, :]
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(WINDOW) / WINDOW)  # periodic Hann
    power = np.abs(np.fft.rfft(padded[starts] * window, axis=1)) ** 2
    return (power @ mel_filterbank().T).astype(np.float32)


def normalize_volume(wav: np.ndarray, target_dbfs: float = -30.0) -> np.ndarray:
    """resemblyzer.audio.normalize_volume(increase_only=True)."""
    rms_dbfs = 20.0 * np.log10(np.sqrt(np.mean(wav.astype(np.float64) ** 2)))
    change = target_dbfs - rms_dbfs
    return wav if change < 0 else (wav * 10 ** (change / 20)).astype(np.float32)


def partial_mels(wav: np.ndarray) -> np.ndarray:
    """VoiceEncoder.compute_partial_slices + the mel of each partial, [partials, 160, 40]."""
    frame_count = int(np.ceil((len(wav) + 1) / HOP))
    frame_step = int(np.round((SAMPLE_RATE / PARTIALS_PER_SECOND) / HOP))
    starts = list(range(0, max(1, frame_count - PARTIAL_FRAMES + frame_step + 1), frame_step))
    coverage = (len(wav) - starts[-1] * HOP) / (PARTIAL_FRAMES * HOP)
    if coverage < MIN_COVERAGE and len(starts) > 1:
        starts = starts[:-1]
    needed = (starts[-1] + PARTIAL_FRAMES) * HOP
    if needed >= len(wav):
        wav = np.pad(wav, (0, needed - len(wav)))
    mel = mel_spectrogram(wav)
    return np.stack([mel[start : start + PARTIAL_FRAMES] for start in starts])


def make_inputs(_model_path: Path, samples: int) -> Inputs:
    """`samples` utterances of 3 s, UTTERANCES_PER_SPEAKER per synthetic speaker: mels [samples, 3, 160, 40]."""
    rng = np.random.default_rng(0)
    speakers = speaker_of(samples)
    voices = synthetic_voice.random_voices(int(speakers.max()) + 1, rng)
    mels = [
        partial_mels(normalize_volume(synthetic_voice.utterance(voices[speaker], UTTERANCE_SECONDS, rng)))
        for speaker in speakers
    ]
    return {"mels": np.stack(mels)}


def speaker_of(samples: int) -> np.ndarray:
    """Which synthetic speaker utters each sample: round robin over ceil(samples / 4) speakers (at least 2)."""
    return np.arange(samples) % max(2, -(-samples // UTTERANCES_PER_SPEAKER))


# --------------------------------------------------------------------------- network


class VoiceEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(MEL_BANDS, 256, 3, batch_first=True)
        self.linear = nn.Linear(256, 256)

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.lstm(mels)
        embeds = torch.relu(self.linear(hidden[-1]))
        return embeds / torch.norm(embeds, dim=1, keepdim=True)


def load_encoder(path: Path) -> VoiceEncoder:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    # similarity_weight/bias belong to the GE2E training loss, not to the encoder (resemblyzer loads strict=False)
    state = {key: value for key, value in checkpoint["model_state"].items() if not key.startswith("similarity_")}
    encoder = VoiceEncoder()
    encoder.load_state_dict(state, strict=True)
    return encoder.eval()


def utterance_embeddings(encoder: VoiceEncoder, mels: np.ndarray) -> np.ndarray:
    utterances, partials = mels.shape[:2]
    with single_torch_thread(), torch.inference_mode():
        embeds = encoder(torch.from_numpy(mels.reshape(utterances * partials, *mels.shape[2:]))).numpy()
    mean = embeds.reshape(utterances, partials, -1).mean(axis=1)
    return mean / np.linalg.norm(mean, axis=1, keepdims=True)


def evaluate(original: Path, rebuilt: Path, inputs: Inputs) -> Fidelity:
    reference = utterance_embeddings(load_encoder(original), inputs["mels"])
    fidelity = embedding_fidelity(reference, utterance_embeddings(load_encoder(rebuilt), inputs["mels"]))
    # how well the original itself separates the synthetic speakers, to read the agreement against
    nearest = np.argmax(np.where(np.eye(len(reference), dtype=bool), -np.inf, reference @ reference.T), axis=1)
    speakers = speaker_of(len(reference))
    fidelity.extra["original_same_speaker_nn"] = 100.0 * float(np.mean(speakers[nearest] == speakers))
    return fidelity


MODEL = ZooModel(
    name="resemblyzer",
    exporter="torch checkpoint (model + Adam state)",
    task="speaker encoder (3-layer LSTM, GE2E)",
    fetch=fetch,
    make_inputs=make_inputs,
    evaluate=evaluate,
    notes=f"{PACKAGE}=={VERSION} pretrained.pt: step, model_state and optimizer_state; synthetic source-filter speech",
)
