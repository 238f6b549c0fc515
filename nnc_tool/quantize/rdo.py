"""Rounding decisions beyond round-to-nearest: rate-aware (RDOQ) and output-aware (GPTQ).

RDOQ (`rdo_round`, QuantSettings.rdo). Plain rounding picks, for every value u = w / step, the
nearest level. RDOQ picks between the two nearest levels, floor(u) and floor(u) + 1 (one of them
is the nearest), the one that minimises

    J = (u - q)^2 + c * bits(q)

i.e. D + lambda * R in the weight domain with lambda = c * step^2, so the trade-off does not
depend on the tensor's scale. bits(q) is the code length of level q under a static model of the
tensor's levels like the ones the entropy coder builds (coding/integers.py): the levels'
histogram, or for wide alphabets the histogram of signed bit lengths plus raw low bits. The
model depends on the decisions, so the two alternate (a few vectorised passes from plain
rounding), as in entropy-constrained scalar quantization. Every pass keeps plain rounding
feasible and re-fits the model to what it chose, so the cost (distortion + lambda * estimated
size, side information included) never rises; a pass is kept only if it lowers the cost and does
not raise the levels' empirical entropy. Reconstruction stays level * step.

c: at high rate a uniform quantizer's distortion-rate slope is -dD/dR = ln(2)/6 * step^2 ~ 0.116
step^2, the lambda that matches the chosen step; DEFAULT_LAMBDA = 0.12. Measured (benchmark
driver, BD-rate at equal output SNR against plain rounding, sample models): weight-domain SNR
improves by only 0.05-0.4 % of rate at the benchmark's 3.7-9 bits/weight (on a Laplacian source
RDOQ gains ~0.3 dB at 2.4 bits/value, ~0 above 4), while the output SNR gets worse at coarse
steps: moving values towards zero shrinks every layer's gain coherently, which the network's
output feels far more than independent noise (resnet, data-free allocation: BD -18.9 % without,
-14.7 % with c = 0.12; at QP -18 4 % fewer bytes cost 9 dB). Hence it is off by default.

GPTQ (`gptq_round`; Frantar et al. 2023, after Optimal Brain Quantization). With calibration
inputs x of a layer y = W x and their Hessian H = sum x x^T, the columns of W are rounded one
after another and each column's rounding error is spread over the columns not yet rounded so
that the layer output moves least. With correlated inputs (image patches, features) the output
error drops several-fold at the same step and the same size; the levels still lie on the uniform
grid, so the decoder is unchanged. Wide layers get the feedback within blocks of GPTQ_BLOCK
consecutive columns, which keeps the cost linear in the layer's width.

Kernel feedback (`kernel_feedback_round`, QuantSettings.kernel_correlation), the data-free
counterpart: without calibration inputs the one thing known about a convolution's input is that
neighbouring positions of a feature map are positively correlated (natural images, and every
feature map computed from them). GPTQ with the prior H = I (channels) x S (taps), S[a, b] =
rho^(|di| + |dj|) (Manhattan distance between taps a and b of the kernel), spreads each tap's
rounding error over the taps of the same kernel not yet rounded: the kernel's error becomes
high-pass, which a smooth input averages out. Cheap (one vectorised step per tap) and the
decoder is unchanged. Measured (benchmark driver, data-free, BD-rate vs NNCodec at equal output
SNR; rho = 0 / 0.2 / 0.3 / 0.4 / 0.6): ResNet-18 -16.5 / -19.1 / -19.2 / - / -13.7 %, sample
resnet -20.7 / - / -21.2 / -19.9 (0.5) / -18.0 (0.7) %, mobilenet -23.1 / -23.2 / -23.3 / -23.3 %,
lenet within 0.4 points of each other. A prior stronger than the real correlation hurts (deep
layers see small, less smooth maps), a mild one is a fair bet: DEFAULT_KERNEL_CORRELATION = 0.3.
Its price where the inputs are not correlated at all: about 12 % more output error (0.5 dB) from
those layers; `--kernel-correlation 0` turns it off.

Kronecker feedback (`kronecker_factor`, `kronecker_gptq_round`): where BatchNorm statistics give
an estimate C of the input channels' second moments (graph/activation_stats.py), the data-free
Hessian becomes C (x) S instead of I (x) S. Its inverse factors as U_C (x) U_S, so GPTQ on it
needs no [channels * taps]^2 matrix: each input channel's kernel is rounded tap by tap exactly as
kernel feedback does, and the kernel's error reaches every later channel of its block through one
vector (the taps' errors times U_S) scaled by U_C's row: the same levels as dense GPTQ on the
Kronecker blocks, at a cost per weight of the block's width instead of width x taps. Blocks hold
KRONECKER_BLOCK_CHANNELS channels contiguous in channel order; all layers of one kernel shape are
rounded side by side, so the Python loop runs width x taps steps per model. Data-free ResNet-18:
BD-rate vs NNCodec -19.2 % (kernel feedback) -> -21.2 %, in 0.2 s of its encode.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..defaults import DEFAULT_KERNEL_CORRELATION

# Lambda scale c in lambda = c * step^2 (bits are in bits, distortion in squared steps).
DEFAULT_LAMBDA = 0.12
# Kernels of more taps than this are rounded to nearest (one Python step per tap).
MAX_KERNEL_TAPS = 64
# Error feedback runs in float32: levels (and the values feedback moves) stay exact below this.
EXACT_LEVELS = 1 << 22
MAX_ITERATIONS = 4
# Below this many values the entropy coder uses fixed-width or trivially small streams.
MIN_VALUES = 17
_MAX_HISTOGRAM_ALPHABET = 1 << 16  # the coder's largest model alphabet (coding/integers.MAX_ALPHABET)


def rdo_round(scaled: np.ndarray, lam: float = DEFAULT_LAMBDA, iterations: int = MAX_ITERATIONS) -> np.ndarray:
    """int64 levels, each floor(u) or floor(u) + 1 of its value u in `scaled`, minimising D + lam * R.

    `scaled` holds values divided by their step (finite). Returns plain rounding when lam <= 0,
    for tiny arrays, or when rate-aware decisions cannot lower the cost.
    """
    u = np.asarray(scaled, dtype=np.float64)
    shape = u.shape
    u = u.ravel()
    plain = np.rint(u).astype(np.int64)
    if lam <= 0 or u.size < MIN_VALUES:
        return plain.reshape(shape)
    lo = np.floor(u)
    frac = u - lo
    lo = lo.astype(np.int64)
    # Distortion difference of choosing lo instead of lo + 1: frac^2 - (1 - frac)^2.
    d_lo_minus_hi = 2.0 * frac - 1.0
    base = int(lo.min())
    lo_index = lo - base  # table index of lo; lo + 1 is the next entry

    levels = plain
    cost = _total_cost(u, levels, lam)
    plain_entropy = _entropy_bits(plain)
    for _ in range(iterations):
        bits = _level_bits(levels, base, int(lo.max()) + 1)
        if bits is None:
            break
        # Pick lo when its distortion excess is paid for by the bits it saves; ties keep the nearest.
        rate_saving = bits[lo_index + 1] - bits[lo_index]
        take_lo = d_lo_minus_hi < lam * rate_saving
        tie = d_lo_minus_hi == lam * rate_saving
        candidate = np.where(tie, plain, lo + (~take_lo))
        candidate_cost = _total_cost(u, candidate, lam)
        # Under the magnitude-class model a pass could trade level entropy for class entropy;
        # only passes that lower the cost without raising the levels' entropy are kept.
        if not candidate_cost < cost or _entropy_bits(candidate) > plain_entropy:
            break
        levels, cost = candidate, candidate_cost
    return levels.reshape(shape)


def _entropy_bits(levels: np.ndarray) -> float:
    """Order-0 empirical entropy of the levels times their count (bits)."""
    counts = np.bincount(levels - levels.min())
    counts = counts[counts > 0].astype(np.float64)
    return float(-(counts * np.log2(counts / levels.size)).sum())


def estimated_bits(levels: np.ndarray) -> float:
    """Estimated size in bits of these levels (payload + side information).

    The cheaper of two static models that bracket the coder's BINNED method (coding/integers.py):
    a histogram over every level (large b) and signed bit-length classes with raw low bits (b = 0),
    or fixed-width bits. An estimate for rate decisions, not the coder's exact size.
    """
    levels = np.asarray(levels, dtype=np.int64).ravel()
    if levels.size == 0:
        return 0.0
    estimates = _method_estimates(levels)
    return min(e[0] for e in estimates)


def _total_cost(u: np.ndarray, levels: np.ndarray, lam: float) -> float:
    distortion = float(np.square(u - levels).sum())
    return distortion + lam * estimated_bits(levels)


def _varint_bytes(counts: np.ndarray) -> int:
    counts = np.asarray(counts, dtype=np.int64)
    return int((1 + (counts >= 1 << 7) + (counts >= 1 << 14) + (counts >= 1 << 21) + (counts >= 1 << 28)).sum())


def _bit_length(magnitudes: np.ndarray) -> np.ndarray:
    lengths = np.zeros(magnitudes.shape, dtype=np.int64)
    nonzero = magnitudes > 0
    _, exponents = np.frexp(magnitudes[nonzero].astype(np.float64))
    lengths[nonzero] = exponents
    return lengths


def _method_estimates(levels: np.ndarray) -> list[tuple[float, str, np.ndarray | None, int]]:
    """(bits, method, counts, offset) per entropy-coding method the coder could pick."""
    n = levels.size
    low, high = int(levels.min()), int(levels.max())
    out: list[tuple[float, str, np.ndarray | None, int]] = [(float(n * (high - low).bit_length()), "fixed", None, 0)]
    if high == low:
        return out
    if high - low < _MAX_HISTOGRAM_ALPHABET:
        counts = np.bincount(levels - low, minlength=high - low + 1)
        seen = counts[counts > 0]
        payload = float(-(seen * np.log2(seen / n)).sum())
        out.append((payload + 8.0 * (_varint_bytes(counts) + 4), "histogram", counts, low))
    if n > 16:
        magnitudes = np.abs(levels)
        classes = _bit_length(magnitudes)
        max_class = int(classes.max())
        signed = np.where(levels < 0, -classes, classes) + max_class
        counts = np.bincount(signed, minlength=2 * max_class + 1)
        seen = counts[counts > 0]
        payload = float(-(seen * np.log2(seen / n)).sum()) + float(np.maximum(classes - 1, 0).sum())
        out.append((payload + 8.0 * (_varint_bytes(counts) + 6), "magnitude", counts, max_class))
    return out


def _level_bits(levels: np.ndarray, low: int, high: int) -> np.ndarray | None:
    """Code length in bits of every level in [low, high] under the model the coder would pick.

    Levels the current model has never seen cost as much as a count of one half (they would
    enter the histogram). None when the cheapest method is fixed-width (no level is cheaper).
    """
    bits, method, counts, offset = min(_method_estimates(levels), key=lambda e: e[0])
    n = levels.size
    span = np.arange(low, high + 1, dtype=np.int64)
    if method == "fixed":
        return None
    if method == "histogram":
        index = span - offset
        inside = (index >= 0) & (index < counts.size)
        freq = np.full(span.size, 0.5)
        freq[inside] = np.maximum(counts[index[inside]], 0.5)
        return -np.log2(freq / n)
    max_class = offset
    classes = _bit_length(np.abs(span))
    signed = np.where(span < 0, -classes, classes) + max_class
    inside = (signed >= 0) & (signed < counts.size)
    freq = np.full(span.size, 0.5)
    freq[inside] = np.maximum(counts[signed[inside]], 0.5)
    return -np.log2(freq / n) + np.maximum(classes - 1, 0)


# --------------------------------------------------------------------------------------------
# Output-aware rounding with error feedback (GPTQ)
# --------------------------------------------------------------------------------------------

# Tikhonov damping of the input Hessian, as a fraction of its mean diagonal (GPTQ's default).
DEFAULT_DAMPING = 0.01
# GPTQ zeroes the weights of inputs that are always zero on the calibration data. That saves bits
# but is a bet on the calibration data: border pixels that are blank in every calibration digit
# are not blank in every test digit, and the zeroed weights capped mlp's output SNR at 62 dB
# however fine the step. Off: those weights are rounded to nearest.
ZERO_DEAD_INPUTS = False
# Columns rounded one by one before the rest of their block gets their errors in one product.
_LAZY_BATCH = 32


# Error feedback reaches only the columns of the same block of at most this many consecutive
# input columns (a block-diagonal Hessian): factoring costs cols * GPTQ_BLOCK^2 instead of cols^3,
# the Hessian cols * GPTQ_BLOCK instead of cols^2 per patch row, and it holds cols * GPTQ_BLOCK
# values instead of cols^2. Calibrated ResNet-18 (digits, BD-rate vs NNCodec at equal output
# SNR): -36.6 % with whole-layer feedback, -33.7 / -32.5 / -29.7 % with blocks of 512 / 256 / 128;
# its 4608-column layers then factor in 0.1 s instead of 2.5 s.
GPTQ_BLOCK = 512


def block_layout(cols: int, block: int = GPTQ_BLOCK) -> tuple[int, int]:
    """(count, width) of the near-equal column blocks of a `cols`-column layer: count * width >= cols,
    the last block padded with at most count - 1 dead columns."""
    count = max(1, -(-cols // block))
    return count, -(-cols // count)


def diagonal_blocks(hessian: np.ndarray, block: int = GPTQ_BLOCK) -> np.ndarray:
    """The [count, width, width] diagonal blocks of a full [cols, cols] Hessian (padding: zeros)."""
    cols = hessian.shape[0]
    count, width = block_layout(cols, block)
    padded = np.zeros((count * width, count * width))
    padded[:cols, :cols] = hessian
    index = np.arange(count * width).reshape(count, width)
    return padded[index[:, :, None], index[:, None, :]]


@dataclass(frozen=True)
class GptqFactor:
    """What GPTQ needs from a block-diagonal input Hessian, per block: the upper Cholesky factor
    of the damped inverse in quantization order (most energetic input first), that order, and
    the dead inputs. Shapes [count, width, width], [count, width], [count, width]; `cols` is the
    layer's real column count (the rest is padding)."""

    upper: np.ndarray
    order: np.ndarray
    dead: np.ndarray  # in quantization order
    cols: int

    def columns(self) -> np.ndarray:
        """[count, width] index of each quantization position into the padded columns."""
        count, width = self.order.shape
        return np.arange(count)[:, None] * width + self.order


def _as_blocks(hessian: np.ndarray) -> tuple[np.ndarray, int]:
    h = np.asarray(hessian, dtype=np.float64)
    if h.ndim == 2:  # one block: whole-layer feedback
        return h[None], h.shape[0]
    return h, h.shape[0] * h.shape[1]


def gptq_factor(hessian: np.ndarray, damping: float = DEFAULT_DAMPING, cols: int | None = None) -> GptqFactor:
    """Factor an input Hessian (sum of x x^T) once for `gptq_round` and `gptq_gain`.

    `hessian`: [cols, cols] (one block) or its [count, width, width] diagonal blocks, of which
    the first `cols` columns are real. Per block, upper U with U^T U = h^-1 in quantization order.
    With J the reversal permutation, J h J = L L^T gives h^-1 = (J L^-1 J)^T (J L^-1 J), and
    J L^-1 J is upper triangular: one Cholesky factorisation and one triangular inverse, about a
    third of the work of inverting h and factoring the inverse. Each block is gathered once,
    straight into reversed quantization order, and the triangular inverse runs in float32 (2.5x
    faster for 4608 columns; relative error ~3e-7, far below what moves a rounding decision).
    Damping is a fraction of the mean diagonal over the whole layer, as with one block.
    """
    blocks, total = _as_blocks(hessian)
    cols = total if cols is None else cols
    count, width, _ = blocks.shape
    diagonal = np.diagonal(blocks, axis1=1, axis2=2)
    order = np.argsort(-diagonal, axis=1, kind="stable")  # "act order": most energetic input first
    dead = ~(np.take_along_axis(diagonal, order, axis=1) > 0)
    backwards = order[:, ::-1]
    h = blocks[np.arange(count)[:, None, None], backwards[:, :, None], backwards[:, None, :]]
    dead_backwards = dead[:, ::-1]
    h = np.where(dead_backwards[:, :, None] | dead_backwards[:, None, :], 0.0, h)  # dead rows and columns
    mean = float(np.diagonal(h, axis1=1, axis2=2).sum() / cols) if cols else 0.0
    diag = np.arange(width)
    h[:, diag, diag] += damping * mean if mean > 0 else 1.0
    h[:, diag, diag] = np.where(dead_backwards, 1.0, h[:, diag, diag])
    lower = np.linalg.cholesky(h)
    inverse = _lower_inverse(lower.astype(np.float32)).astype(np.float64)
    return GptqFactor(np.ascontiguousarray(inverse[:, ::-1, ::-1]), order, dead, cols)


def _lower_inverse(lower: np.ndarray) -> np.ndarray:
    """Inverse of (a stack of) lower-triangular matrices: [[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]."""
    n = lower.shape[-1]
    if n <= 128:
        return np.linalg.inv(lower)
    k = n // 2
    a_inv = _lower_inverse(lower[..., :k, :k])
    c_inv = _lower_inverse(lower[..., k:, k:])
    out = np.zeros_like(lower)
    out[..., :k, :k] = a_inv
    out[..., k:, k:] = c_inv
    out[..., k:, :k] = -c_inv @ (lower[..., k:, :k] @ a_inv)
    return out


def gptq_gain(hessian: np.ndarray, damping: float = DEFAULT_DAMPING, factor: GptqFactor | None = None) -> float:
    """Output-error energy of GPTQ relative to plain rounding at the same step (<= 1, lower is better).

    With error feedback, column k's rounding error reaches the layer output weighted by the part
    of input k that the inputs quantized before it in its block cannot explain (1 / U_kk^2);
    plain rounding's by E[x_k^2] = H_kk. Dead inputs (never non-zero on the calibration data)
    cost nothing. `hessian` as for `gptq_factor`.
    """
    blocks, _ = _as_blocks(hessian)
    total = float(np.diagonal(blocks, axis1=1, axis2=2).sum())
    if total <= 0:
        return 1.0
    factor = factor or gptq_factor(hessian, damping)
    conditional = 1.0 / np.square(np.diagonal(factor.upper, axis1=1, axis2=2))
    return float(min(conditional[~factor.dead].sum() / total, 1.0))


def gptq_round(
    weights: np.ndarray,
    hessian: np.ndarray | None,
    steps: np.ndarray | float,
    damping: float = DEFAULT_DAMPING,
    factor: GptqFactor | None = None,
    zero_dead: bool = ZERO_DEAD_INPUTS,
) -> np.ndarray:
    """int64 levels of a [rows, cols] weight matrix y = W x, chosen column by column with error feedback.

    GPTQ (Frantar et al., 2023; Optimal Brain Quantization): each column is rounded to the grid
    (level * step of its row) and its rounding error is spread over the columns of its block not
    yet rounded so that the layer output on the calibration inputs (hessian = sum of x x^T over
    them, whole or as diagonal blocks, see `gptq_factor`) moves as little as possible. Columns
    whose input is always zero on the calibration data are rounded to nearest (no feedback
    reaches them), or set to level 0 with `zero_dead`. Weights that are exactly 0 (pruned) keep
    level 0. All blocks are rounded side by side.
    """
    rows, cols = np.shape(weights)
    step = np.broadcast_to(np.asarray(steps, dtype=np.float32).reshape(-1), (rows,))
    factor = factor or gptq_factor(hessian, damping, cols)
    upper, dead = factor.upper.astype(np.float32), factor.dead
    count, width = factor.order.shape
    if factor.cols != cols:
        raise ValueError(f"the Hessian has {factor.cols} columns, the weights {cols}")
    # Transposed, in quantization order: each column of W is a contiguous row, so the
    # column-by-column loop reads and writes contiguous memory (3x faster than strided columns).
    # float32, as GPTQ itself runs: 1.8x faster than float64 on ResNet-18, 1e-5 of its levels differ.
    padded = np.zeros((count * width, rows), dtype=np.float32)
    padded[:cols] = np.asarray(weights, dtype=np.float32).T
    columns = factor.columns()
    w = padded[columns]  # [count, width, rows], a fresh copy
    # Pruned weights (exactly zero) keep level 0, as in SparseGPT: the mask survives, their
    # neighbours still absorb the error they receive.
    # (Judged on the real weights: padding columns are zero too, but need no mask.)
    pruned = w == 0 if not np.all(weights) else None
    if zero_dead:
        w[dead] = 0.0
    levels = np.empty((count, width, rows), dtype=np.int64)
    for start in range(0, width, _LAZY_BATCH):
        stop = min(start + _LAZY_BATCH, width)
        part = w[:, start:stop]  # a view: updated in place
        errors = np.empty_like(part)
        for i in range(stop - start):
            k = start + i
            q = np.rint(part[:, i] / step)
            if pruned is not None:
                q[pruned[:, k]] = 0.0
            levels[:, k] = q
            error = (part[:, i] - q * step) / upper[:, k, k, None]
            part[:, i + 1 :] -= upper[:, k, k + 1 : stop, None] * error[:, None, :]
            errors[:, i] = error
        if stop < width:
            w[:, stop:] -= np.matmul(upper[:, start:stop, stop:].transpose(0, 2, 1), errors)
    out = np.empty((count * width, rows), dtype=np.int64)
    out[columns.reshape(-1)] = levels.reshape(-1, rows)
    return np.ascontiguousarray(out[:cols].T)


def _kernel_factor(kernel: tuple[int, ...], rho: float) -> np.ndarray:
    """Upper Cholesky factor of S^-1 for the taps of `kernel` (C order), S[a, b] = rho^(L1 distance);
    the identity at rho = 0 or for a single tap."""
    return _cached_kernel_factor(kernel, rho)


@lru_cache(maxsize=64)
def _cached_kernel_factor(kernel: tuple[int, ...], rho: float) -> np.ndarray:
    taps = np.stack([axis.ravel() for axis in np.meshgrid(*(np.arange(k) for k in kernel), indexing="ij")], axis=1)
    distance = np.abs(taps[:, None, :] - taps[None, :, :]).sum(axis=2)
    correlation = np.power(float(rho), distance)
    return np.linalg.cholesky(np.linalg.inv(correlation)).T


def kernel_feedback_round(scaled: np.ndarray, kernel: tuple[int, ...], rho: float = DEFAULT_KERNEL_CORRELATION) -> np.ndarray:
    """float32 levels of `scaled` ([kernels, taps]: weights / step, one kernel of prod(kernel)
    taps per row) rounded tap by tap, each tap's error spread over the kernel's later taps as
    GPTQ does for an input correlation rho^(L1 distance between taps). rho = 0 or a single tap is
    plain rounding. Values stay exact below 2^22 (callers round larger ones to nearest). A value
    that is exactly 0 (pruned) keeps level 0; its error is still passed on."""
    w = np.asarray(scaled, dtype=np.float32)
    taps = w.shape[1]
    if rho <= 0 or taps < 2:
        return np.rint(w)
    if int(np.prod(kernel)) != taps:
        raise ValueError(f"kernel {kernel} has {int(np.prod(kernel))} taps, the rows {taps}")
    upper = _kernel_factor(kernel, rho).astype(np.float32)
    # Transposed: each tap of every kernel is one contiguous row (float32, as gptq_round runs).
    columns = np.ascontiguousarray(w.T)
    pruned = columns == 0
    for tap in range(taps):
        row = columns[tap]
        level = np.rint(row)
        level[pruned[tap]] = 0.0
        error = (row - level) / upper[tap, tap]
        row[...] = level
        if tap + 1 < taps:
            columns[tap + 1 :] -= upper[tap, tap + 1 :, None] * error
    return columns.T


def kernel_feedback_reach(kernel: tuple[int, ...], rho: float = DEFAULT_KERNEL_CORRELATION) -> float:
    """How far (in steps) kernel feedback can move a value before it is rounded: each earlier
    tap's error is at most half a step over its factor's diagonal."""
    taps = int(np.prod(kernel))
    if rho <= 0 or taps < 2:
        return 0.0
    upper = _kernel_factor(kernel, rho)
    spread = np.abs(np.triu(upper, 1)) / np.diagonal(upper)[:, None]
    return float(0.5 * spread.sum(axis=0).max())


# --------------------------------------------------------------------------------------------
# GPTQ for Kronecker-structured input Hessians (channels x kernel taps)
# --------------------------------------------------------------------------------------------

# Input channels per block of Kronecker error feedback. Data-free ResNet-18 (estimated channel
# moments, BD-rate vs NNCodec at equal output SNR): blocks of 29 / 57 / 512 (whole layers)
# channels -20.4 / -21.0 / -21.1 %; 64 keeps every ResNet-18 block a full 64 channels.
KRONECKER_BLOCK_CHANNELS = 64
# Input channels rounded one by one before later channels get their feedback in one product.
_KRONECKER_LAZY = 8


@dataclass(frozen=True)
class KroneckerFactor:
    """GPTQ's factor of an input Hessian C (x) S for a convolution whose input channels have
    second moments C and whose kernel taps correlate as S: the channels in contiguous blocks
    (`index`: [count, width] channel per quantization position, act order inside a block;
    >= channels: padding), and per block the upper factor U of C^-1 with each row divided by
    its diagonal (`coefficients`). The factor of the whole Hessian is U (x) U_S."""

    index: np.ndarray
    coefficients: np.ndarray  # float32 [count, width, width]
    dead: np.ndarray  # [count, width]: channels never non-zero (rounded to nearest, as gptq_round does)
    channels: int
    channel_gain: float  # GPTQ's predicted gain over the channels alone (gptq_gain of C's blocks)


def kronecker_factor(
    channel_moments: np.ndarray, block: int = KRONECKER_BLOCK_CHANNELS, damping: float = DEFAULT_DAMPING
) -> KroneckerFactor:
    """Factor the channel part C ([channels, channels]) of a Kronecker input Hessian.

    Blocks are contiguous in channel order (blocks of the most energetic channels lose most of
    the gain: ResNet-18, blocks of 57, -19.1 instead of -21.0 % BD-rate), ordered by energy inside.
    """
    c = np.asarray(channel_moments, dtype=np.float64)
    channels = c.shape[0]
    blocks = diagonal_blocks(c, block)
    factor = gptq_factor(blocks, damping, channels)
    upper = factor.upper
    coefficients = (upper / np.diagonal(upper, axis1=1, axis2=2)[:, :, None]).astype(np.float32)
    return KroneckerFactor(factor.columns(), coefficients, factor.dead, channels, gptq_gain(blocks, factor=factor))


def kronecker_tap_gain(kernel: tuple[int, ...], rho: float = DEFAULT_KERNEL_CORRELATION) -> float:
    """GPTQ's predicted gain over a kernel's taps alone for the prior S (see kernel feedback);
    a layer's whole gain is this times its KroneckerFactor.channel_gain."""
    upper = _kernel_factor(kernel, rho)
    return float(np.sum(1.0 / np.square(np.diagonal(upper))) / upper.shape[0])


def kronecker_gptq_round(
    layers: list[tuple[np.ndarray, float, KroneckerFactor]], kernel: tuple[int, ...], rho: float = DEFAULT_KERNEL_CORRELATION
) -> list[np.ndarray]:
    """int32 levels [rows, channels, taps] of convolutions that share a kernel shape, each
    given as (float32 weights [rows, channels, taps], its step, its KroneckerFactor), rounded as
    GPTQ does for the input Hessian C (x) S: the same levels as `gptq_round` on that Hessian's
    blocks of whole channels.

    With U (x) U_S the Hessian's factor, the taps of one input channel's kernel are rounded as
    kernel feedback rounds them, and the channel's error reaches a later channel d of its block
    as U[j, d] / U[j, j] times r = sum over taps a of e_a U_S[a, :] (e_a: tap a's scaled error):
    one vector per kernel instead of a product per tap pair. Every block of every layer (the
    rows of each) is rounded side by side, so the Python loop runs width x taps steps in all,
    not per layer. Weights that are exactly 0 (pruned) keep level 0.
    """
    taps = int(np.prod(kernel))
    tap_upper = _kernel_factor(kernel, rho).astype(np.float32)
    width = max(factor.index.shape[1] for _, _, factor in layers)
    # Lanes: one per (layer, block, output row). The work array is [quantization position, tap,
    # lane], so every step works on contiguous rows that span all lanes (measured on ResNet-18's
    # 3x3 layers: 0.17 s, against 0.61 s with lanes first).
    total = sum(factor.index.shape[0] * weights.shape[0] for weights, _, factor in layers)
    w = np.zeros((width, taps, total), dtype=np.float32)
    live = np.zeros((width, total), dtype=np.float32)  # 0: dead channel (padding positions stay 0 anyway)
    groups = []  # per layer: (first lane, blocks, rows, factor)
    lane = 0
    pruned = False
    for weights, step, factor in layers:
        rows, channels = weights.shape[0], weights.shape[1]
        if weights.shape[2] != taps or channels != factor.channels:
            raise ValueError(f"weights of shape {weights.shape} do not match the factor ({factor.channels} channels, {taps} taps)")
        count, own = factor.index.shape
        for block in range(count):
            lanes = slice(lane + block * rows, lane + (block + 1) * rows)
            positions = np.flatnonzero(factor.index[block] < channels)  # the rest: padding, left 0
            gathered = weights[:, factor.index[block][positions], :].transpose(1, 2, 0)
            if positions.size == own:
                np.divide(gathered, np.float32(step), out=w[:own, :, lanes])
            else:
                w[positions, :, lanes] = gathered / np.float32(step)
            live[positions, lanes] = (~factor.dead[block][positions])[:, None]
        pruned = pruned or not weights.all()
        groups.append((lane, count, rows, factor))
        lane += count * rows
    keep = w != 0 if pruned else None  # pruned weights keep level 0, judged before any feedback
    inverse_diagonal = (1.0 / np.diagonal(tap_upper)).astype(np.float32)
    spread = np.ascontiguousarray(tap_upper.T)
    errors = np.empty((taps, total), dtype=np.float32)
    level = np.empty(total, dtype=np.float32)
    scratch = np.empty((taps, total), dtype=np.float32)
    for batch_start in range(0, width, _KRONECKER_LAZY):
        batch_stop = min(batch_start + _KRONECKER_LAZY, width)
        size = batch_stop - batch_start
        feedback = np.empty((size, taps, total), dtype=np.float32)
        within = np.zeros((size, size, total), dtype=np.float32)  # [earlier, later, lane]
        for first, count, rows, factor in groups:
            stop = min(batch_stop, factor.index.shape[1])
            if stop > batch_start:
                coupling = factor.coefficients[:, batch_start:stop, batch_start:stop].transpose(1, 2, 0)
                within[: stop - batch_start, : stop - batch_start, first : first + count * rows] = np.repeat(coupling, rows, axis=2)
        for k in range(size):
            j = batch_start + k
            kernels = w[j]  # rounded in place: it ends up holding the levels
            for i in range(k):  # the feedback of this batch's earlier channels
                np.multiply(within[i, k], feedback[i], out=scratch)
                kernels -= scratch
            gate = live[j] * inverse_diagonal[:, None]
            for a in range(taps):
                row = kernels[a]
                np.rint(row, out=level)
                if keep is not None:
                    level *= keep[j, a]
                np.subtract(row, level, out=errors[a])
                errors[a] *= gate[a]
                row[...] = level
                if a + 1 < taps:
                    later = scratch[: taps - a - 1]
                    np.multiply(tap_upper[a, a + 1 :, None], errors[a], out=later)
                    kernels[a + 1 :] -= later
            np.matmul(spread, errors, out=feedback[k])  # sum over taps a of e_a U_S[a, :]
        if batch_stop < width:
            for first, count, rows, factor in groups:
                own = factor.index.shape[1]
                if batch_stop >= own:
                    continue
                for block in range(count):
                    lanes = slice(first + block * rows, first + (block + 1) * rows)
                    part = feedback[:, :, lanes].reshape(size, taps * rows)
                    update = factor.coefficients[block, batch_start:batch_stop, batch_stop:own].T @ part
                    w[batch_stop:own, :, lanes] -= update.reshape(own - batch_stop, taps, rows)
    out = []
    for (weights, _, factor), (first, count, rows, _) in zip(layers, groups):
        channels = weights.shape[1]
        levels = np.zeros((rows, channels, taps), dtype=np.int32)
        for block in range(count):
            positions = np.flatnonzero(factor.index[block] < channels)
            levels[:, factor.index[block][positions], :] = w[positions, :, first + block * rows : first + (block + 1) * rows].transpose(2, 0, 1)
        out.append(levels)
    return out
