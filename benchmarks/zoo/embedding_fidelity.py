"""Fidelity of embedding models: how close the rebuilt model's embeddings are, and whether they rank alike."""
from __future__ import annotations

import numpy as np

from .base import Fidelity


def snr_db(original: np.ndarray, rebuilt: np.ndarray) -> float:
    """Signal = original, noise = rebuilt - original, over every element; inf when identical."""
    original = np.asarray(original, dtype=np.float64)
    noise = np.asarray(rebuilt, dtype=np.float64) - original
    noise_power = float(np.sum(noise * noise))
    if noise_power == 0.0:
        return float("inf")
    return 10.0 * float(np.log10(np.sum(original * original) / noise_power))


def unit_rows(embeddings: np.ndarray) -> np.ndarray:
    embeddings = np.asarray(embeddings, dtype=np.float64)
    return embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)


def nearest_other(embeddings: np.ndarray) -> np.ndarray:
    """Index of each row's most cosine-similar other row."""
    unit = unit_rows(embeddings)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argmax(similarity, axis=1)


def embedding_fidelity(original: np.ndarray, rebuilt: np.ndarray) -> Fidelity:
    """Mean cosine of each rebuilt embedding to its original, and nearest-neighbour agreement.

    NN agreement is the percent of samples whose nearest other sample is the same one under the
    original and the rebuilt embeddings: the decision a retrieval or clustering user sees.
    `largest_flip_gap`: over the changed ones, the largest cosine gap the original had between its
    own neighbour and the rebuilt model's choice (near 0: the neighbours were tied).
    """
    if original.shape != rebuilt.shape or original.ndim != 2 or len(original) < 2:
        raise ValueError(f"need two equal [samples>=2, dim] embedding sets, got {original.shape} and {rebuilt.shape}")
    cosine = np.sum(unit_rows(original) * unit_rows(rebuilt), axis=1)
    before, after = nearest_other(original), nearest_other(rebuilt)
    agreement = 100.0 * float(np.mean(before == after))
    # How near a tie each changed neighbour was: the original similarity to the original's
    # neighbour minus that to the rebuilt model's choice.
    similarity = unit_rows(original) @ unit_rows(original).T
    rows = np.nonzero(before != after)[0]
    gaps = similarity[rows, before[rows]] - similarity[rows, after[rows]]
    return Fidelity(
        output_snr_db=snr_db(original, rebuilt),
        agreement=agreement,
        measure="NN agreement",
        extra={"cosine": float(np.mean(cosine)), "min_cosine": float(np.min(cosine)),
               "largest_flip_gap": float(gaps.max()) if rows.size else 0.0},
    )
