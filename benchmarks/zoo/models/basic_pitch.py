"""Spotify Basic Pitch polyphonic note transcriber (harmonic CQT front end built from Conv/Pad,
small conv stacks for contour, note and onset; exported by tf2onnx) from the basic-pitch wheel;
fed synthetic polyphonic music in the model's own 2 s windows at 22050 Hz."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..base import Fidelity, Inputs, ZooModel, fetch_wheel_member
from ..onnx_eval import mask_iou, run, run_original, snr_db
from ..synth import music_like

PACKAGE, VERSION = "basic-pitch", "0.4.0"
MEMBER = "basic_pitch/saved_models/icassp_2022/nmp.onnx"
INPUT = "serving_default_input_2:0"
WINDOW = 43844  # basic_pitch.constants.AUDIO_N_SAMPLES
MAX_SAMPLES = 16
# basic_pitch.inference names: StatefulPartitionedCall:1 note, :2 onset, :0 contour
NOTE, ONSET, CONTOUR = "StatefulPartitionedCall:1", "StatefulPartitionedCall:2", "StatefulPartitionedCall:0"
FRAME_THRESHOLD, ONSET_THRESHOLD = 0.3, 0.5  # basic_pitch.inference.predict defaults


def make_inputs(model_path: Path, samples: int) -> Inputs:
    rng = np.random.default_rng(1006)
    windows = np.stack([music_like(rng, WINDOW) for _ in range(min(samples, MAX_SAMPLES))])
    return {INPUT: windows[:, :, None]}


def evaluate(original: Path, rebuilt: Path, inputs: Inputs) -> Fidelity:
    ref = run_original(original, inputs, batch=4)
    test = run(rebuilt, inputs, batch=4)
    names = (NOTE, ONSET, CONTOUR)
    return Fidelity(
        snr_db([ref[n] for n in names], [test[n] for n in names]),
        mask_iou(ref[NOTE] > FRAME_THRESHOLD, test[NOTE] > FRAME_THRESHOLD), "note-frame IoU@0.3",
        {"onset_iou": mask_iou(ref[ONSET] > ONSET_THRESHOLD, test[ONSET] > ONSET_THRESHOLD),
         "active_fraction": float(np.mean(ref[NOTE] > FRAME_THRESHOLD))},
    )


MODEL = ZooModel(
    name="basic-pitch", exporter="tf2onnx", task="note transcriber (CQT + CNN)",
    fetch=lambda: fetch_wheel_member(PACKAGE, VERSION, MEMBER), make_inputs=make_inputs, evaluate=evaluate,
    small=True,
    notes="Basic Pitch ICASSP 2022 nmp.onnx, Apache-2.0 (Spotify) via basic-pitch 0.4.0; producer tf2onnx 1.15.1",
)
