"""PP-OCRv4 mobile text detector (DBNet: MobileNetV3-style backbone, FPN with Resize/Concat,
ConvTranspose head) from rapidocr-onnxruntime; fed rendered document pages, judged on its text mask."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..base import Fidelity, Inputs, ZooModel, fetch_wheel_member
from ..onnx_eval import mask_iou, run, run_original, snr_db
from ..synth import document_page

PACKAGE, VERSION = "rapidocr-onnxruntime", "1.4.4"
MEMBER = "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
HEIGHT, WIDTH = 512, 384  # multiples of 32, as rapidocr's DetPreProcess rounds to
MAX_SAMPLES = 12  # a 512x384 page costs ~0.1 s per run on 2 cores
THRESHOLD = 0.3  # rapidocr's Det.thresh: the binarization of the probability map


def make_inputs(model_path: Path, samples: int) -> Inputs:
    rng = np.random.default_rng(1001)
    pages = [document_page(rng, WIDTH, HEIGHT) for _ in range(min(samples, MAX_SAMPLES))]
    # rapidocr: (img / 255 - 0.5) / 0.5, HWC -> CHW
    x = (np.stack(pages).astype(np.float32) / 255.0 - 0.5) / 0.5
    return {"x": np.ascontiguousarray(x.transpose(0, 3, 1, 2))}


def evaluate(original: Path, rebuilt: Path, inputs: Inputs) -> Fidelity:
    ref = run_original(original, inputs, batch=4)["sigmoid_0.tmp_0"]
    test = run(rebuilt, inputs, batch=4)["sigmoid_0.tmp_0"]
    return Fidelity(snr_db(ref, test), mask_iou(ref > THRESHOLD, test > THRESHOLD), "mask IoU@0.3",
                    {"text_fraction": float(np.mean(ref > THRESHOLD))})


MODEL = ZooModel(
    name="ppocr-det", exporter="paddle2onnx", task="text detector (DBNet)",
    fetch=lambda: fetch_wheel_member(PACKAGE, VERSION, MEMBER), make_inputs=make_inputs, evaluate=evaluate,
    small=True,
    notes="PP-OCRv4 det, Apache-2.0 (PaddleOCR) via rapidocr-onnxruntime 1.4.4; producer_name empty, p2o.* dims",
)
