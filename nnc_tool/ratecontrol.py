"""Rate control: find the QP that meets a size, ratio, fidelity or accuracy target.

Every target is monotone in the weight QP (a coarser step never makes the bitstream larger and,
in practice, never makes the model more faithful), so an integer bisection over QP finds the
answer in about seven trial encodes. Size and ratio targets ask for the *finest* QP whose
bitstream fits; fidelity and accuracy targets for the *coarsest* QP that still meets them (the
smallest bitstream of acceptable quality). The measuring itself (encoding, decoding, running the
model) is the caller's: `search_qp` only needs a function from QP to a `Trial`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import UsageError

# QPs searched: step 2^(-96/4) = 2^-24 is below float32 resolution of unit-scale weights, and
# 2^(32/4) = 256 zeroes any realistic weight.
SEARCH_RANGE = (-96, 32)


@dataclass(frozen=True)
class RateTarget:
    """Exactly one of the fields is set.

    size: bitstream bytes at most this.
    ratio: original bytes / bitstream bytes at least this.
    snr_db: output SNR (dB) of the decoded model against the original on calibration inputs.
    max_accuracy_drop: top-1 accuracy points lost on labelled data at most this.
    """

    size: int | None = None
    ratio: float | None = None
    snr_db: float | None = None
    max_accuracy_drop: float | None = None

    def __post_init__(self) -> None:
        set_fields = [name for name in ("size", "ratio", "snr_db", "max_accuracy_drop") if getattr(self, name) is not None]
        if len(set_fields) != 1:
            raise UsageError(None, "give exactly one rate-control target (size, ratio, SNR or accuracy drop)")
        if self.size is not None and self.size <= 0:
            raise UsageError(None, f"target size must be positive, got {self.size}")
        if self.ratio is not None and self.ratio <= 0:
            raise UsageError(None, f"target ratio must be positive, got {self.ratio}")
        if self.max_accuracy_drop is not None and self.max_accuracy_drop < 0:
            raise UsageError(None, f"accuracy drop must not be negative, got {self.max_accuracy_drop}")

    @property
    def wants_quality(self) -> bool:
        """True for fidelity/accuracy targets (they need the decoded model run on data)."""
        return self.snr_db is not None or self.max_accuracy_drop is not None

    def describe(self) -> str:
        if self.size is not None:
            return f"bitstream <= {self.size} B"
        if self.ratio is not None:
            return f"ratio >= {self.ratio:g}x"
        if self.snr_db is not None:
            return f"output SNR >= {self.snr_db:g} dB"
        return f"accuracy drop <= {self.max_accuracy_drop:g} points"


@dataclass
class Trial:
    """One trial encode: its QP, bitstream bytes and, for quality targets, the measured quality."""

    qp: int
    bitstream_bytes: int
    snr_db: float | None = None
    accuracy: float | None = None  # top-1, percent


@dataclass
class RateControlReport:
    target: str
    chosen_qp: int
    bitstream_bytes: int
    achieved: str  # the target's measure at the chosen QP, e.g. "38.2 dB"
    trials: list[Trial] = field(default_factory=list)


def meets(target: RateTarget, trial: Trial, original_bytes: int, original_accuracy: float | None) -> bool:
    if target.size is not None:
        return trial.bitstream_bytes <= target.size
    if target.ratio is not None:
        return original_bytes >= target.ratio * trial.bitstream_bytes
    if target.snr_db is not None:
        return trial.snr_db is not None and trial.snr_db >= target.snr_db
    assert original_accuracy is not None and trial.accuracy is not None
    # A hair of tolerance: accuracies are ratios of counts and must not fail on float round-off.
    return original_accuracy - trial.accuracy <= target.max_accuracy_drop + 1e-9


def _achieved(target: RateTarget, trial: Trial, original_bytes: int, original_accuracy: float | None) -> str:
    if target.size is not None:
        return f"{trial.bitstream_bytes} B"
    if target.ratio is not None:
        return f"{original_bytes / trial.bitstream_bytes:.2f}x"
    if target.snr_db is not None:
        return f"{trial.snr_db:.2f} dB"
    return f"{trial.accuracy:.2f} % (original {original_accuracy:.2f} %)"


def search_qp(
    target: RateTarget,
    measure: Callable[[int], Trial],
    original_bytes: int,
    original_accuracy: float | None = None,
    search_range: tuple[int, int] = SEARCH_RANGE,
) -> RateControlReport:
    """Bisect the QP: the finest one meeting a size/ratio target, the coarsest meeting a quality one.

    Raises UsageError naming the closest reachable value when no QP in range meets the target.
    """
    trials: dict[int, Trial] = {}

    def ok(qp: int) -> bool:
        if qp not in trials:
            trials[qp] = measure(qp)
        return meets(target, trials[qp], original_bytes, original_accuracy)

    low, high = search_range
    if target.wants_quality:
        # ok is True for fine QPs, False for coarse ones: find the last True.
        if not ok(low):
            closest = trials[low]
            reached = _achieved(target, closest, original_bytes, original_accuracy)
            raise UsageError(None, f"cannot meet {target.describe()}: even QP {low} only reaches {reached}")
        while high - low > 1:
            middle = (low + high) // 2
            if ok(middle):
                low = middle
            else:
                high = middle
        chosen = low if not ok(high) else high
    else:
        # ok is False for fine QPs, True for coarse ones: find the first True.
        if not ok(high):
            closest = trials[high]
            reached = _achieved(target, closest, original_bytes, original_accuracy)
            raise UsageError(
                None,
                f"cannot meet {target.describe()}: the smallest bitstream (QP {high}) is {reached}; "
                "the graph and exact tensors alone take part of that",
            )
        while high - low > 1:
            middle = (low + high) // 2
            if ok(middle):
                high = middle
            else:
                low = middle
        chosen = high if not ok(low) else low
    best = trials[chosen]
    return RateControlReport(
        target=target.describe(),
        chosen_qp=chosen,
        bitstream_bytes=best.bitstream_bytes,
        achieved=_achieved(target, best, original_bytes, original_accuracy),
        trials=[trials[qp] for qp in sorted(trials)],
    )
