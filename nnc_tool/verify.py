"""The encoder's self-check: run the decoded model beside the original and repair what collapsed.

A stage after coding, so every path that encodes (CLI, API, batch, rate control's final encode)
gets it. `check` runs the rebuilt model beside the reference on probe inputs (the calibration
data when given, else inputs synthesised from the graph's input signature, nnc_tool.inputs) and
compares every output. A result fails when

  * an output is non-finite where the original's is finite, or
  * the output SNR lies more than COLLAPSE_MARGIN_DB below what the steps predict
    (`predicted_snr_db`), or
  * it lies below the user's `min_snr_db`, or
  * it lies below `floor_db`, the fidelity a default encode keeps (DEFAULT_FLOOR_DB; the repair
    works toward it as toward a demanded SNR, but a floor it cannot reach is a warning, not a
    failure).

What the steps predict: each WEIGHT tensor's rounding error relative to its typical channel
(median over output channels of the mean square: robust to the huge dead channels folded
BatchNorms leave), summed over layers as independent relative noises; NONWEIGHT tensors of two
or more axes (filterbanks, tiny weights) count the same way, so a model whose only lossy layers
are filterbanks (an ASR front end) is not predicted to be exact. On the digits models, the
PP-OCR classifier and recognizer the output SNR on probes lies 5 dB below to 20 dB above this
prediction at every QP from -44 to -20; on a model whose output is dominated by a few fragile
tensors (the PP-OCR text detector: 13-35 dB below) it does not.

`Checker.find_culprits` then names the tensors responsible by group testing: the decoded values
of a group of tensors alone (the rest original) are run on the probes, harmless groups are
dropped, harmful ones split until single tensors remain. One onnxruntime session serves every
run: the main graph's float tensors are graph inputs too (formats.onnx_format.overridable_proto),
so a run with other values for some of them is a run with more feeds, not a new session. `refinements` turns their measured output noise
into how much finer each must be coded (noise ~ step^2 ~ 2^(QP/2)), or exactly when even that
would not do; the encoder re-codes with them and checks again, up to MAX_REPAIR_ROUNDS times,
against the bar the first encode's steps set. A user's `min_snr_db` that still fails, or outputs
that are still non-finite, fail the encode; a repaired collapse that stays below the bar is
written with a warning in the report.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from .inputs import ModelInputs, ReplaceableSession, probe_inputs, run_model
from .model import Model, Tensor, TensorRole
from .parallel import ordered_map

# Below the prediction by more than this, a result has collapsed (see the module docstring).
COLLAPSE_MARGIN_DB = 10.0
# Probe samples per check: enough to see a collapse (every zoo collapse shows on one), few enough
# that the run costs a fraction of the encode.
PROBE_SAMPLES = 2
# A group whose output noise is below this share of the allowed noise is left alone.
HARMLESS_SHARE = 1.0 / 8.0
# Model runs one culprit search may spend (each runs the probes once).
MAX_SEARCH_RUNS = 64
# Re-encode rounds before the encoder gives up.
MAX_REPAIR_ROUNDS = 3
# A tensor that would need more than this many QP finer is coded exactly instead.
MAX_REFINEMENT_QP = 32
# What `nnc encode MODEL` (no --qp, --bits or rate target) keeps on the probes: the default QP is
# a starting point, not a promise of fidelity. On the zoo, 99 % task agreement needs about 40 dB
# on task data (layout detector 35 dB -> 97 % F1, note transcriber 31 dB -> 98.5 % IoU; both
# >= 99 % at 40 dB), and probes run from ~4 dB kinder than real inputs (the OCR recognizer) to
# harsher (MiniLM's random token ids).
DEFAULT_FLOOR_DB = 40.0
# Float values of a model beyond which the check is skipped: it keeps the rebuilt weights beside
# the model's (streamed encodes of large models stay near one copy of the weights in memory).
CHECK_MAX_VALUES = 64 * 10**6
# Groups split into this many parts while searching.
SEARCH_FANOUT = 4


@dataclass
class CheckResult:
    """What one check measured: the rebuilt model against the reference on the probes."""

    output_snr_db: float  # over every output; -inf when an output is non-finite where the original's is not
    predicted_snr_db: float  # what the steps predict (see the module docstring)
    top1_agreement: float | None  # percent, on the first output when it holds per-sample scores
    finite: bool
    min_snr_db: float | None = None
    floor_db: float | None = None

    @property
    def threshold_db(self) -> float:
        bars = [self.predicted_snr_db - COLLAPSE_MARGIN_DB, self.min_snr_db, self.floor_db]
        return max(bar for bar in bars if bar is not None)

    @property
    def passed(self) -> bool:
        return self.finite and self.output_snr_db >= self.threshold_db

    def reason(self) -> str:
        if not self.finite:
            return "the decoded model's outputs are not finite where the original's are"
        if self.min_snr_db is not None and self.output_snr_db < self.min_snr_db:
            return f"output SNR {self.output_snr_db:.1f} dB is below --min-snr {self.min_snr_db:g} dB"
        if self.floor_db is not None and self.output_snr_db < self.floor_db:
            return f"output SNR {self.output_snr_db:.1f} dB is below the default encode's {self.floor_db:g} dB"
        return (
            f"output SNR {self.output_snr_db:.1f} dB collapsed: the steps predict {self.predicted_snr_db:.1f} dB"
        )


@dataclass
class CheckReport:
    """The self-check of one encode, as the encode report carries it."""

    probes: str  # "calibration" or "synthesised" ("" when skipped)
    samples: int
    output_snr_db: float
    predicted_snr_db: float
    top1_agreement: float | None
    passed: bool | None  # None: not checked, see `skipped`
    seconds: float
    refined: list[str] = field(default_factory=list)  # what the repair changed, one line per tensor
    rounds: int = 0  # re-encodes the repair needed
    skipped: str | None = None  # why the check could not run (the original does not run in onnxruntime, ...)
    shortfall: str | None = None  # when it did not pass: what stayed short after the repair

    @classmethod
    def not_run(cls, reason: str, seconds: float = 0.0) -> CheckReport:
        return cls("", 0, math.nan, math.nan, None, None, seconds, skipped=reason)


def probes_for(
    model: Model, calibration: ModelInputs | None, samples: int = PROBE_SAMPLES, session=None, proto=None
) -> tuple[ModelInputs, str]:
    """The check's inputs: the first calibration samples when given, else synthesised ones
    (`session` and `proto`, the model's, serve the synthesis: see inputs.probe_inputs)."""
    if calibration is not None and len(calibration):
        return calibration.head(samples), "calibration"
    return probe_inputs(model, samples, session=session, proto=proto), "synthesised"


def runnable(model: Model) -> bool:
    """Whether the self-check can run this model (ONNX, in onnxruntime)."""
    return model.format == "onnx"


def output_noise(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> tuple[float, float]:
    """(signal, noise) energy over every output; noise is inf when an output is non-finite where
    the reference's is finite (equal infinities, e.g. masked logits, count as equal)."""
    signal = noise = 0.0
    for ref, out in zip(reference, outputs):
        ref = np.asarray(ref, dtype=np.float64)
        out = np.asarray(out, dtype=np.float64)
        if ref.shape != out.shape:
            return signal, math.inf
        finite = np.isfinite(ref)
        if not np.array_equal(out[~finite], ref[~finite], equal_nan=True) or not np.isfinite(out[finite]).all():
            return signal, math.inf
        signal += float(np.square(ref[finite]).sum())
        noise += float(np.square(ref[finite] - out[finite]).sum())
    return signal, noise


def snr_db(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    if not math.isfinite(noise) or signal <= 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def looks_like_logits(output: np.ndarray) -> bool:
    """Float scores, more than one per sample, in one row per sample ([N, C], or [N, 1, ..., C]):
    what top-1 agreement means something for (not a detector's map or a sequence of frames)."""
    if output.ndim < 2 or not np.issubdtype(output.dtype, np.floating) or output.shape[-1] < 2:
        return False
    return all(d == 1 for d in output.shape[1:-1])


def top1_agreement(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> float | None:
    """Percent of samples whose arg-max of the first output agrees, when that output holds one
    row of scores per sample (`looks_like_logits`, as nnc bench reads it); None otherwise."""
    if not reference:
        return None
    ref, out = np.asarray(reference[0]), np.asarray(outputs[0])
    if not looks_like_logits(ref) or ref.shape != out.shape:
        return None
    ref, out = ref.reshape(len(ref), -1), out.reshape(len(out), -1)
    return 100.0 * float((ref.argmax(1) == np.nan_to_num(out, nan=-np.inf).argmax(1)).mean())


def predicted_snr_db(original: Model, rebuilt: dict[str, np.ndarray]) -> float:
    """What the steps predict for the output SNR (see the module docstring)."""
    relative = 0.0
    for tensor in original.tensors:
        values = rebuilt.get(tensor.name)
        layer = tensor.role == TensorRole.WEIGHT or (tensor.role == TensorRole.NONWEIGHT and tensor.array.ndim >= 2)
        if not layer or values is None or values.shape != tensor.array.shape or not tensor.array.size:
            continue
        rows = np.asarray(tensor.array, dtype=np.float32).reshape(tensor.array.shape[0], -1)
        typical = float(np.median(np.einsum("ij,ij->i", rows, rows, dtype=np.float64) / max(rows.shape[1], 1)))
        error = rows - np.asarray(values, dtype=np.float32).reshape(rows.shape)
        noise = float(np.einsum("ij,ij->", error, error, dtype=np.float64)) / max(error.size, 1)
        # A tensor whose rounding error exceeds its own typical power is a dead one (a folded
        # PicoDet weight of RMS 3e-7 takes noise 10^5 times its power): relative noise says
        # nothing about its effect, and counting it as all signal lost (0 dB) would blind the
        # check to every real collapse of the model. The probes judge it instead.
        if 0 < noise <= typical:
            relative += noise / typical
    return snr_db(1.0, relative) if relative > 0 else math.inf


def changed_tensors(original: Model, rebuilt: Sequence[Tensor]) -> dict[str, np.ndarray]:
    """The rebuilt arrays that differ from the original's, by name (model order)."""
    arrays = {t.name: t.array for t in rebuilt}
    changed = {}
    for tensor in original.tensors:
        values = arrays.get(tensor.name)
        if values is not None and (values.shape != tensor.array.shape or not np.array_equal(values, tensor.array)):
            changed[tensor.name] = values
    return changed


def _no_optimisation():
    import onnxruntime as ort

    return ort.GraphOptimizationLevel.ORT_DISABLE_ALL


class Checker:
    """One model (as it goes into quantization) run on probe inputs with any of its tensors
    replaced: the reference outputs, the check of a rebuilt model, and the culprit search."""

    def __init__(self, model: Model, calibration: ModelInputs | None = None, samples: int = PROBE_SAMPLES) -> None:
        self.model = model
        # Unoptimised: builds 10x faster (magika: 0.01 instead of 0.13 s) and runs two probes as fast.
        self._runner = ReplaceableSession(model, optimization_level=_no_optimisation())
        self.probes, self.source = probes_for(model, calibration, samples, self._runner.session, self._runner.proto)
        self.reference = self.outputs({})
        self.signal = output_noise(self.reference, self.reference)[0]

    def outputs(self, replaced: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Every output on the probes with `replaced` tensors (name -> values) in place of the model's."""
        if any(name not in self._runner.names for name in replaced):
            # A body tensor whose name another value shares stays baked in: a session of its own.
            tensors = [Tensor(t.name, replaced[t.name], t.role) if t.name in replaced else t for t in self.model.tensors]
            return run_model(replace(self.model, tensors=tensors), self.probes)
        return self._runner.run(self.probes, replaced)

    def check(self, changed: dict[str, np.ndarray], min_snr_db: float | None = None,
              floor_db: float | None = None) -> CheckResult:
        """The rebuilt model (the model with `changed` tensors) against the reference."""
        outputs = self.outputs(changed)
        signal, noise = output_noise(self.reference, outputs)
        return CheckResult(
            output_snr_db=snr_db(signal, noise),
            predicted_snr_db=predicted_snr_db(self.model, changed),
            top1_agreement=top1_agreement(self.reference, outputs),
            finite=math.isfinite(noise),
            min_snr_db=min_snr_db,
            floor_db=floor_db,
        )

    def allowed_noise(self, result: CheckResult) -> float:
        """The output noise energy a result may have to pass."""
        threshold = result.threshold_db
        return self.signal / 10.0 ** (threshold / 10.0) if math.isfinite(threshold) else 0.0

    def group_noise(self, changed: dict[str, np.ndarray], group: Sequence[str]) -> float:
        """Output noise energy on the probes with only `group`'s rebuilt values in place."""
        return output_noise(self.reference, self.outputs({n: changed[n] for n in group}))[1]

    def find_culprits(self, changed: dict[str, np.ndarray], allowed_noise: float, max_runs: int = MAX_SEARCH_RUNS,
                      total_noise: float | None = None) -> dict[str, float]:
        """The tensors whose rebuilt values alone cost more than a HARMLESS_SHARE of
        `allowed_noise` (output noise energy on the probes), with the noise each causes (inf for
        non-finite outputs).

        Group testing, level by level: each group's rebuilt values go into the model alone; a
        harmless group is dropped, a harmful one split in SEARCH_FANOUT parts (model order, so a
        block's tensors stay together) until single tensors remain. The groups of a level run side
        by side (onnxruntime releases the GIL; each session runs on one thread). `total_noise`,
        the check's measurement of all of `changed` together, saves the first run. When `max_runs`
        is spent, every tensor of a group still harmful counts as a culprit with that group's noise.
        (Stopping once the culprits found should cover the excess does not pay: on the PP-OCR
        detector the noises of single tensors do not add up to their group's.)
        """
        harmless = allowed_noise * HARMLESS_SHARE
        culprits: dict[str, float] = {}
        names = list(changed)
        if total_noise is None:
            pending: list[tuple[list[str], float]] = [(names, math.inf)]
        elif total_noise <= harmless:
            return culprits
        else:
            pending = _split(names, total_noise)
        runs = 0
        while pending:
            affordable, pending = pending[: max(0, max_runs - runs)], pending[max(0, max_runs - runs) :]
            for group, inherited in pending:
                culprits.update({name: inherited for name in group})
            groups = [group for group, _ in affordable]
            noises = ordered_map(lambda group: self.group_noise(changed, group), groups, "checks", ahead=len(groups))
            runs += len(affordable)
            pending = []
            for group, noise in zip(groups, noises):
                if noise <= harmless:
                    continue
                if len(group) == 1:
                    culprits[group[0]] = noise
                else:
                    pending.extend(_split(group, noise))
        return culprits


def _split(group: list[str], noise: float) -> list[tuple[list[str], float]]:
    """A harmful group's SEARCH_FANOUT parts in model order, each with the group's noise until
    measured; a single tensor is its own part."""
    size = math.ceil(len(group) / SEARCH_FANOUT)
    return [(group[i : i + size], noise) for i in range(0, len(group), size)]


def refinements(culprits: dict[str, float], allowed_noise: float, previous: dict[str, int | None]) -> dict[str, int | None]:
    """How much finer (QP) each culprit is coded next, None for exactly, on top of `previous`.

    A tensor's output noise scales with its step squared, 2^(QP/2): to bring noise n under a
    HARMLESS_SHARE of the allowed noise takes 2 log2(n / share) QP (at least 4, so a round
    always moves). Non-finite outputs, or more than MAX_REFINEMENT_QP, mean exact.
    """
    out = dict(previous)
    target = allowed_noise * HARMLESS_SHARE
    for name, noise in culprits.items():
        before = out.get(name, 0)
        if before is None:
            continue
        if not math.isfinite(noise) or target <= 0:
            out[name] = None
            continue
        step = max(4, math.ceil(2.0 * math.log2(max(noise / target, 1.0))))
        total = before + step
        out[name] = None if total > MAX_REFINEMENT_QP else total
    return out


def uniform_refinements(names: Sequence[str], noise: float, allowed_noise: float,
                         previous: dict[str, int | None]) -> dict[str, int | None]:
    """Every tensor of `names` finer by the QP that brings the total output `noise` under
    `allowed_noise` (noise ~ 2^(QP/2), plus one QP of margin): for noise spread so evenly that no
    tensor alone is a culprit (a transformer's many similar layers)."""
    out = dict(previous)
    if not math.isfinite(noise) or allowed_noise <= 0:
        return out
    step = max(2, math.ceil(2.0 * math.log2(max(noise / allowed_noise, 1.0))) + 1)
    for name in names:
        before = out.get(name, 0)
        if before is not None:
            out[name] = None if before + step > MAX_REFINEMENT_QP else before + step
    return out


def describe_refinements(chosen: dict[str, int | None]) -> list[str]:
    """One line per refined tensor, e.g. 'conv.weight: 12 QP finer' or 'ln.eps: exact'."""
    return [f"{name}: exact" if k is None else f"{name}: {k} QP finer" for name, k in chosen.items()]


def repair(
    checker: Checker,
    encode: Callable[[dict[str, int | None]], Sequence[Tensor]],
    first: Sequence[Tensor],
    min_snr_db: float | None,
    floor_db: float | None = None,
) -> tuple[CheckResult, dict[str, int | None], int]:
    """Check `first` (the rebuilt tensors of the first encode) and, while it fails, find the
    culprits and re-encode with `encode(refinements) -> rebuilt tensors`; when no tensor alone is
    a culprit, every changed tensor is coded finer by the same QP. Returns the last check, the
    refinements used and the number of re-encodes."""
    changed = changed_tensors(checker.model, first)
    result = checker.check(changed, min_snr_db, floor_db)
    # The steps the user asked for set the bar: finer repairs raise the prediction, not the bar.
    predicted = result.predicted_snr_db
    chosen: dict[str, int | None] = {}
    rounds = 0
    while not result.passed and rounds < MAX_REPAIR_ROUNDS:
        allowed = checker.allowed_noise(result)
        noise = checker.signal / 10.0 ** (result.output_snr_db / 10.0) if result.finite else math.inf
        culprits = checker.find_culprits(changed, allowed, total_noise=noise)
        updated = refinements(culprits, allowed, chosen)
        if not culprits or updated == chosen:
            updated = uniform_refinements(list(changed), noise, allowed, chosen)
        if updated == chosen:
            break
        chosen = updated
        changed = changed_tensors(checker.model, encode(chosen))
        rounds += 1
        result = replace(checker.check(changed, min_snr_db, floor_db), predicted_snr_db=predicted)
    return result, chosen, rounds
