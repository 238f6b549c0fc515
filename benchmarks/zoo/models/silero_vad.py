"""Silero VAD v6 voice-activity detector (STFT conv front end, conv encoder, LSTM cell, 16 and 8 kHz
branches under an If on `sr`) from the silero-vad wheel; fed synthetic speech-like audio in
512-sample chunks at 16 kHz with 64 samples of context and the LSTM state carried, as silero's
OnnxWrapper does.

Inputs hold one time step per sample across STREAMS parallel streams (the model's batch axis):
`input` (steps, STREAMS, 576), `state` (steps, 2, STREAMS, 128) as the original model carried it,
`sr` (steps,). `evaluate` streams each model with its own state from the first step's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..base import Fidelity, Inputs, ZooModel, fetch_wheel_member
from ..onnx_eval import session, snr_db
from ..synth import speech_like

PACKAGE, VERSION = "silero-vad", "6.2.3"
RATE, CHUNK, CONTEXT, STREAMS = 16000, 512, 64, 8
THRESHOLD = 0.5  # silero's default speech threshold
_STREAMED: dict[tuple, np.ndarray] = {}


def stream(model_path: Path, inputs: Inputs) -> tuple[np.ndarray, np.ndarray]:
    """Speech probabilities (steps, STREAMS) and the state fed at each step, state carried."""
    sess = session(model_path)
    state = inputs["state"][0]
    probabilities, states = [], []
    for step in range(len(inputs["input"])):
        states.append(state)
        out, state = sess.run(["output", "stateN"], {"input": inputs["input"][step], "state": state,
                                                     "sr": np.asarray(inputs["sr"][step])})
        probabilities.append(out[:, 0])
    return np.stack(probabilities), np.stack(states)


def make_inputs_for(model_path: Path, samples: int) -> Inputs:
    steps = 4 * samples  # 64 samples: 256 chunks = 8.2 s of audio per stream
    rng = np.random.default_rng(1005)
    audio = np.stack([speech_like(rng, steps * CHUNK / RATE + 0.1, RATE)[:steps * CHUNK] for _ in range(STREAMS)])
    chunks = audio.reshape(STREAMS, steps, CHUNK)
    context = np.concatenate([np.zeros((STREAMS, 1, CONTEXT), np.float32), chunks[:, :-1, -CONTEXT:]], axis=1)
    inputs = {
        "input": np.ascontiguousarray(np.concatenate([context, chunks], axis=2).transpose(1, 0, 2)),
        "state": np.zeros((steps, 2, STREAMS, 128), np.float32),
        "sr": np.full(steps, RATE, dtype=np.int64),
    }
    inputs["state"] = stream(model_path, inputs)[1]
    return inputs


def evaluate(original: Path, rebuilt: Path, inputs: Inputs) -> Fidelity:
    key = (str(original), inputs["input"].ctypes.data, inputs["input"].shape)
    if key not in _STREAMED:
        _STREAMED[key] = stream(original, inputs)[0]
    ref = _STREAMED[key]
    test = stream(rebuilt, inputs)[0]
    agreement = 100.0 * float(np.mean((ref > THRESHOLD) == (test > THRESHOLD)))
    return Fidelity(snr_db(ref, test), agreement, "speech decision@0.5",
                    {"speech_fraction": float(np.mean(ref > THRESHOLD)),
                     "max_abs_diff": float(np.max(np.abs(ref - test)))})


def zoo_model(name: str, member: str, exporter: str, notes: str) -> ZooModel:
    return ZooModel(
        name=name, exporter=exporter, task="voice activity detector (LSTM)",
        fetch=lambda: fetch_wheel_member(PACKAGE, VERSION, member), make_inputs=make_inputs_for,
        evaluate=evaluate, small=True, notes=notes,
    )


MODEL = zoo_model(
    "silero-vad", "silero_vad/data/silero_vad.onnx", "spox",
    "silero_vad.onnx (the package's default ONNX), MIT (Silero Team) via silero-vad 6.2.3; producer spox: "
    "one If on sr with 16 kHz / 8 kHz subgraphs holding the weights",
)
