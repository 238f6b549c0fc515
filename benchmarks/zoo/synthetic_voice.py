"""Speech-like synthetic audio for the audio members of the zoo (no recordings ship on this machine).

A voice is a source-filter model: a glottal source (harmonics of a wandering f0 with a spectral
tilt) shaped by three formant resonances that move from vowel to vowel, with noise bursts for
fricatives and short pauses. Speakers differ in pitch, vocal-tract length (formants scaled),
tilt, breathiness and speaking rate, which is what a speaker encoder keys on.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 16000
ENVELOPE_STEP = 80  # samples (5 ms) between harmonic-amplitude updates

# Peterson & Barney averages (Hz) of F1, F2, F3 for six English vowels, adult male tract.
_VOWEL_FORMANTS = np.array([
    [730, 1090, 2440],  # a
    [270, 2290, 3010],  # i
    [300, 870, 2240],  # u
    [530, 1840, 2480],  # e
    [570, 840, 2410],  # o
    [660, 1720, 2410],  # ae
], dtype=np.float64)
_FORMANT_BANDWIDTHS = np.array([80.0, 110.0, 160.0])
_FORMANT_GAINS = np.array([1.0, 0.6, 0.3])


@dataclass(frozen=True)
class Voice:
    f0_hz: float  # median pitch
    tract_scale: float  # formant frequencies multiply by this (shorter tract -> larger)
    tilt: float  # source spectral slope exponent: harmonic k has amplitude k**-tilt
    breathiness: float  # noise mixed into voiced parts, relative
    syllables_per_second: float


def random_voices(count: int, rng: np.random.Generator) -> list[Voice]:
    return [
        Voice(
            f0_hz=float(np.exp(rng.uniform(np.log(85.0), np.log(260.0)))),
            tract_scale=float(rng.uniform(0.85, 1.25)),
            tilt=float(rng.uniform(0.6, 1.4)),
            breathiness=float(rng.uniform(0.01, 0.08)),
            syllables_per_second=float(rng.uniform(3.0, 5.5)),
        )
        for _ in range(count)
    ]


def _formant_envelope(frequencies: np.ndarray, formants: np.ndarray) -> np.ndarray:
    """Sum of three Lorentzian resonances at formants [..., 3] evaluated at frequencies [...]."""
    detune = (frequencies[..., None] - formants) / (_FORMANT_BANDWIDTHS / 2.0)
    return np.sum(_FORMANT_GAINS / (1.0 + detune * detune), axis=-1)


def harmonic_signal(f0: np.ndarray, formants: np.ndarray, tilt: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Harmonics of the per-sample pitch f0 [T], shaped by per-sample formants [T, 3], band-limited.

    The harmonic amplitudes change slowly, so they are computed every ENVELOPE_STEP samples and
    interpolated linearly; only the phases run at the sample rate.
    """
    length = len(f0)
    phase = 2.0 * np.pi * np.cumsum(f0) / sample_rate
    harmonics = np.arange(1, int(0.48 * sample_rate / f0.min()) + 1, dtype=np.float64)[:, None]
    coarse = np.arange(0, length + ENVELOPE_STEP, ENVELOPE_STEP).clip(max=length - 1)
    frequencies = harmonics * f0[None, coarse]
    amplitude = harmonics ** -tilt * (0.2 + _formant_envelope(frequencies, formants[None, coarse, :]))
    amplitude[frequencies >= 0.48 * sample_rate] = 0.0
    position = np.arange(length) / ENVELOPE_STEP
    left = np.floor(position).astype(int)
    weight = position - left
    per_sample = amplitude[:, left] * (1.0 - weight) + amplitude[:, left + 1] * weight
    return np.sum(per_sample * np.sin(harmonics * phase[None, :]), axis=0)


def _smooth(values: np.ndarray, width: int) -> np.ndarray:
    kernel = np.hanning(width)
    return np.convolve(values, kernel / kernel.sum(), mode="same")


def utterance(voice: Voice, seconds: float, rng: np.random.Generator, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """One speech-like utterance of the voice, float32 in [-1, 1]."""
    length = int(seconds * sample_rate)
    syllables = max(2, int(round(seconds * voice.syllables_per_second)))
    bounds = np.sort(rng.uniform(0, length, syllables - 1)).astype(int)
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [length]])

    vowel_targets = _VOWEL_FORMANTS[rng.integers(0, len(_VOWEL_FORMANTS), syllables)] * voice.tract_scale
    centres = (starts + ends) / 2.0
    time = np.arange(length, dtype=np.float64)
    formants = np.stack([np.interp(time, centres, vowel_targets[:, i]) for i in range(3)], axis=1)

    # pitch: declination over the utterance, a random accent per syllable, slow jitter
    accents = rng.normal(0.0, 0.08, syllables)
    contour = np.interp(time, centres, accents) + np.linspace(0.05, -0.08, length)
    jitter = _smooth(rng.normal(0.0, 0.02, length), sample_rate // 50)
    f0 = voice.f0_hz * np.exp(contour + jitter)

    voiced = harmonic_signal(f0, formants, voice.tilt, sample_rate)
    voiced = voiced / np.max(np.abs(voiced))

    # per syllable: a voiced nucleus with raised-cosine onset/offset, sometimes a fricative before it
    gate = np.zeros(length)
    fricative_gate = np.zeros(length)
    for start, end in zip(starts, ends):
        span = end - start
        nucleus_start = start + int(span * rng.uniform(0.05, 0.3))
        nucleus_end = end - int(span * rng.uniform(0.05, 0.2))
        if nucleus_end - nucleus_start > 16:
            gate[nucleus_start:nucleus_end] = np.hanning(nucleus_end - nucleus_start) ** 0.5
        if rng.random() < 0.4 and nucleus_start - start > 16:
            fricative_gate[start:nucleus_start] = np.hanning(nucleus_start - start)
    noise = rng.normal(0.0, 1.0, length)
    hiss = np.diff(noise, prepend=0.0)  # first difference: energy towards high frequencies, like /s/
    signal = gate * (voiced + voice.breathiness * noise) + 0.15 * fricative_gate * hiss
    return (0.5 * signal / np.max(np.abs(signal))).astype(np.float32)


def pitched_frames(f0_hz: np.ndarray, frame_length: int, rng: np.random.Generator, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """One steady harmonic frame per f0 (light vibrato, random vowel, a little noise), [len(f0), frame_length]."""
    frames = np.empty((len(f0_hz), frame_length), dtype=np.float32)
    time = np.arange(frame_length, dtype=np.float64)
    for row, pitch in enumerate(f0_hz):
        vibrato = 1.0 + 0.004 * np.sin(2 * np.pi * rng.uniform(4, 7) * time / sample_rate + rng.uniform(0, 2 * np.pi))
        formants = np.broadcast_to(_VOWEL_FORMANTS[rng.integers(0, len(_VOWEL_FORMANTS))] * rng.uniform(0.85, 1.3), (frame_length, 3))
        tone = harmonic_signal(pitch * vibrato, formants, rng.uniform(0.6, 1.4), sample_rate)
        tone = tone / np.max(np.abs(tone))
        frames[row] = tone + rng.normal(0.0, 0.01, frame_length)
    return frames
