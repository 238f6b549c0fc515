"""PP-OCR mobile v2.0 text-direction classifier (MobileNetV3 small: SE blocks, hard-swish) from
rapidocr-onnxruntime; fed rendered text lines, half of them upside down."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..base import Fidelity, Inputs, ZooModel, fetch_wheel_member
from ..onnx_eval import largest_flip_margin, run, run_original, snr_db, top1_agreement
from ..synth import rapidocr_line, text_line

PACKAGE, VERSION = "rapidocr-onnxruntime", "1.4.4"
MEMBER = "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"
HEIGHT, WIDTH = 48, 192  # rapidocr's cls_image_shape
OUTPUT = "save_infer_model/scale_0.tmp_1"


def line_tensor(line: np.ndarray) -> np.ndarray:
    """rapidocr's TextClassifier.resize_norm_img."""
    return rapidocr_line(line, HEIGHT, WIDTH)


def make_inputs(model_path: Path, samples: int) -> Inputs:
    rng = np.random.default_rng(1003)
    lines = []
    for i in range(samples):
        line = text_line(rng, HEIGHT)[0]
        lines.append(line_tensor(line[::-1, ::-1] if i % 2 else line))
    return {"x": np.stack(lines)}


def evaluate(original: Path, rebuilt: Path, inputs: Inputs) -> Fidelity:
    ref = run_original(original, inputs, batch=16)[OUTPUT]
    test = run(rebuilt, inputs, batch=16)[OUTPUT]
    return Fidelity(snr_db(ref, test), top1_agreement(ref, test), "top-1", {"largest_flip_margin": largest_flip_margin(ref, test)})


MODEL = ZooModel(
    name="ppocr-cls", exporter="paddle2onnx", task="text-direction classifier (MobileNetV3)",
    fetch=lambda: fetch_wheel_member(PACKAGE, VERSION, MEMBER), make_inputs=make_inputs, evaluate=evaluate,
    small=True,
    notes="ch_ppocr_mobile_v2.0_cls, Apache-2.0 (PaddleOCR) via rapidocr-onnxruntime 1.4.4; producer PaddlePaddle",
)
