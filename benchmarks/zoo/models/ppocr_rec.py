"""PP-OCRv4 mobile text recognizer (SVTR-LCNet, CTC over 6625 symbols) from rapidocr-onnxruntime;
fed rendered text lines, judged on the greedy CTC decoding."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..base import Fidelity, Inputs, ZooModel, fetch_wheel_member
from ..onnx_eval import run, run_original, snr_db
from ..synth import rapidocr_line, text_line

PACKAGE, VERSION = "rapidocr-onnxruntime", "1.4.4"
MEMBER = "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"
HEIGHT, WIDTH = 48, 320  # rapidocr's rec_img_shape
OUTPUT = "softmax_11.tmp_0"


def line_tensor(line: np.ndarray) -> np.ndarray:
    """rapidocr's TextRecognizer.resize_norm_img: keep the aspect, height 48, zero-pad right."""
    return rapidocr_line(line, HEIGHT, WIDTH)


def make_inputs(model_path: Path, samples: int) -> Inputs:
    rng = np.random.default_rng(1002)
    return {"x": np.stack([line_tensor(text_line(rng, HEIGHT)[0]) for _ in range(samples)])}


def ctc_greedy(probabilities: np.ndarray) -> list[tuple[int, ...]]:
    """Symbol sequences: arg-max per frame, repeats merged, blanks (index 0) dropped."""
    best = np.argmax(probabilities, axis=-1)
    keep = (best != 0) & np.concatenate([np.ones((len(best), 1), bool), best[:, 1:] != best[:, :-1]], axis=1)
    return [tuple(row[mask]) for row, mask in zip(best, keep)]


def evaluate(original: Path, rebuilt: Path, inputs: Inputs) -> Fidelity:
    ref = run_original(original, inputs, batch=16)[OUTPUT]
    test = run(rebuilt, inputs, batch=16)[OUTPUT]
    same = [a == b for a, b in zip(ctc_greedy(ref), ctc_greedy(test))]
    return Fidelity(snr_db(ref, test), 100.0 * float(np.mean(same)), "same CTC string")


MODEL = ZooModel(
    name="ppocr-rec", exporter="paddle2onnx", task="OCR recognizer (SVTR, CTC)",
    fetch=lambda: fetch_wheel_member(PACKAGE, VERSION, MEMBER), make_inputs=make_inputs, evaluate=evaluate,
    notes="PP-OCRv4 rec, Apache-2.0 (PaddleOCR) via rapidocr-onnxruntime 1.4.4; producer_name empty, p2o.* dims",
)
