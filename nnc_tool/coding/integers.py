"""Entropy coding of integer arrays with constriction.

An integer stream is self-describing: a head byte naming the method, the method's model
description, then the payload. The encoder estimates the exact size of every method (the
probability model constriction will use is reproduced bit for bit, see `quantized_weights`),
builds the cheapest and keeps the smallest of the close candidates, so nothing is ever coded
worse than fixed-width bits.

Methods (docs/FORMAT.md has the byte layout)
- FIXED: every value in w raw bits above the minimum (w = 0 codes a constant array).
- BINNED: value - center mapped to signed *bins*: magnitudes below 2^(b+1) have a bin each, larger
  ones share a bin per (bit length, top b bits below the leading one) and send the remaining low
  bits as uniform symbols. b = 0 are Exp-Golomb-like magnitude classes, a large b is a plain
  histogram; the encoder picks b. The bin histogram travels as quantized counts (r significant
  bits, Exp-Golomb-coded differences), so a small tensor does not pay for exact counts.
- PATTERN: for tensors with many zeros (pruning, coarse steps). Along one axis, groups of G
  neighbours code their zero/non-zero pattern as one symbol (a context model of each position's
  significance given its neighbours, learned as a 2^G-entry histogram), then the non-zero values
  with a BINNED model. This captures N:M sparsity exactly (a 2:4 group has 6 patterns, not 16).

Every entropy-coded symbol of a stream goes through one ANS stack coder (32-bit words, 24-bit
probabilities): bins or patterns with constriction `Categorical` models, low bits with exact
`Uniform` models of 2^k symbols.
"""
from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import constriction
import numpy as np

from ..bitstream.primitives import ByteReader, ByteWriter
from ..errors import BitstreamError

_AnsCoder = constriction.stream.stack.AnsCoder
_Categorical = constriction.stream.model.Categorical
_UNIFORM = constriction.stream.model.Uniform()

# Largest model alphabet (bins, patterns) a stream may declare.
MAX_ALPHABET = 1 << 16
# Sanity bound on any decoded count so hostile streams cannot request huge allocations.
MAX_VALUES = 1 << 31
PRECISION = 24  # constriction's probability precision (DefaultContiguousCategoricalEntropyModel)
MAX_BIN_BITS = 30  # b
MAX_COUNT_BITS = 7  # r
MAX_EG_K = 15  # Exp-Golomb parameter of count tables
MAX_GROUP = 9  # G of PATTERN
MIN_GROUP = 2
MAX_AXES = 32
# BINNED handles values with |value - center| < 2^62 and |center| < 2^62 (so both fit int64).
MAGNITUDE_LIMIT = 1 << 62
CHUNK_BITS = 16  # low bits travel as uniform symbols of at most this many bits
_ANS_OVERHEAD_BYTES = 3  # what an ANS stream costs beyond its symbols' code length, on average


class Method(enum.IntEnum):
    FIXED = 0
    BINNED = 1
    PATTERN = 2


@dataclass
class StreamStats:
    """Accounting filled in by `decode_integers(..., stats=)` (for entropy reports)."""

    side_bytes: int = 0  # method heads and model descriptions
    payload_bytes: int = 0  # ANS words and fixed-width fields
    ideal_bits: float = 0.0  # code length of the decoded symbols under the models used
    empirical_bits: float = 0.0  # the same symbols under their own (free, exact) order-0 statistics
    values: int = 0
    methods: dict[str, int] = field(default_factory=dict)
    measure: bool = True  # compute ideal/empirical code lengths (costs decoding time)

    def add(self, other: StreamStats) -> None:
        self.side_bytes += other.side_bytes
        self.payload_bytes += other.payload_bytes
        self.ideal_bits += other.ideal_bits
        self.empirical_bits += other.empirical_bits
        self.values += other.values
        for key, count in other.methods.items():
            self.methods[key] = self.methods.get(key, 0) + count


# =========================================================================================
# Public entry points
# =========================================================================================


def encode_integers(values: np.ndarray, shape: tuple[int, ...] | None = None) -> bytes:
    """Code an integer array (any int dtype, values within int64) into a self-describing stream.

    `shape` (default: the array's own shape) is the shape the decoder will be given; PATTERN
    groups neighbours along one of its axes.
    """
    flat, shape = _prepare(values, shape)
    plans = _plan(flat, shape)
    plans.sort(key=lambda p: _ranked(p, p.cost))
    best = plans[0]
    built = [(best, best.build())]
    # Estimates are exact up to the last ANS word: build close runners-up and keep the smallest.
    for other in plans[1:]:
        if _ranked(other, other.cost) <= _ranked(best, best.cost) + 8:
            built.append((other, other.build()))
    return min(built, key=lambda item: _ranked(item[0], len(item[1])))[1]


# PATTERN decodes a dense tensor more slowly than BINNED (ResNet-18 layer, 2.4 M values with 47 %
# zeros: 65 vs 43 ms) and on dense weights saves next to nothing (a re-parametrisation of the same
# histogram: within 0.02 %), so it must save this share of the bytes to be chosen. Sparse
# (pruned, very coarse) tensors save far more and keep it.
PATTERN_MIN_SAVING = 0.005


def _ranked(plan: _Plan, size: float) -> float:
    return size * (1.0 + PATTERN_MIN_SAVING) if plan.zero_fraction is not None else size


def decode_integers(
    data: bytes | memoryview,
    shape: int | tuple[int, ...],
    stats: StreamStats | None = None,
    value_map: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Inverse of `encode_integers`: the values in row-major order (int64, 1-D).

    With `value_map` (an element-wise map of int64 values, e.g. dequantization to float32) the
    result is `value_map(values)`; a BINNED stream applies it to its small per-symbol table and
    gathers once, instead of passing every value through int64 arithmetic and the map.
    """
    shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(d) for d in shape)
    count = math.prod(shape)
    if count > MAX_VALUES or any(d < 0 for d in shape):
        raise BitstreamError(None, f"tensor declares {count} values, above the limit")
    reader = ByteReader(data, "integer stream")
    head = reader.u8()
    method, parameter = head & 7, head >> 3
    local = StreamStats(values=count, measure=stats is not None)
    if method == Method.FIXED:
        values = _decode_fixed(reader, parameter, count, local)
    elif method == Method.BINNED:
        values = _decode_binned(reader, parameter, count, local, value_map)
        value_map = None  # applied
    elif method == Method.PATTERN:
        values = _decode_pattern(reader, parameter, shape, local)
    else:
        raise BitstreamError(None, f"unknown integer coding method {method}")
    reader.expect_end()
    local.side_bytes += 1  # the head byte
    local.methods[Method(method).name.lower()] = 1
    if stats is not None:
        stats.add(local)
    return values if value_map is None else value_map(values)


def estimated_bits(values: np.ndarray, shape: tuple[int, ...] | None = None) -> float:
    """Size in bits of the stream `encode_integers` would write for these values, side information
    included (exact up to the last ANS word), without building it."""
    flat, shape = _prepare(values, shape)
    return 8.0 * min(p.cost for p in _plan(flat, shape))


def value_bits(values: np.ndarray, low: int, high: int, shape: tuple[int, ...] | None = None) -> np.ndarray | None:
    """Code length in bits of every value in [low, high] under the model `encode_integers` would
    build for `values` (for rate-distortion optimised quantization).

    Bins the values never use cost as if they held half a count. For a PATTERN stream the cost is
    the marginal one: -log2 of the zero share for 0, and for other values -log2 of the non-zero
    share plus their code length in the non-zero model (the neighbour context is ignored).
    Returns None when fixed-width coding wins (every value in range costs the same).
    """
    flat, shape = _prepare(values, shape)
    best = min(_plan(flat, shape), key=lambda p: p.cost)
    if best.model is None:
        return None
    span = np.arange(low, high + 1, dtype=np.int64)
    if best.zero_fraction is None:
        return _model_bits(best.model, span)
    p = min(max(best.zero_fraction, 1e-9), 1 - 1e-9)
    nonzero = _model_bits(best.model, span - (span > 0)) - math.log2(1 - p)
    return np.where(span == 0, -math.log2(p), nonzero)


def _model_bits(model: _ValueModel, span: np.ndarray) -> np.ndarray:
    offsets = span - model.center
    bins, shift = bin_of(np.minimum(np.abs(offsets), MAGNITUDE_LIMIT - 1), model.b)
    symbols = np.where(offsets < 0, -bins, bins) - model.lo
    inside = (symbols >= 0) & (symbols < model.size)
    counts = count_value(model.codes, model.r).astype(np.float64) if model.size > 1 else np.ones(1)
    frequency = np.full(span.size, 0.5)
    frequency[inside] = np.maximum(counts[symbols[inside]], 0.5)
    return np.log2(counts.sum() / frequency) + shift


# Integer dtypes coded as they are; anything else (bool, uint64) is widened to int64 first.
# Every step that computes with the values works on blocks of BLOCK_VALUES widened to int64,
# so a large tensor's levels stay in their compact dtype.
_COMPACT = frozenset(np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64))
BLOCK_VALUES = 1 << 20


# FIXED packing expands every value to 64 bits on the way: smaller blocks (a multiple of 8 values).
_FIXED_BLOCK = 1 << 18


def _blocks(size: int, block: int = BLOCK_VALUES) -> range:
    return range(0, size, block)


def _prepare(values: np.ndarray, shape) -> tuple[np.ndarray, tuple[int, ...]]:
    values = np.asarray(values)
    shape = tuple(values.shape) if shape is None else tuple(int(d) for d in shape)
    dtype = values.dtype if values.dtype in _COMPACT else np.dtype(np.int64)
    flat = np.ascontiguousarray(values, dtype=dtype).ravel()
    if flat.size != math.prod(shape):
        raise ValueError(f"{flat.size} values do not fill shape {shape}")
    return flat, shape


# =========================================================================================
# Planning: estimated sizes of every method
# =========================================================================================


@dataclass
class _Plan:
    cost: float
    build: object  # () -> bytes
    model: _ValueModel | None = None  # BINNED: the values' model; PATTERN: the non-zero values' model
    zero_fraction: float | None = None  # PATTERN: share of zeros


def _plan(flat: np.ndarray, shape: tuple[int, ...]) -> list[_Plan]:
    plans = [_plan_fixed(flat)]
    if flat.size < 2 or plans[0].cost <= 8:
        return plans  # nothing else can be smaller than a few bytes
    low, high = int(flat.min()), int(flat.max())
    if low == high:
        return plans
    histogram = _histogram(flat, low, high)
    binned = _best_value_model(*histogram, bound=plans[0].cost)
    if binned is not None:
        plans.append(_Plan(1 + binned.cost_bytes, lambda: _build_binned(flat, binned), binned))
    pattern = _plan_pattern(flat, shape, histogram, min(p.cost for p in plans))
    if pattern is not None:
        plans.append(pattern)
    return plans


def _histogram(flat: np.ndarray, low: int, high: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values (int64, ascending) and how often each occurs."""
    if high - low <= 4 * flat.size + 1024:
        counts = np.zeros(high - low + 1, dtype=np.int64)
        for start in _blocks(flat.size):
            counts += np.bincount(flat[start : start + BLOCK_VALUES].astype(np.int64) - low, minlength=counts.size)
        present = np.flatnonzero(counts)
        return present.astype(np.int64) + low, counts[present].astype(np.int64)
    values, counts = np.unique(flat, return_counts=True)
    return values.astype(np.int64), counts.astype(np.int64)


# =========================================================================================
# FIXED
# =========================================================================================


def _plan_fixed(flat: np.ndarray) -> _Plan:
    low = int(flat.min()) if flat.size else 0
    width = (int(flat.max()) - low).bit_length() if flat.size else 0
    size = 1 + (width >= 31) + _svarint_size(low) + (flat.size * width + 7) // 8
    return _Plan(size, lambda: _encode_fixed(flat, low, width))


def _encode_fixed(flat: np.ndarray, low: int, width: int) -> bytes:
    writer = ByteWriter()
    writer.u8(Method.FIXED | (min(width, 31) << 3))
    if width >= 31:
        writer.u8(width)
    writer.svarint(low)
    if width:
        # Blocks of a multiple of 8 values end on a byte boundary, so packed blocks concatenate.
        for start in _blocks(flat.size, _FIXED_BLOCK):
            block = flat[start : start + _FIXED_BLOCK]
            offsets = block.astype(np.int64).astype(np.uint64) - np.uint64(low & 0xFFFFFFFFFFFFFFFF)
            writer.raw(pack_fixed(offsets, width))
    return writer.getvalue()


def _decode_fixed(reader: ByteReader, parameter: int, count: int, stats: StreamStats) -> np.ndarray:
    start = reader.position
    width = reader.u8() if parameter == 31 else parameter
    if width > 64 or (parameter == 31 and width < 31):
        raise BitstreamError(None, f"integer stream declares an invalid width of {width} bits")
    low = reader.svarint()
    if not -(1 << 63) <= low < (1 << 63):
        raise BitstreamError(None, "integer stream has a minimum outside int64")
    stats.side_bytes += reader.position - start
    if width == 0:
        return np.full(count, low, dtype=np.int64)
    nbytes = (count * width + 7) // 8
    packed = reader.raw(nbytes)
    stats.payload_bytes += nbytes
    stats.ideal_bits += count * width
    stats.empirical_bits += count * width
    offsets = unpack_fixed(packed, width, count)
    return (offsets + np.uint64(low & 0xFFFFFFFFFFFFFFFF)).view(np.int64)


# =========================================================================================
# Bins, counts and model tables
# =========================================================================================


def bit_length(values: np.ndarray) -> np.ndarray:
    """Vectorised int.bit_length of non-negative int64 (or uint64) values."""
    values = np.asarray(values)
    lengths = np.zeros(values.shape, dtype=np.int64)
    nonzero = values > 0
    # frexp is exact below 2**53; larger values are fixed up exactly.
    lengths[nonzero] = np.frexp(values[nonzero].astype(np.float64))[1]
    big = values >= (1 << 53)
    if big.any():
        lengths[big] = [int(v).bit_length() for v in values[big].tolist()]
    return lengths


def bin_of(magnitudes: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray]:
    """(bin, number of low bits not in the bin) of non-negative magnitudes < 2^62.

    Magnitudes below 2^(b+1) are their own bin; a larger one with bit length e keeps its top b+1
    bits t in bin 2^b * (e - b - 1) + t and leaves e - b - 1 low bits.
    """
    shift = np.maximum(bit_length(magnitudes) - (b + 1), 0)
    top = magnitudes >> shift
    return np.where(shift == 0, magnitudes, (shift << b) + top), shift


def bin_base(bins: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `bin_of` up to the low bits: (smallest magnitude of the bin, low bit count)."""
    bins = np.asarray(bins, dtype=np.int64)
    exact = bins < (2 << b)
    shift = np.where(exact, 0, (bins >> b) - 1)
    top = np.where(exact, bins, (1 << b) + (bins & ((1 << b) - 1)))
    return top << shift, shift


def max_bin(b: int) -> int:
    """The largest bin of a magnitude below 2^62."""
    return int(bin_of(np.array([MAGNITUDE_LIMIT - 1], dtype=np.int64), b)[0][0])


def count_code(counts: np.ndarray, r: int) -> np.ndarray:
    """Quantization index of each count, keeping r significant bits below the leading one."""
    return bin_of(np.asarray(counts, dtype=np.int64), r)[0]


def count_value(codes: np.ndarray, r: int) -> np.ndarray:
    """The count a quantization index stands for (midpoint of its interval; exact below 2^(r+1))."""
    base, shift = bin_base(codes, r)
    half = np.where(shift > 0, np.left_shift(1, np.maximum(shift - 1, 0)), 0)
    return base + half


def quantized_weights(counts: np.ndarray) -> np.ndarray:
    """The integer probabilities (out of 2^24) constriction's `Categorical(counts, perfect=False)` uses.

    This mirrors constriction's `fast_quantized_cdf`: every symbol gets weight 1, the rest is
    spread by floor(cumulative * (2^24 - n) / total) with sequential float64 sums. Exact, so the
    encoder knows its code lengths and `stream_entropy_report` the model's ideal code length.
    """
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.size
    cumulative = np.cumsum(counts)
    scale = float((1 << PRECISION) - n) / cumulative[-1]
    left_float = np.concatenate(([0.0], cumulative[:-1])) * scale
    left = left_float.astype(np.int64) + np.arange(n, dtype=np.int64)
    return np.diff(np.append(left, 1 << PRECISION))


def code_lengths(weights: np.ndarray) -> np.ndarray:
    """Bits of each symbol under integer weights out of 2^24."""
    return PRECISION - np.log2(weights.astype(np.float64))


def _eg_widths(z: np.ndarray, k: int) -> np.ndarray:
    return 2 * bit_length(z + (1 << k)) - 1 - k


_EG_KS = np.arange(MAX_EG_K + 1, dtype=np.int64)


def _table_bytes(codes: np.ndarray) -> tuple[int, int]:
    """(bytes, k) of the cheapest Exp-Golomb-k coding of a count-code table (with its u8)."""
    deltas = np.diff(codes, prepend=0)
    zig = np.where(deltas >= 0, 2 * deltas, -2 * deltas - 1)
    # Codeword widths for every k at once: 2 * bit_length(z + 2^k) - 1 - k.
    shifted = (zig[:, None] + (1 << _EG_KS)[None, :]).astype(np.float64)
    bits = (2 * np.frexp(shifted)[1] - 1 - _EG_KS[None, :]).sum(axis=0)
    k = int(np.argmin(bits))
    return 1 + (int(bits[k]) + 7) // 8, k


def _write_table(writer: ByteWriter, codes: np.ndarray, r: int, k: int) -> None:
    deltas = np.diff(codes, prepend=0)
    zig = np.where(deltas >= 0, 2 * deltas, -2 * deltas - 1).astype(np.int64)
    writer.u8(r | (k << 3))
    shifted = zig + (1 << k)
    writer.raw(pack_bits(shifted.astype(np.uint64), _eg_widths(zig, k)))


def _read_table(reader: ByteReader, size: int) -> tuple[np.ndarray, int]:
    """Count codes of a table with `size` entries, and r; validates every entry."""
    byte = reader.u8()
    r, k = byte & 7, (byte >> 3) & 15
    if byte >> 7:
        raise BitstreamError(None, "model table has a reserved bit set")
    # Each codeword is at most 2 * 48 + 1 + k bits; never look further than the table can reach.
    # Real tables are far shorter: a window for codewords of up to 2 * 12 + 1 + k bits is tried
    # first (finding codeword starts costs per bit of window: a third of a decode's time went
    # to windows ~20x the table), the whole reach only when the chain runs past it.
    reach = (size * (97 + k) + 7) // 8
    chained = None
    for window_bytes in (min(reach, (size * (25 + k) + 7) // 8 + 8), reach):
        window = reader.peek(window_bytes)
        chained = _codeword_chain(window, size, k, final=len(window) < window_bytes or window_bytes == reach)
        if chained is not None:
            break
    bits, first_one, starts, position = chained
    leading = first_one[starts]
    zeros = leading - starts
    if zeros.max() > 48:
        raise BitstreamError(None, "model table has an overlong codeword")
    widths = zeros + k + 1
    owners = np.repeat(np.arange(size), widths)
    run_starts = np.cumsum(widths) - widths
    local = np.arange(int(widths.sum())) - np.repeat(run_starts, widths)
    picked = bits[np.repeat(leading, widths) + local].astype(np.uint64)
    x = np.bitwise_or.reduceat(picked << (widths[owners] - 1 - local).astype(np.uint64), run_starts)
    zig = x.astype(np.int64) - (1 << k)
    codes = np.cumsum(np.where(zig & 1, -((zig + 1) >> 1), zig >> 1))
    if codes.min() < 0 or codes.max() > (40 << r):  # beyond that a count would exceed 2^48
        raise BitstreamError(None, "model table has an out-of-range count")
    reader.raw((position + 7) // 8)
    values = count_value(codes, r)
    if not values.any():
        raise BitstreamError(None, "model table is empty")
    return values, r


def _codeword_chain(window: bytes, size: int, k: int, final: bool):
    """(bits, next-one index per bit, codeword starts, end position) of `size` Exp-Golomb-k
    codewords at the start of `window`; None when they run past a window that is not `final`."""
    bits = np.unpackbits(np.frombuffer(window, dtype=np.uint8))
    total_bits = len(bits)
    ones = np.flatnonzero(bits)
    # For every bit position p: the next 1 at or after p, and where a codeword starting at p ends.
    after = np.searchsorted(ones, np.arange(total_bits))
    first_one = np.where(after < len(ones), ones[np.minimum(after, len(ones) - 1)] if len(ones) else 0, 1 << 40)
    ends = (2 * first_one - np.arange(total_bits) + k + 1).tolist()
    starts = np.empty(size, dtype=np.int64)
    position = 0
    for i in range(size):  # follow the chain of codewords (cheap: one list lookup each)
        if position >= total_bits:
            if not final:
                return None
            raise BitstreamError(None, "model table is truncated")
        starts[i] = position
        position = ends[position]
    if position > total_bits:
        if not final:
            return None
        raise BitstreamError(None, "model table is truncated")
    return bits, first_one, starts, position


# =========================================================================================
# Value models (BINNED and the non-zero values of PATTERN)
# =========================================================================================


@dataclass
class _ValueModel:
    center: int
    b: int
    lo: int  # lowest signed bin
    size: int  # number of bins
    r: int
    k: int
    codes: np.ndarray  # count code per bin
    cost_bytes: float  # description + payload estimate, without the head byte


def _best_value_model(values: np.ndarray, counts: np.ndarray, bound: float = math.inf) -> _ValueModel | None:
    """The (center, b, r) with the smallest estimated description + payload for this histogram.

    Candidates that cannot cost less than `bound` bytes (a table costs at least a bit per bin) are
    not scored; returns None when none can.
    """
    low, high = int(values[0]), int(values[-1])
    centers = [0]
    if low > 0 or high < 0:
        centers.append(low if low > 0 else high)
    best = None
    total = int(counts.sum())
    for center in centers:
        if max(abs(low - center), abs(high - center)) >= MAGNITUDE_LIMIT or abs(center) >= MAGNITUDE_LIMIT:
            continue
        offsets = values - center
        magnitudes = np.abs(offsets)
        r_guess = min(MAX_COUNT_BITS, max(0, int(math.log2(max(total, 2))) // 3))
        candidates = []
        for b in range(MAX_BIN_BITS + 1):
            bins, shift = bin_of(magnitudes, b)
            raw_bits = int((counts * shift).sum())
            signed = np.where(offsets < 0, -bins, bins)
            lo, hi = int(signed.min()), int(signed.max())
            if hi - lo + 1 > MAX_ALPHABET or (hi - lo + 1) / 8 >= bound:
                break  # finer bins only add table entries
            if raw_bits / 8 < bound:
                bin_counts = np.bincount(signed - lo, weights=counts, minlength=hi - lo + 1).astype(np.int64)
                used = bin_counts[bin_counts > 0]
                # Rough cost for ranking b: exact-count entropy, low bits, ~r+2 bits per table entry.
                rough = (float(-(used * np.log2(used / total)).sum()) + raw_bits + (hi - lo + 1) * (r_guess + 2)) / 8
                candidates.append((rough, b, lo, bin_counts, raw_bits))
            if raw_bits == 0:
                break  # every value has its own bin: a larger b changes nothing
        # Exact costs for the two most promising b; the cost is close to convex in r.
        candidates.sort(key=lambda c: c[0])
        for _, b, lo, bin_counts, raw_bits in candidates[:2]:
            scored = {r: _score(center, b, lo, bin_counts, raw_bits, r) for r in {max(0, r_guess - 1), r_guess, min(MAX_COUNT_BITS, r_guess + 1)}}
            for step in (-1, 1):
                r = min(scored, key=lambda q: scored[q].cost_bytes)
                while 0 <= r + step <= MAX_COUNT_BITS:
                    if r + step not in scored:
                        scored[r + step] = _score(center, b, lo, bin_counts, raw_bits, r + step)
                    if scored[r + step].cost_bytes >= scored[r].cost_bytes:
                        break
                    r += step
            model = min(scored.values(), key=lambda m: m.cost_bytes)
            if model.cost_bytes < bound and (best is None or model.cost_bytes < best.cost_bytes):
                best = model
    return best


def _score(center: int, b: int, lo: int, bin_counts: np.ndarray, raw_bits: int, r: int) -> _ValueModel:
    size = len(bin_counts)
    codes = count_code(bin_counts, r)
    description = _svarint_size(center) + _svarint_size(lo) + _varint_size(size - 1)
    if size == 1:
        return _ValueModel(center, b, lo, 1, r, 0, codes, description + (raw_bits + 7) // 8 + (_ANS_OVERHEAD_BYTES if raw_bits else 0))
    weights = quantized_weights(count_value(codes, r))
    used = bin_counts > 0
    bits = float((bin_counts[used] * code_lengths(weights[used])).sum()) + raw_bits
    table, k = _table_bytes(codes)
    return _ValueModel(center, b, lo, size, r, k, codes, description + table + bits / 8 + _ANS_OVERHEAD_BYTES)


def _write_value_model(writer: ByteWriter, model: _ValueModel) -> None:
    writer.svarint(model.center)
    writer.svarint(model.lo)
    writer.varint(model.size - 1)
    if model.size > 1:
        _write_table(writer, model.codes, model.r, model.k)


@dataclass
class _ReadModel:
    center: int
    b: int
    lo: int
    counts: np.ndarray | None  # None for a single bin

    def categorical(self):
        return _Categorical(self.counts, perfect=False)


def _read_value_model(reader: ByteReader, b: int) -> _ReadModel:
    if b > MAX_BIN_BITS:
        raise BitstreamError(None, f"integer stream declares {b} bin bits, above {MAX_BIN_BITS}")
    center = reader.svarint()
    lo = reader.svarint()
    size = reader.varint(MAX_ALPHABET - 1) + 1
    limit = max_bin(b)
    if abs(center) >= MAGNITUDE_LIMIT or lo < -limit or lo + size - 1 > limit:
        raise BitstreamError(None, "integer stream declares bins outside the representable range")
    counts = _read_table(reader, size)[0].astype(np.float64) if size > 1 else None
    return _ReadModel(center, b, lo, counts)


class _SymbolMapper:
    """Bin symbols and (low bits, low-bit counts) of values under a value model, a block at a time.

    When the values span a range no wider than their count, each distinct value is mapped once
    into a table and blocks gather from it: much cheaper than per-value bit lengths. The symbol
    pass gathers only the symbols, and a table without low bits (a plain histogram) skips the
    low-bit pass altogether.
    """

    def __init__(self, model: _ValueModel, low: int, high: int, count: int) -> None:
        self._model = model
        self._low = low
        self._table = None
        self.has_low_bits = True
        if count > 4096 and high - low <= count:
            symbols, shift, low_bits = _value_symbols_direct(np.arange(low, high + 1, dtype=np.int64), model)
            self._table = (symbols.astype(np.int32), shift.astype(np.int8), low_bits)
            self.has_low_bits = bool(shift.any())

    def symbols(self, values: np.ndarray) -> np.ndarray:
        if self._table is None:
            return _value_symbols_direct(values.astype(np.int64), self._model)[0]
        return self._table[0][np.subtract(values, self._low, dtype=np.intp)]

    def low_bits(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(low bits, their count) of every value."""
        if self._table is None:
            _, shift, bits = _value_symbols_direct(values.astype(np.int64), self._model)
            return bits, shift
        index = np.subtract(values, self._low, dtype=np.intp)
        return self._table[2][index], self._table[1][index]


def _value_symbols_direct(values: np.ndarray, model: _ValueModel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    offsets = values - model.center
    magnitudes = np.abs(offsets)
    bins, shift = bin_of(magnitudes, model.b)
    signed = np.where(offsets < 0, -bins, bins)
    low_bits = (magnitudes & (np.left_shift(1, shift) - 1)).astype(np.uint64)
    return signed - model.lo, shift, low_bits


def _symbol_tables(model: _ReadModel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per symbol of the model's alphabet: smallest magnitude of its bin, low-bit count, sign."""
    size = 1 if model.counts is None else model.counts.size
    signed = np.arange(model.lo, model.lo + size, dtype=np.int64)
    base, shift = bin_base(np.abs(signed), model.b)
    return base, shift, signed < 0


def _symbol_values(tables, center: int) -> np.ndarray:
    """Per symbol of the alphabet: its value when it carries no low bits (int64)."""
    base, _, negative = tables
    return np.where(negative, -base, base) + np.int64(center)


def _values_from_symbols(symbols: np.ndarray, low_bits: np.ndarray | None, tables, center: int) -> np.ndarray:
    """Values of decoded symbols; `low_bits` None when no symbol of the alphabet has any."""
    values = _symbol_values(tables, center)[symbols]
    if low_bits is None:
        return values
    return values + np.where(tables[2], -1, 1)[symbols] * low_bits.astype(np.int64)


# =========================================================================================
# The ANS payload: categorical symbols and uniform low-bit chunks in one stack
# =========================================================================================


class _AnsWriter:
    """Collects parts in decoding order; pushes them in reverse.

    A part is produced a block at a time (`make(i)` for block i of `blocks`), so a large
    tensor's symbols never exist all at once: the stack coder takes the blocks last to first.
    """

    def __init__(self) -> None:
        self._parts: list[tuple] = []

    def categorical(self, symbols: np.ndarray, counts: np.ndarray | None) -> None:
        self.categorical_blocks(1, lambda _: symbols, counts)

    def categorical_blocks(self, blocks: int, make, counts: np.ndarray | None) -> None:
        if counts is not None and blocks:
            self._parts.append(("categorical", blocks, make, counts.astype(np.float64)))

    def low_bits(self, fields: np.ndarray, widths: np.ndarray) -> None:
        self.low_bits_blocks(1, lambda _: (fields, widths))

    def low_bits_blocks(self, blocks: int, make) -> None:
        """`make(i)` returns block i's (fields, widths)."""
        if blocks:
            self._parts.append(("uniform", blocks, make, None))

    def getvalue(self) -> bytes:
        coder = _AnsCoder()
        pushed = False
        for kind, blocks, make, counts in reversed(self._parts):
            model = _Categorical(counts, perfect=False) if kind == "categorical" else None
            for i in reversed(range(blocks)):
                if kind == "categorical":
                    symbols = np.asarray(make(i))
                    if symbols.size:
                        coder.encode_reverse(symbols.astype(np.int32, copy=False), model)
                        pushed = True
                else:
                    chunks, sizes = _chunks(*make(i))
                    if chunks.size:
                        coder.encode_reverse(chunks, _UNIFORM, sizes)
                        pushed = True
        if not pushed:
            return b""
        raw = coder.get_compressed().astype("<u4").tobytes()
        # The last word's high zero bytes are implied (the decoder pads to whole words).
        trim = 0
        while trim < 3 and raw and raw[len(raw) - 1 - trim] == 0:
            trim += 1
        return raw[: len(raw) - trim]


class _AnsReader:
    def __init__(self, payload: memoryview, stats: StreamStats) -> None:
        stats.payload_bytes += len(payload)
        padded = bytes(payload) + b"\x00" * (-len(payload) % 4)
        words = np.frombuffer(padded, dtype="<u4").astype(np.uint32)
        try:
            self._coder = _AnsCoder(words) if len(words) else None
        except Exception as exc:  # e.g. a stream ending in a zero word
            raise BitstreamError(None, f"entropy-coded payload is corrupt ({exc})") from None
        self._stats = stats

    def categorical(self, counts: np.ndarray | None, count: int) -> np.ndarray:
        """`count` symbols, in the smallest unsigned dtype that holds the alphabet."""
        if counts is None or count == 0:
            return np.zeros(count, dtype=np.uint8)
        dtype = np.uint8 if counts.size <= 1 << 8 else np.uint16  # MAX_ALPHABET is 2^16
        model = _Categorical(counts, perfect=False)
        symbols = np.empty(count, dtype=dtype)
        # Decoded a block at a time: constriction hands back int32, 4 bytes a symbol.
        for begin in range(0, count, BLOCK_VALUES):
            size = min(BLOCK_VALUES, count - begin)
            symbols[begin : begin + size] = self._decode(model, size)
        if not self._stats.measure:
            return symbols
        weights = quantized_weights(counts)
        self._stats.ideal_bits += float(code_lengths(weights)[symbols].sum())
        observed = np.bincount(symbols, minlength=counts.size)
        observed = observed[observed > 0]
        self._stats.empirical_bits += float(-(observed * np.log2(observed / count)).sum())
        return symbols

    def low_bits(self, widths: np.ndarray) -> np.ndarray:
        owners, chunk_widths, shifts = _chunk_layout(widths)
        fields = np.zeros(len(widths), dtype=np.uint64)
        if not len(owners):
            return fields
        chunks = self._decode(_UNIFORM, np.left_shift(1, chunk_widths).astype(np.int32)).astype(np.uint64)
        self._stats.ideal_bits += float(chunk_widths.sum())
        self._stats.empirical_bits += float(chunk_widths.sum())
        # A field's chunks are consecutive and disjoint in bits: OR-reduce each run.
        first = np.flatnonzero(np.diff(owners, prepend=-1))
        fields[owners[first]] = np.bitwise_or.reduceat(chunks << shifts.astype(np.uint64), first)
        return fields

    def _decode(self, model, count_or_sizes) -> np.ndarray:
        if self._coder is None:
            raise BitstreamError(None, "entropy-coded payload is missing")
        try:
            symbols = self._coder.decode(model, count_or_sizes)
        except Exception as exc:  # constriction raises plain exceptions on exhausted/invalid data
            raise BitstreamError(None, f"entropy-coded payload is corrupt ({exc})") from None
        return np.asarray(symbols)

    def finish(self) -> None:
        if self._coder is not None and not self._coder.is_empty():
            raise BitstreamError(None, "entropy-coded payload has data left over (corrupt)")


def _chunk_layout(widths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per chunk: owning field, width, and shift within the field (most significant chunk first)."""
    widths = np.asarray(widths, dtype=np.int64)
    if not widths.size or widths.max() <= CHUNK_BITS:  # the common case: at most one chunk per field
        owners = np.flatnonzero(widths)
        return owners, widths[owners], np.zeros(owners.size, dtype=np.int64)
    chunks_per_field = (widths + CHUNK_BITS - 1) // CHUNK_BITS
    owners = np.repeat(np.arange(len(widths)), chunks_per_field)
    if not len(owners):
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    starts = np.cumsum(chunks_per_field) - chunks_per_field
    index = np.arange(len(owners)) - np.repeat(starts, chunks_per_field)
    per_field = chunks_per_field[owners]
    shifts = CHUNK_BITS * (per_field - 1 - index)
    chunk_widths = np.where(index == 0, widths[owners] - CHUNK_BITS * (per_field - 1), CHUNK_BITS)
    return owners, chunk_widths, shifts


def _chunks(fields: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    owners, chunk_widths, shifts = _chunk_layout(widths)
    if not len(owners):
        return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int32)
    mask = (np.left_shift(np.uint64(1), chunk_widths.astype(np.uint64)) - np.uint64(1)).astype(np.uint64)
    chunks = (fields.astype(np.uint64)[owners] >> shifts.astype(np.uint64)) & mask
    return chunks.astype(np.int32), np.left_shift(1, chunk_widths).astype(np.int32)


# =========================================================================================
# BINNED
# =========================================================================================


def _build_binned(flat: np.ndarray, model: _ValueModel) -> bytes:
    writer = ByteWriter()
    writer.u8(Method.BINNED | (model.b << 3))
    _write_value_model(writer, model)
    writer.raw(_value_payload(flat, model, _AnsWriter()))
    return writer.getvalue()


def _value_payload(values: np.ndarray, model: _ValueModel, ans: _AnsWriter) -> bytes:
    """The ANS payload of `ans`'s parts so far followed by `values` under a value model."""
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    mapper = _SymbolMapper(model, low, high, values.size)
    blocks = _blocks(values.size)

    def block(i: int) -> np.ndarray:
        return values[blocks[i] : blocks[i] + BLOCK_VALUES]

    if model.size > 1:
        ans.categorical_blocks(len(blocks), lambda i: mapper.symbols(block(i)), count_value(model.codes, model.r))
    if mapper.has_low_bits:
        ans.low_bits_blocks(len(blocks), lambda i: mapper.low_bits(block(i)))
    return ans.getvalue()


def _decode_binned(reader: ByteReader, b: int, count: int, stats: StreamStats, value_map=None) -> np.ndarray:
    start = reader.position
    model = _read_value_model(reader, b)
    stats.side_bytes += reader.position - start
    ans = _AnsReader(reader.raw(reader.remaining), stats)
    symbols = ans.categorical(model.counts, count)  # compact: 1-2 bytes per value
    tables = _symbol_tables(model)
    shift = tables[1]
    if not shift.any():
        # No low bits: map the per-symbol table (e.g. dequantize it), then one gather per value.
        value_of = _symbol_values(tables, model.center)
        value_of = value_of if value_map is None else value_map(value_of)
        ans.finish()
        out = np.empty(count, dtype=value_of.dtype)
        for begin in range(0, count, BLOCK_VALUES):
            out[begin : begin + BLOCK_VALUES] = value_of[symbols[begin : begin + BLOCK_VALUES].astype(np.intp)]
        return out
    # The values are built a block at a time (the low bits follow all the symbols in the stream),
    # so a huge tensor never holds more than its compact symbols, its output and one block.
    mapped = (lambda v: v) if value_map is None else value_map
    out = np.empty(count, dtype=mapped(np.zeros(0, dtype=np.int64)).dtype)
    for begin in range(0, count, BLOCK_VALUES):
        part = symbols[begin : begin + BLOCK_VALUES].astype(np.intp)
        out[begin : begin + part.size] = mapped(_values_from_symbols(part, ans.low_bits(shift[part]), tables, model.center))
    ans.finish()
    return out


# =========================================================================================
# PATTERN
# =========================================================================================


def _patterns(sig: np.ndarray, axis: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Pattern symbol of every group (bit j = position j is non-zero) and the scan order.

    `sig` is the boolean significance of the tensor (its shape); lines run along `axis`, cut
    into groups of `group` from the start of each line (the last group of a line may be short).
    Returns the patterns and, for the non-zero values, the order in which they are coded.
    """
    moved = np.moveaxis(sig, axis, -1)
    length = moved.shape[-1]
    lines = moved.reshape(-1, length)
    padded_length = -(-length // group) * group
    if padded_length != length:
        lines = np.concatenate([lines, np.zeros((lines.shape[0], padded_length - length), dtype=bool)], axis=1)
    # Shift-and-or over the group's columns: 4-12x faster than np.packbits along a short axis.
    groups = lines.reshape(-1, group).view(np.uint8)
    patterns = groups[:, 0].astype(np.uint16 if group > 8 else np.uint8)
    for j in range(1, group):
        patterns |= groups[:, j].astype(patterns.dtype) << j
    return patterns.astype(np.int64), lines


def _scan_order(shape: tuple[int, ...], axis: int) -> np.ndarray:
    """Row-major indices of the tensor in the scan order of lines along `axis`."""
    return np.moveaxis(np.arange(math.prod(shape), dtype=np.int64).reshape(shape), axis, -1).ravel()


def _plan_pattern(flat: np.ndarray, shape: tuple[int, ...], histogram, bound: float) -> _Plan | None:
    values, counts = histogram
    zero_index = np.searchsorted(values, 0)
    zeros = int(counts[zero_index]) if zero_index < len(values) and values[zero_index] == 0 else 0
    n = flat.size
    if zeros == 0 or zeros == n or len(shape) == 0 or len(shape) > MAX_AXES:
        return None
    p = zeros / n
    sig_info_bytes = n * -(p * math.log2(p) + (1 - p) * math.log2(1 - p)) / 8
    if sig_info_bytes < 24:
        return None  # at most this much to gain: not worth a second model
    sig = (flat != 0).reshape(shape)
    layouts = []
    for axis, length in enumerate(shape):
        if length < 2:
            continue
        sample = _lines(_sample(sig, axis), axis)  # one copy per axis, shared by every group size
        groups = sorted({g for g in (2, 3, 4, 8, length) if MIN_GROUP <= g <= MAX_GROUP})
        for group in groups:
            patterns, _ = _patterns(sample, 1, group)
            pattern_counts = np.bincount(patterns, minlength=1 << group)
            used = pattern_counts[pattern_counts > 0]
            # Rank layouts by the patterns' exact-count entropy plus ~4 bits per table entry.
            entropy = float(-(used * np.log2(used / patterns.size)).sum()) * (sig.size / sample.size)
            cost = (entropy + 4 * (1 << group)) / 8
            layouts.append((cost, axis, group))
    if not layouts:
        return None
    # PATTERN only pays for the neighbour dependence of the zeros: what the sampled layouts
    # save over coding each position's significance alone. Below half the share it must save,
    # skip the exact counts and the second value model (ResNet-18, data-free: coding 0.1 s
    # faster; over 56 sample-model streams, two pruned ones grow by 3 and 5 bytes).
    if sig_info_bytes - min(layouts)[0] < 0.5 * PATTERN_MIN_SAVING * bound:
        return None
    nonzero_mask = values != 0
    nz_values = values[nonzero_mask]
    nz_values = nz_values - (nz_values > 0)
    nz_model = _best_value_model(nz_values, counts[nonzero_mask], bound=bound)
    if nz_model is None:
        return None
    best = None
    for _, axis, group in sorted(layouts)[:2]:
        cost, r, k, codes = _pattern_table_cost(_count_patterns(sig, axis, group))
        if best is None or cost < best[0]:
            best = (cost, axis, group, r, k, codes)
    cost, axis, group, r, k, codes = best
    total = 2 + cost + nz_model.cost_bytes

    def build() -> bytes:
        return _build_pattern(flat, shape, axis, group, r, k, codes, nz_model)

    return _Plan(total, build, nz_model, zeros / n)


def _sample(sig: np.ndarray, axis: int, target: int = 1 << 16) -> np.ndarray:
    """A leading slice of a large tensor (whole lines along `axis`) to rank PATTERN layouts on."""
    if sig.size <= 2 * target:
        return sig
    if sig.ndim == 1:
        return sig[: target - target % 2520]  # whole groups of every size 2..9
    cut = 1 if axis == 0 else 0
    keep = max(1, sig.shape[cut] * target // sig.size)
    return sig[(slice(None),) * cut + (slice(0, keep),)]


def _pattern_table_cost(pattern_counts: np.ndarray) -> tuple[float, int, int, np.ndarray]:
    used = pattern_counts > 0

    def score(r: int) -> tuple[float, int, int, np.ndarray]:
        codes = count_code(pattern_counts, r)
        weights = quantized_weights(count_value(codes, r))
        bits = float((pattern_counts[used] * code_lengths(weights[used])).sum())
        table, k = _table_bytes(codes)
        return table + bits / 8, r, k, codes

    # The cost is close to convex in r: walk from a guess while it improves.
    r = min(MAX_COUNT_BITS, max(0, int(math.log2(max(int(pattern_counts.sum()), 2))) // 3))
    best = score(r)
    for step in (-1, 1):
        while 0 <= best[1] + step <= MAX_COUNT_BITS:
            candidate = score(best[1] + step)
            if candidate[0] >= best[0]:
                break
            best = candidate
    return best


def _lines(array: np.ndarray, axis: int) -> np.ndarray:
    """The tensor as lines along `axis`, in scan order (a view when `axis` is the last one)."""
    moved = np.moveaxis(array, axis, -1)
    return moved.reshape(-1, moved.shape[-1]) if moved.ndim else moved.reshape(1, 1)


def _pattern_blocks(lines: np.ndarray, group: int) -> tuple[int, object]:
    """(block count, make(i)) of the pattern symbols of significance `lines`, a block of lines at a time."""
    per_block = max(1, BLOCK_VALUES // max(lines.shape[1], 1))
    starts = range(0, lines.shape[0], per_block)

    def make(i: int) -> np.ndarray:
        part = lines[starts[i] : starts[i] + per_block]
        return _patterns(part != 0, 1, group)[0]

    return len(starts), make


def _count_patterns(values: np.ndarray, axis: int, group: int) -> np.ndarray:
    """How often each pattern occurs along `axis` in groups of `group` (2^group entries)."""
    blocks, make = _pattern_blocks(_lines(values, axis), group)
    counts = np.zeros(1 << group, dtype=np.int64)
    for i in range(blocks):
        counts += np.bincount(make(i), minlength=1 << group)
    return counts


def _build_pattern(flat, shape, axis, group, r, k, codes, nz_model: _ValueModel) -> bytes:
    writer = ByteWriter()
    writer.u8(Method.PATTERN | (nz_model.b << 3))
    writer.u8(axis | ((group - MIN_GROUP) << 5))
    _write_table(writer, codes, r, k)
    _write_value_model(writer, nz_model)
    lines = _lines(flat.reshape(shape), axis)
    scanned = lines.ravel()  # a copy only when lines run along an inner axis
    nonzero = scanned[scanned != 0].astype(np.int64)
    nonzero -= nonzero > 0
    ans = _AnsWriter()
    ans.categorical_blocks(*_pattern_blocks(lines, group), count_value(codes, r))
    writer.raw(_value_payload(nonzero, nz_model, ans))
    return writer.getvalue()


def _decode_pattern(reader: ByteReader, b: int, shape: tuple[int, ...], stats: StreamStats) -> np.ndarray:
    start = reader.position
    layout = reader.u8()
    axis, group = layout & 31, (layout >> 5) + MIN_GROUP
    if axis >= len(shape) or group > MAX_GROUP:
        raise BitstreamError(None, f"pattern stream names axis {axis} / group {group} of a {len(shape)}-d tensor")
    pattern_counts = _read_table(reader, 1 << group)[0].astype(np.float64)
    model = _read_value_model(reader, b)
    stats.side_bytes += reader.position - start
    length = shape[axis]
    count = math.prod(shape)
    lines = count // length if length else 0
    groups_per_line = -(-length // group)
    ans = _AnsReader(reader.raw(reader.remaining), stats)
    patterns = ans.categorical(pattern_counts, lines * groups_per_line)
    bits = np.unpackbits(patterns.astype("<u2").view(np.uint8).reshape(-1, 2), axis=1, bitorder="little")[:, :group]
    sig = bits.reshape(lines, groups_per_line * group)
    if sig[:, length:].any():
        raise BitstreamError(None, "pattern stream marks positions beyond the end of a line")
    sig = sig[:, :length].astype(bool).ravel()
    nonzero_count = int(sig.sum())
    symbols = ans.categorical(model.counts, nonzero_count)
    tables = _symbol_tables(model)
    low_bits = ans.low_bits(tables[1][symbols]) if tables[1].any() else None
    ans.finish()
    nonzero = _values_from_symbols(symbols, low_bits, tables, model.center)
    nonzero = nonzero + (nonzero >= 0)
    scanned = np.zeros(count, dtype=np.int64)
    scanned[sig] = nonzero
    values = np.empty(count, dtype=np.int64)
    values[_scan_order(shape, axis)] = scanned
    return values


# =========================================================================================
# Bit packing and small helpers
# =========================================================================================


def pack_bits(fields: np.ndarray, widths: np.ndarray) -> bytes:
    """Concatenate each field's low `width` bits, most significant first, zero-padded to a byte."""
    widths = np.asarray(widths, dtype=np.int64)
    total = int(widths.sum())
    if total == 0:
        return b""
    fields = np.asarray(fields, dtype=np.uint64)
    owners = np.repeat(np.arange(len(fields)), widths)
    starts = np.cumsum(widths) - widths
    position = np.arange(total) - np.repeat(starts, widths)
    shift = (widths[owners] - 1 - position).astype(np.uint64)
    bits = ((fields[owners] >> shift) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits).tobytes()


def pack_fixed(fields: np.ndarray, width: int) -> bytes:
    """`pack_bits` with every field `width` bits wide, without per-bit index arrays."""
    if width == 0 or not len(fields):
        return b""
    # Each field's 64 bits, most significant first; keep the low `width` of them.
    bits = np.unpackbits(np.asarray(fields, dtype=">u8").view(np.uint8).reshape(-1, 8), axis=1)
    return np.packbits(bits[:, 64 - width :]).tobytes()


def unpack_fixed(packed: memoryview | bytes, width: int, count: int) -> np.ndarray:
    """Inverse of `pack_fixed` (uint64 fields), a block of fields at a time."""
    fields = np.zeros(count, dtype=np.uint64)
    if width == 0 or count == 0:
        return fields
    data = np.frombuffer(packed, dtype=np.uint8)
    for start in _blocks(count, _FIXED_BLOCK):
        n = min(_FIXED_BLOCK, count - start)
        first_bit = start * width
        chunk = data[first_bit // 8 : (first_bit + n * width + 7) // 8]
        bits = np.unpackbits(chunk)[: n * width].reshape(n, width)
        wide = np.zeros((n, 64), dtype=np.uint8)
        wide[:, 64 - width :] = bits
        fields[start : start + n] = np.packbits(wide, axis=1).view(">u8").ravel()
    return fields


def unpack_bits(packed: memoryview | bytes, widths: np.ndarray) -> np.ndarray:
    """Inverse of `pack_bits` (uint64 fields)."""
    widths = np.asarray(widths, dtype=np.int64)
    total = int(widths.sum())
    fields = np.zeros(len(widths), dtype=np.uint64)
    if total == 0:
        return fields
    bits = np.unpackbits(np.frombuffer(packed, dtype=np.uint8))[:total].astype(np.uint64)
    owners = np.repeat(np.arange(len(widths)), widths)
    starts = np.cumsum(widths) - widths
    position = np.arange(total) - np.repeat(starts, widths)
    shift = (widths[owners] - 1 - position).astype(np.uint64)
    has_bits = widths > 0
    fields[has_bits] = np.bitwise_or.reduceat(bits << shift, starts[has_bits])
    return fields


def _varint_size(value: int) -> int:
    return max(1, (int(value).bit_length() + 6) // 7)


def _svarint_size(value: int) -> int:
    return _varint_size((value << 1) if value >= 0 else ((-value << 1) - 1))
