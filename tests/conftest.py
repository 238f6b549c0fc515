from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
SAMPLE_NAMES = ("mlp", "lenet", "resnet", "mobilenet")


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    return SAMPLES


@pytest.fixture(scope="session")
def digits_test() -> tuple[np.ndarray, np.ndarray]:
    with np.load(SAMPLES / "digits_test.npz", allow_pickle=False) as data:
        return data["x"], data["y"]
