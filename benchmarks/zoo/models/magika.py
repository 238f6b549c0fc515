"""Magika standard_v3_3 file-type classifier (byte embedding, depthwise conv, attention-free
dense stack; exported by tf2onnx) from the magika wheel; fed real files of this machine, each
prepared as magika's own `_extract_features_from_seekable` does (first/last 1024 bytes after
stripping whitespace, padded with token 256)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..base import Fidelity, Inputs, ZooModel, fetch_wheel_member
from ..onnx_eval import largest_flip_margin, run, run_original, snr_db, top1_agreement

PACKAGE, VERSION = "magika", "1.0.3"
MEMBER = "magika/models/standard_v3_3/model.onnx"
ROOTS = ("/usr/lib/python3", "/usr/share", "/etc", "/usr/bin", "/usr/lib/x86_64-linux-gnu", "/usr/include")
VISITS_PER_ROOT = 6000  # bounds the directory walk; magika needs variety, not every file


def _config(model_path: Path) -> dict:
    return json.loads((model_path.parent / "config.min.json").read_text())


def features(content_head: bytes, content_tail: bytes, size: int, config: dict) -> np.ndarray | None:
    """magika's beg/end features of one file, or None where magika would not run the model."""
    beg_size, end_size, pad = config["beg_size"], config["end_size"], config["padding_token"]
    beg = content_head.lstrip()[:beg_size]
    end = content_tail.rstrip()[-end_size:] if content_tail.rstrip() else b""
    beg_ints = list(beg) + [pad] * (beg_size - len(beg))
    end_ints = [pad] * (end_size - len(end)) + list(end)
    if size < config["min_file_size_for_dl"] or beg_ints[config["min_file_size_for_dl"] - 1] == pad:
        return None  # too few bytes: magika answers without the model
    return np.array(beg_ints + end_ints, dtype=np.int32)


def candidate_files() -> dict[str, list[Path]]:
    """Regular files under ROOTS grouped by suffix, in a walk order that does not depend on the disk."""
    groups: dict[str, list[Path]] = {}
    for root in ROOTS:
        visited = 0
        for directory, subdirs, files in os.walk(root):
            subdirs.sort()
            for name in sorted(files):
                path = Path(directory) / name
                if path.is_symlink() or not path.is_file():
                    continue
                groups.setdefault(path.suffix.lower() or path.name.lower(), []).append(path)
                visited += 1
            if visited >= VISITS_PER_ROOT:
                break
    return groups


def make_inputs(model_path: Path, samples: int) -> Inputs:
    config = _config(model_path)
    block = config["block_size"]
    groups = candidate_files()
    rng = np.random.default_rng(1004)
    keys = sorted(groups)
    rng.shuffle(keys)
    rows: list[np.ndarray] = []
    for round_ in range(64):  # round robin over suffixes: as many different file types as possible
        for key in keys:
            if len(rows) >= samples:
                break
            if round_ >= len(groups[key]):
                continue
            path = groups[key][int(rng.integers(len(groups[key])))]
            try:
                size = path.stat().st_size
                with open(path, "rb") as handle:
                    head = handle.read(min(block, size))
                    handle.seek(max(0, size - block))
                    tail = handle.read(min(block, size))
            except OSError:
                continue
            row = features(head, tail, size, config)
            if row is not None:
                rows.append(row)
        if len(rows) >= samples:
            break
    return {"bytes": np.stack(rows)}


def output_labels(scores: np.ndarray, model_path: Path) -> np.ndarray:
    """The label magika 1.0.3 reports for each row of model scores in its default HIGH_CONFIDENCE
    mode (Magika._get_output_label_from_dl_label_and_score): the top label mapped through the
    overwrite map, kept when its score reaches the label's threshold (else the medium one), otherwise
    "txt" for a text label and "unknown" for a binary one: what a magika user sees."""
    config = _config(model_path)
    knowledge = json.loads((model_path.parents[2] / "config" / "content_types_kb.min.json").read_text())
    space = config["target_labels_space"]
    top = np.argmax(scores, axis=-1)
    labels = []
    for index, score in zip(top, scores[np.arange(len(top)), top]):
        label = space[index]
        shown = config["overwrite_map"].get(label, label)
        if score < config["thresholds"].get(label, config["medium_confidence_threshold"]):
            shown = "txt" if knowledge[shown]["is_text"] else "unknown"
        labels.append(shown)
    return np.array(labels)


def evaluate(original: Path, rebuilt: Path, inputs: Inputs) -> Fidelity:
    ref = run_original(original, inputs, batch=64)["target_label"]
    test = run(rebuilt, inputs, batch=64)["target_label"]
    shown = output_labels(ref, original), output_labels(test, original)
    # The task measure is the label magika reports; the network's raw top-1 stays beside it (a near
    # tie below magika's confidence threshold flips the raw top-1 but not the reported label).
    return Fidelity(snr_db(ref, test), 100.0 * float(np.mean(shown[0] == shown[1])), "magika label",
                    {"raw_top1": top1_agreement(ref, test),
                     "distinct_labels": float(len(np.unique(shown[0]))),
                     "largest_flip_margin": largest_flip_margin(ref, test)})


MODEL = ZooModel(
    name="magika", exporter="tf2onnx", task="file-type classifier (int32 byte tokens)",
    fetch=lambda: fetch_wheel_member(PACKAGE, VERSION, MEMBER), make_inputs=make_inputs, evaluate=evaluate,
    small=True,
    notes="Magika standard_v3_3, Apache-2.0 (Google) via magika 1.0.3; producer tf2onnx 1.16.1",
)
