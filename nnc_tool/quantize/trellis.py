"""Dependent (trellis-coded) quantization, as in NNC and VVC.

Two scalar quantizers share one grid of spacing D (half the step of the tensor's QP): Q0
reconstructs level k at 2k * D (the even grid points), Q1 at (2k - sgn k) * D (the odd points and
zero). Which quantizer a value uses is not sent: a four-state machine driven by the parity of the
previous levels picks it, so the decoder follows it for free. The encoder chooses the levels of a
whole chain of values at once (Viterbi search over the states), which packs the reconstruction
points of consecutive values more densely than one scalar quantizer can at the same rate: on
ResNet-18's folded weights, 0.7-0.9 dB more weight SNR at equal level entropy (3-4 % fewer bits).

State s = 2 * hi + lo; after a level of parity p the state becomes (hi' = lo ^ p, lo' = hi), and
hi selects the quantizer (VVC's transition table 0 -> {0, 2}, 1 -> {2, 0}, 2 -> {1, 3},
3 -> {3, 1}). The machine is linear over GF(2): hi at position t is the XOR of the parities at
t-1, t-3, t-5, ..., so the decoder computes every state with two prefix XORs, no loop.

Chains: the values of a tensor in C order are cut into chains of `chain` values (the last one
shorter); each starts in state 0. The encoder works on all chains of a block side by side, so
its Python loop runs `chain` times per block, whatever the tensor's size.
"""
from __future__ import annotations

import numpy as np

# Values per chain when a tensor is big enough to fill CHAIN_PARALLEL chains of them. Longer chains
# lose less to their start in state 0 (ResNet-18: chains of 16 / 64 / 256 keep 0.54 / 0.77 /
# 0.83 dB), shorter ones cost fewer Python steps.
MAX_CHAIN = 256
MIN_CHAIN = 32
CHAIN_PARALLEL = 2048
# Chains searched together: the encoder's temporaries take ~20 bytes per value of a block (80 MB
# at chains of 256), and fewer, longer steps halve the Python overhead (ResNet-18's 2.4 M-value
# layers: 102 ms with 4096, 75 ms with 16384).
BLOCK_CHAINS = 16384


def chain_length(size: int) -> int:
    """The chain length the encoder uses for a tensor of `size` values (a power of two)."""
    target = max(size // CHAIN_PARALLEL, 1)
    length = 1 << max(int(target).bit_length() - 1, 0)
    return int(min(max(length, MIN_CHAIN), MAX_CHAIN))


def trellis_levels(rows: np.ndarray, chain: int, half_steps: np.ndarray) -> np.ndarray:
    """Levels k (int32, shape of `rows`) of a tensor viewed as [rows, values per row], each row
    with grid spacing `half_steps[row]`, minimising the squared error of the reconstruction
    `grid_values(k, chain) * spacing`. Works a block of BLOCK_CHAINS chains at a time, so a
    file-mapped tensor is read once and never copied whole."""
    flat = rows.reshape(-1)
    row_size = max(rows.shape[1], 1)
    half_steps = np.asarray(half_steps, dtype=np.float32).reshape(-1)
    levels = np.empty(flat.size, dtype=np.int32)
    block = chain * BLOCK_CHAINS
    for start in range(0, flat.size, block):
        part = np.asarray(flat[start : start + block], dtype=np.float32)
        if half_steps.size == 1:
            scaled = part / half_steps[0]
        else:
            scaled = part / half_steps[np.arange(start, start + part.size) // row_size]
        levels[start : start + block] = _search_block(scaled, chain)
    return levels.reshape(rows.shape)


def _search_block(values: np.ndarray, chain: int) -> np.ndarray:
    n = values.size
    chains = -(-n // chain)
    x = np.zeros(chains * chain, dtype=np.float32)
    x[:n] = values
    # [position in chain, chain]: each step of the search reads one contiguous row, and every
    # temporary of a step stays in cache (computing all errors up front would stream ~20 arrays
    # of the block's size through memory instead: 4x slower).
    x = np.ascontiguousarray(x.reshape(chains, chain).T)

    # cost[i, j]: best cost of a path ending in state 2 * i + j (hi = i, lo = j). After a level of
    # parity p taken in state (i, l) the state is (l ^ p, i): new state (j, i) comes either from
    # lo = 0 with p = j ("stay") or from lo = 1 with p = 1 - j ("cross").
    buffers = [np.empty((2, 2, chains), dtype=np.float32) for _ in range(2)]
    cost = buffers[1]
    cost.fill(np.inf)
    cost[0, 0] = 0.0
    cross = np.empty((2, 2, chains), dtype=np.float32)
    errors = np.empty((2, 2, chains), dtype=np.float32)  # [quantizer, parity]
    swapped = errors[:, ::-1]
    scratch = np.empty(chains, dtype=np.float32)
    magnitude = np.empty(chains, dtype=np.float32)
    from_odd = np.empty((chain, 2, 2, chains), dtype=bool)  # predecessor had lo = 1
    for t in range(chain):
        _class_errors(x[t], errors, scratch, magnitude)
        stay = buffers[t & 1]  # not the buffer `cost` views
        np.add(cost[:, :1], errors, out=stay)
        np.add(cost[:, 1:], swapped, out=cross)
        np.less(cross, stay, out=from_odd[t])
        cost = np.minimum(stay, cross, out=stay).transpose(1, 0, 2)

    # Walk back: in state (hi, lo) at t + 1 the level at t was taken in quantizer lo, with parity
    # hi ^ (predecessor's lo), from state (lo, predecessor's lo).
    state = np.argmin(cost.reshape(4, chains), axis=0).astype(np.intp)
    rows = np.arange(chains, dtype=np.intp)
    choice = np.empty((chain, chains), dtype=np.uint8)  # 2 * quantizer + parity
    came_odd = np.empty(chains, dtype=np.uint8)
    flat_back = from_odd.view(np.uint8).reshape(chain, 4 * chains)
    back_rows = _BACK_ROW * chains
    for t in range(chain - 1, -1, -1):
        np.take(flat_back[t], back_rows[state] + rows, out=came_odd)
        quantizer = state & 1
        choice[t] = quantizer * 2 + ((state >> 1) ^ came_odd)
        state = quantizer * 2 + came_odd
    return _class_levels(x, choice).T.reshape(-1)[:n]


def _class_errors(x: np.ndarray, errors: np.ndarray, scratch: np.ndarray, magnitude: np.ndarray) -> None:
    """Squared error (units of D^2) to the nearest point of each (quantizer, parity) class:
    Q0: parity 0 -> 4Z, parity 1 -> 4Z + 2; Q1: parity 1 -> +-(4Z + 1), parity 0 -> 0, +-(4Z + 3)."""
    np.abs(x, out=magnitude)
    classes = ((x, errors[0, 0], 0.0), (x, errors[0, 1], 2.0), (magnitude, errors[1, 1], 1.0), (magnitude, errors[1, 0], 3.0))
    for source, out, shift in classes:
        np.subtract(source, shift, out=scratch)
        np.multiply(scratch, 0.25, out=out)
        np.rint(out, out=out)
        np.multiply(out, 4.0, out=out)
        np.subtract(scratch, out, out=out)
        np.square(out, out=out)
    # Q1's even class also holds 0, nearer than +-3 below |x| = 1.5.
    np.square(magnitude, out=scratch)
    np.minimum(errors[1, 0], scratch, out=errors[1, 0])


def _class_levels(x: np.ndarray, choice: np.ndarray) -> np.ndarray:
    """The level of each value in its chosen class (2 * quantizer + parity; _class_errors' rules).

    One row of the block at a time, so the temporaries stay in cache, and in plain arithmetic
    on 0/1 floats: numpy's masked (`where=`) operations are 10-30x slower than a multiply.
    """
    levels = np.empty(x.shape, dtype=np.int32)
    for t in range(x.shape[0]):
        row = x[t]
        odd = (choice[t] >> 1).astype(np.float32)  # quantizer Q1
        parity = (choice[t] & 1).astype(np.float32)
        base = row + odd * (np.abs(row) - row)  # |x| for Q1
        # Class offset: Q0 2p; Q1 3 (p = 0) or 1 (p = 1).
        offset = 2.0 * parity + odd * (3.0 - 4.0 * parity)
        # Q0: nearest point = 2k; Q1: nearest point + 1 = 2|k|.
        twice = np.rint((base - offset) * 0.25) * 4.0 + (offset + odd)
        # Q1's even class also holds 0, nearer than 3 below |x| = 1.5.
        twice *= 1.0 - odd * (1.0 - parity) * (base < 1.5)
        twice *= 0.5 - odd * (row < 0)  # halved, and Q1's level takes the sign of x
        levels[t] = twice
    return levels


# Row of from_odd[t] (laid out [quantizer = lo, hi], flattened) that holds state 2 * hi + lo.
_BACK_ROW = np.array([0, 2, 1, 3], dtype=np.intp)


def grid_values(levels: np.ndarray, chain: int) -> np.ndarray:
    """float32 reconstruction in units of D, 2k - hi * sign(k), for levels coded with dependent
    quantization (exact for |k| < 2^22, which quantization guarantees)."""
    grid = np.multiply(levels, np.float32(2.0), dtype=np.float32)
    grid -= odd_quantizer_signs(levels, chain)
    return grid


def odd_quantizer_signs(levels: np.ndarray, chain: int) -> np.ndarray:
    """hi * sign(k) per value (int8, shape of `levels`): what Q1 subtracts from 2k."""
    flat = np.asarray(levels).reshape(-1)
    hi = np.empty(flat.size, dtype=np.uint8)
    full = flat.size - flat.size % chain
    if full:
        hi[:full] = _chain_hi(flat[:full].reshape(-1, chain)).reshape(-1)
    if flat.size > full:
        hi[full:] = _chain_hi(flat[full:].reshape(1, -1)).reshape(-1)
    signs = (flat > 0).view(np.int8) - (flat < 0).view(np.int8)
    signs *= hi.view(np.int8)
    return signs.reshape(np.shape(levels))


def _chain_hi(levels: np.ndarray) -> np.ndarray:
    """The quantizer (hi) in force at each position of each chain (rows)."""
    parity = (levels & 1).astype(np.uint8)
    hi = np.zeros(levels.shape, dtype=np.uint8)
    # hi[t] = parity[t-1] ^ parity[t-3] ^ ...: prefix XORs of the even and of the odd positions.
    hi[:, 1::2] = np.bitwise_xor.accumulate(parity[:, 0::2], axis=1)[:, : hi[:, 1::2].shape[1]]
    hi[:, 2::2] = np.bitwise_xor.accumulate(parity[:, 1::2], axis=1)[:, : hi[:, 2::2].shape[1]]
    return hi
