"""Values as people write them on a command line: byte sizes (`300000`, `200KB`, `1.5MB`,
`64KiB`) and sparsity lists (`0,0.3,0.5`)."""
from __future__ import annotations

import math
import re

# Decimal units are what file managers and download pages show; binary ones are accepted because
# people copy them from `ls -h` or memory limits. Bare K/M/G are decimal, like the KB/MB/GB this
# tool prints.
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE = re.compile(r"\s*(?P<number>[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(?P<unit>[A-Za-z]*)\s*")


def parse_size(text: str) -> int:
    """Bytes in `text`: a whole number of bytes, or a number with a unit (KB = 1000 B, KiB = 1024 B).

    Fractions are allowed with a unit (`1.5MB` = 1500000) and rounded to whole bytes; a bare
    number must be whole. Raises ValueError naming the text and what is accepted.
    """
    match = _SIZE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{text!r} is not a size: expected bytes such as 300000, 200KB, 1.5MB or 64KiB")
    number, unit = match["number"], match["unit"].lower()
    if unit not in _UNITS:
        raise ValueError(
            f"{text!r} has an unknown unit {match['unit']!r}: use B, KB, MB, GB (powers of 1000) or KiB, MiB, GiB (1024)"
        )
    value = float(number)
    size = value * _UNITS[unit]
    if not math.isfinite(size):
        raise ValueError(f"{text!r} is too large")
    if unit in ("", "b") and not value.is_integer():
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(round(size))


def format_size(size: float) -> str:
    """`1234567` -> `1.23 MB` (decimal units, matching what parse_size reads back)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1000.0
    return f"{size} B"


def parse_sparsities(text: str) -> tuple[float, ...]:
    """`0,0.3,0.5` -> (0.0, 0.3, 0.5); every value in [0, 1). Raises ValueError."""
    values = []
    for item in text.split(","):
        item = item.strip()
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"{item!r} is not a number (expected fractions such as 0.5 or 0,0.3,0.5)") from None
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{item} is not in the range 0<=x<1")
        values.append(value)
    return tuple(dict.fromkeys(values))
