"""Seeded, realistic-enough inputs the zoo renders itself: text lines, document pages, speech-like
audio, polyphonic music. Everything is deterministic for a given seed on a given machine (the fonts
are the machine's own TrueType fonts, or Pillow's built-in one when there are none).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

WORDS = (
    "the of and to in is was for on that with as by at from his it an were are which this be or "
    "has had not first one their its new after but who they have her she two been other when there "
    "all during into school time may years more most only over city some world would where later up "
    "such used many can state about national out known university united then made model network "
    "weights compression bitstream entropy coding quantization layer tensor decoder encoder kernel "
    "invoice total amount date number page chapter section figure table results method data value "
    "Monday March Street Road Station Museum Hotel Avenue River North South Express Limited Report"
).split()
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "/usr/lib/python3/dist-packages/matplotlib/mpl-data/fonts")


@lru_cache(maxsize=1)
def font_files() -> tuple[Path, ...]:
    """The machine's TrueType fonts with Latin glyphs, sorted so a seed picks the same one each run."""
    found: list[Path] = []
    for root in FONT_DIRS:
        if Path(root).is_dir():
            found.extend(p for p in Path(root).rglob("*.ttf")
                         if not any(s in p.name for s in ("Emoji", "Symbol", "Math")))
    return tuple(sorted(found))


def font(rng: np.random.Generator, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    files = font_files()
    if files:
        return ImageFont.truetype(str(files[int(rng.integers(len(files)))]), size)
    return ImageFont.load_default(size)


def phrase(rng: np.random.Generator, words: int) -> str:
    parts = []
    for _ in range(words):
        if rng.random() < 0.15:
            parts.append(str(int(rng.integers(1, 10000))) + ("." if rng.random() < 0.3 else ""))
        else:
            parts.append(WORDS[int(rng.integers(len(WORDS)))])
    text = " ".join(parts)
    return text[:1].upper() + text[1:]


def _paper_and_ink(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    paper = tuple(int(v) for v in rng.integers(200, 256, 3))
    ink = tuple(int(v) for v in rng.integers(0, 70, 3))
    return paper, ink


def _finish(image: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """Scanner-like degradation: a little blur and sensor noise."""
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
    pixels = np.asarray(image, dtype=np.float32)
    pixels += rng.normal(0.0, rng.uniform(1.0, 6.0), pixels.shape).astype(np.float32)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def text_line(rng: np.random.Generator, height: int = 48) -> tuple[np.ndarray, str]:
    """One cropped line of text (H x W x 3 uint8, height `height`, width following the text)."""
    text = phrase(rng, int(rng.integers(1, 6)))
    face = font(rng, int(height * rng.uniform(0.55, 0.8)))
    paper, ink = _paper_and_ink(rng)
    left, top, right, bottom = face.getbbox(text)
    pad = int(rng.integers(2, 8))
    image = Image.new("RGB", (right - left + 2 * pad, height), paper)
    ImageDraw.Draw(image).text((pad - left, (height - (bottom - top)) // 2 - top), text, font=face, fill=ink)
    return _finish(image, rng), text


def document_page(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A page (H x W x 3 uint8): a title, paragraphs of text lines, a figure box and a ruled table."""
    paper, ink = _paper_and_ink(rng)
    image = Image.new("RGB", (width, height), paper)
    draw = ImageDraw.Draw(image)
    margin = int(width * rng.uniform(0.04, 0.1))
    y = margin
    title = font(rng, int(height * rng.uniform(0.035, 0.05)))
    draw.text((margin, y), phrase(rng, int(rng.integers(2, 5))), font=title, fill=ink)
    y += int(title.size * 1.8)
    body_size = int(height * rng.uniform(0.016, 0.028))
    body = font(rng, body_size)
    while y < height - margin - body_size:
        kind = rng.random()
        if kind < 0.15 and y < height * 0.7:  # a figure: a shaded box
            box_h = int(height * rng.uniform(0.1, 0.2))
            x0, x1 = margin + int(rng.integers(0, width // 6)), width - margin - int(rng.integers(0, width // 6))
            shade = tuple(int(v) for v in rng.integers(60, 200, 3))
            draw.rectangle((x0, y, x1, y + box_h), fill=shade, outline=ink)
            for _ in range(int(rng.integers(2, 6))):
                cx, cy = int(rng.integers(x0, x1)), int(rng.integers(y, y + box_h))
                r = int(rng.integers(5, max(6, box_h // 3)))
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
            y += box_h + body_size
        elif kind < 0.25 and y < height * 0.7:  # a table: ruled cells with numbers
            rows, cols = int(rng.integers(3, 6)), int(rng.integers(2, 5))
            cell_w, cell_h = (width - 2 * margin) // cols, int(body_size * 1.6)
            for r in range(rows + 1):
                draw.line((margin, y + r * cell_h, margin + cols * cell_w, y + r * cell_h), fill=ink, width=1)
            for c in range(cols + 1):
                draw.line((margin + c * cell_w, y, margin + c * cell_w, y + rows * cell_h), fill=ink, width=1)
            for r in range(rows):
                for c in range(cols):
                    draw.text((margin + c * cell_w + 4, y + r * cell_h + 2), phrase(rng, 1), font=body, fill=ink)
            y += rows * cell_h + body_size
        else:  # a paragraph
            for _ in range(int(rng.integers(2, 6))):
                if y >= height - margin - body_size:
                    break
                line = phrase(rng, int(rng.integers(3, 12)))
                draw.text((margin, y), line, font=body, fill=ink)
                y += int(body_size * rng.uniform(1.3, 1.7))
            y += body_size
    return _finish(image, rng)


def resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def speech_like(rng: np.random.Generator, seconds: float, rate: int = 16000) -> np.ndarray:
    """Float32 audio in [-1, 1]: voiced syllables (gliding f0, harmonics shaped by moving formants),
    fricative noise bursts and pauses of near silence, in random order."""
    total = int(seconds * rate)
    audio = np.zeros(total, dtype=np.float64)
    position = 0
    while position < total:
        kind = rng.random()
        length = min(total - position, int(rate * rng.uniform(0.15, 0.9)))
        t = np.arange(length) / rate
        if kind < 0.5:  # voiced
            f0 = rng.uniform(90, 260) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(1, 4) * t + rng.uniform(0, 6)))
            phase = 2 * np.pi * np.cumsum(f0) / rate
            formants = rng.uniform([300, 900, 2200], [900, 2200, 3200])
            glide = 1 + 0.2 * np.sin(2 * np.pi * rng.uniform(2, 5) * t)[:, None]
            harmonics = np.arange(1, 30)
            freqs = f0[:, None] * harmonics
            gain = sum(1.0 / (1.0 + ((freqs - f * glide) / 120.0) ** 2) for f in formants)
            gain = np.where(freqs < rate / 2 - 200, gain, 0.0)
            signal = np.sum(gain * np.sin(phase[:, None] * harmonics), axis=1)
            syllables = 0.5 - 0.5 * np.cos(2 * np.pi * rng.uniform(2.5, 6) * t)
            signal *= syllables * rng.uniform(0.1, 0.5) / max(1e-9, float(np.max(np.abs(signal))))
        elif kind < 0.65:  # fricative
            noise = rng.normal(0, 1, length)
            signal = np.diff(noise, prepend=0.0) * rng.uniform(0.02, 0.1)
            signal *= np.hanning(length)
        else:  # pause
            signal = rng.normal(0, rng.uniform(0.0005, 0.005), length)
        audio[position:position + length] = signal
        position += length
    return np.clip(audio, -1, 1).astype(np.float32)


def music_like(rng: np.random.Generator, samples: int, rate: int = 22050) -> np.ndarray:
    """Float32 audio: plucked/sustained harmonic notes (MIDI 36..96) with chords and overlaps."""
    audio = np.zeros(samples, dtype=np.float64)
    for _ in range(int(rng.integers(4, 14))):
        start = int(rng.integers(0, samples - rate // 10))
        length = min(samples - start, int(rate * rng.uniform(0.1, 1.2)))
        t = np.arange(length) / rate
        notes = [int(rng.integers(36, 97))]
        if rng.random() < 0.4:
            notes += [notes[0] + int(i) for i in rng.choice([3, 4, 7, 12], size=int(rng.integers(1, 3)), replace=False)]
        envelope = np.exp(-t * rng.uniform(1, 8)) * np.minimum(1, t * 200)
        for note in notes:
            f0 = 440.0 * 2 ** ((note - 69) / 12)
            harmonics = np.arange(1, 9)
            amps = rng.uniform(0.2, 1.0, len(harmonics)) / harmonics
            amps[f0 * harmonics >= rate / 2] = 0
            audio[start:start + length] += envelope * (np.sin(2 * np.pi * f0 * t[:, None] * harmonics) @ amps)
    audio += rng.normal(0, 0.002, samples)
    return (audio / max(1e-9, float(np.max(np.abs(audio)))) * rng.uniform(0.3, 0.9)).astype(np.float32)


def rapidocr_line(line: np.ndarray, height: int, width: int) -> np.ndarray:
    """rapidocr's resize_norm_img (recognizer and direction classifier alike): keep the aspect at
    `height`, at most `width` wide, scale to [-1, 1], zero-pad on the right."""
    h, w = line.shape[:2]
    resized_w = min(width, int(np.ceil(height * w / h)))
    image = resize(line, resized_w, height).astype(np.float32).transpose(2, 0, 1) / 255.0
    padded = np.zeros((3, height, width), dtype=np.float32)
    padded[:, :, :resized_w] = (image - 0.5) / 0.5
    return padded
