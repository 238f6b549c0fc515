"""The Python API: what the CLI calls and what users import.

    import nnc_tool
    report = nnc_tool.encode("model.onnx", "model.nnc", nnc_tool.EncodeOptions(qp=-36))
    nnc_tool.decode("model.nnc", "rebuilt.onnx")
"""
from __future__ import annotations

import hashlib
import io
import os
import time
from contextlib import ExitStack
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np

from . import __version__
from .bench.runner import compare_outputs
from .bitstream import container
from .bitstream.container import UnitType
from .coding.pack import encode_pack, is_packable, uses_float_groups
from .coding.tensors import Coding, coded_levels, encode_tensor, exact_coding, is_quantized, reconstruction
from .decoder import (  # noqa: F401 - the reading side is part of this API too
    DecodeReport,
    StreamInfo,
    TensorReport,
    UnitInfo,
    decode,
    decompress_model,
    describe_data_unit,
    describe_packed_tensor,
    even_shares,
    explain_roles,
    info,
    model_file_bytes,
)
from .errors import CheckError, NncError, UsageError
from .fileio import atomic_output, release_pages, same_file
from .formats import drop_optimizer_state as drop_optimizer_tensors, optimizer_state_tensors, read_model
from .graph.activation_stats import ChannelMoments, channel_moments
from .graph.measured_stats import measure_channel_moments
from .inputs import ModelInputs, as_model_inputs, calibration_inputs, run_model
from .model import Model, Tensor
from .parallel import ordered_map
from .prune import PruneConfig, PruneReport, prune
from .quantize.fold import fold_batchnorms
from .quantize.plan import FOLD_ROWS, FOLD_SCALES, MEASURED_MOMENTS, cached_fast_calibration, plan_quantization
from .ratecontrol import RateControlReport, RateTarget, Trial, search_qp
from .verify import CHECK_MAX_VALUES, Checker, CheckReport, describe_refinements, repair, runnable
from .quantize.uniform import Quantized, QuantSettings, effective_nonweight_qp

EncodeOptions = QuantSettings
Progress = Callable[[int, int], None]
# Model inputs as the API takes them: ModelInputs (nnc_tool.inputs.load_inputs / read_inputs), a
# mapping of arrays by input name, or a bare array for a one-input model.
Inputs = ModelInputs | dict | np.ndarray


@dataclass
class EncodeReport:
    input: str
    output: str | None
    format: str
    original_bytes: int
    bitstream_bytes: int
    topology_bytes: int
    tensor_count: int
    parameter_count: int
    seconds: float
    tensors: list[TensorReport] = field(default_factory=list)
    pruning: PruneReport | None = None
    folded_batchnorms: int = 0
    corrected_biases: int = 0  # layers whose bias absorbed the mean shift of their rounded weights
    feedback_layers: int = 0  # layers rounded with GPTQ error feedback (measured or estimated inputs)
    calibration_mode: str | None = None  # "full" or "fast" when calibration data was used (see QuantSettings)
    qp: int | None = None  # the weight QP used (chosen by rate control when a target was given)
    rate_control: RateControlReport | None = None
    check: CheckReport | None = None  # the self-check (nnc_tool/verify.py); None when not run
    optimizer_state_tensors: int = 0  # kept optimizer/scheduler/scaler tensors of a training checkpoint
    optimizer_state_bytes: int = 0  # their (exactly coded) share of the bitstream
    dropped_optimizer_tensors: int | None = None  # with drop_optimizer_state: how many were dropped (0: none held)

    @property
    def ratio(self) -> float:
        return self.original_bytes / self.bitstream_bytes if self.bitstream_bytes else float("inf")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["ratio"] = self.ratio
        return data


@dataclass
class StreamSummary:
    """What `write_bitstream` wrote."""

    bitstream_bytes: int
    topology_bytes: int  # payload of the (compressed) topology unit
    tensors: list[TensorReport]
    corrected_biases: list[str] = field(default_factory=list)
    feedback_layers: list[str] = field(default_factory=list)
    calibration_mode: str | None = None  # how the plan used calibration data (QuantPlan.calibration_mode)


def write_bitstream(
    model: Model,
    sink: BinaryIO,
    options: EncodeOptions | None = None,
    original_bytes: int = 0,
    calibration: Inputs | None = None,
    progress: Progress | None = None,
    plan_cache: dict | None = None,
    moments: dict[str, ChannelMoments] | None = None,
    refinements: dict[str, int | None] | None = None,
    rebuilt: list[Tensor] | None = None,
    earlier: dict[str, tuple[tuple, bytes]] | None = None,
) -> StreamSummary:
    """Code an in-memory model into a complete bitstream written to `sink`, unit by unit.

    The quantization plan gives each tensor its own QP (sensitivity allocation) and, with
    `calibration` inputs on ONNX models, error-compensated levels (see quantize/plan.py).
    Each data unit goes to `sink` as soon as its tensor is coded, and a file-mapped tensor's
    pages are released right after, so memory stays near the largest tensor, not the model.
    `progress(done, total)` is called after each tensor is coded; `plan_cache` (see
    `plan_quantization`) lets repeated calls on the same model and data skip calibration work.
    `moments` (`channel_moments` of the model before BatchNorm folding) enable bias correction
    and, without calibration data, Kronecker error feedback. `refinements` (tensor -> QPs finer,
    None for exact) are the self-check's repairs (nnc_tool/verify.py). `rebuilt`, when given, is
    filled with the tensors as the decoder will rebuild them (its dequantization, no entropy
    decoding), for the self-check. The summary's tensor reports carry no role reasons: `encode`
    adds them (decoder.explain_roles) once, for the report it returns.
    """
    options = options or EncodeOptions()
    plan = plan_quantization(model, options, calibration, cache=plan_cache, moments=moments, refinements=refinements)
    model = plan.model
    parameters = {
        "format": model.format,
        "tensor_count": len(model.tensors),
        "original_bytes": original_bytes,
        "metadata": model.metadata,
        "settings": {
            "qp": options.qp,
            "nonweight_qp": effective_nonweight_qp(options),
            "allocate": options.allocate,
            "error_feedback": options.error_feedback,
            "bias_correction": options.bias_correction,
            "dependent": options.dependent,
            "kernel_correlation": options.kernel_correlation,
            "rdo": options.rdo,
            "bits": options.bits,
            "per_channel": options.per_channel,
            "lossless": options.lossless,
        },
        "encoder": f"nnc {__version__}",
    }
    topology = container.topology_payload(model.topology)
    quantized = [is_quantized(t, plan.settings_for(t, options), plan.quantized.get(t.name)) for t in model.tensors]
    packed = [(index, tensor) for index, tensor in enumerate(model.tensors) if is_packable(tensor, quantized[index])]
    pack = container.frame_unit(UnitType.PACK, encode_pack(packed)) if packed else b""
    in_pack = {index for index, _ in packed}
    exact_floats = any(
        index not in in_pack and not quantized[index] and exact_coding(t.dtype) == Coding.FLOAT_GROUPS
        for index, t in enumerate(model.tensors)
    )
    float_groups = exact_floats or uses_float_groups(packed)
    minor = container.FLOAT_GROUPS_MINOR if float_groups else container.PACK_MINOR if packed else 0
    written = 0
    for part in (
        container.stream_header(minor),
        container.frame_unit(UnitType.PARAMETER_SET, container.parameter_set_payload(parameters)),
        container.frame_unit(UnitType.TOPOLOGY, topology),
        pack,
    ):
        sink.write(part)
        written += len(part)
    reports: list[TensorReport | None] = [None] * len(model.tensors)
    for share, (index, tensor) in zip(even_shares(len(pack), len(packed)), packed):
        reports[index] = describe_packed_tensor(tensor, share)
    done = len(packed)
    if progress is not None and done:
        progress(done, len(model.tensors))

    def code(job: tuple[Tensor, QuantSettings, object]) -> tuple[bytes, np.ndarray | None]:
        tensor, settings, levels = job
        levels = coded_levels(tensor, settings, levels)
        key = None if earlier is None or levels is None else (settings, _levels_digest(levels))
        known = earlier.get(tensor.name) if key is not None else None
        if known is not None and known[0] == key:
            payload = known[1]
        else:
            payload = encode_tensor(tensor, settings, levels)
            if key is not None:
                earlier[tensor.name] = (key, payload)
        return payload, None if rebuilt is None else reconstruction(tensor, levels)

    # Exact float tensors are coded side by side, a few ahead of the one being written
    # (nnc_tool/parallel.py): zstd and numpy release the GIL. Quantized coding holds it, and
    # threads made it slower (PP-OCR recognizer 0.51 -> 0.68 s), so a lossy stream is coded in turn.
    jobs = ((t, plan.settings_for(t, options), plan.quantized.pop(t.name, None))
            for index, t in enumerate(model.tensors) if reports[index] is None)
    coded = ordered_map(code, jobs, "tensors" if exact_floats else None)
    for index, tensor in enumerate(model.tensors):
        if reports[index] is not None:
            if rebuilt is not None:
                rebuilt.append(Tensor(tensor.name, tensor.array, tensor.role))
            continue
        payload, array = next(coded)
        if rebuilt is not None:
            rebuilt.append(Tensor(tensor.name, array, tensor.role))
        release_pages(tensor.array)
        size = container.write_unit(sink, UnitType.DATA, payload)
        written += size
        reports[index] = describe_data_unit(memoryview(payload), size)
        del payload, array
        done += 1
        if progress is not None:
            progress(done, len(model.tensors))
    return StreamSummary(written, len(topology), reports, plan.corrected, plan.compensated, plan.calibration_mode)


def _levels_digest(quantized: Quantized) -> bytes:
    """A digest of everything `encode_tensor` reads from quantized levels."""
    digest = hashlib.blake2b(digest_size=16)
    for part in (quantized.levels, quantized.steps, quantized.qps):
        if part is not None:
            digest.update(str((part.dtype, part.shape)).encode())
            digest.update(np.ascontiguousarray(part))
    digest.update(str(quantized.chain).encode())
    return digest.digest()


@dataclass
class PreparedModel:
    """A model ready for `compress_model` / `write_bitstream`: BatchNorms folded (`folded` of
    them), its activation `moments`, and `plan_cache` (what the quantization plan needs from
    the model and the calibration data, measured once for every QP)."""

    model: Model
    moments: dict[str, ChannelMoments]
    folded: int
    plan_cache: dict


def prepare_model(
    model: Model,
    options: EncodeOptions | None = None,
    calibration: Inputs | None = None,
    fold_batchnorm: bool = True,
) -> PreparedModel:
    """Read what the encode needs before BatchNorm folding removes it, then fold.

    BatchNorm statistics tell each layer's mean input and input covariance (bias correction,
    data-free error feedback), so `channel_moments` reads them first. With `fast_calibration`
    (large models with calibration data) the one pass of measured channel moments runs in
    onnxruntime on the unfolded model (activation names survive folding) in a thread, beside
    the reading and folding: onnxruntime's run releases the GIL (building the session does not).
    Digits ResNet-18, median of 10: 0.22 s one after the other, 0.17 s side by side.
    """
    options = options or EncodeOptions()
    calibration = calibration_inputs(calibration, model)
    cache: dict = {}
    fast = calibration is not None and cached_fast_calibration(model, options, calibration, cache)
    with ThreadPoolExecutor(max_workers=1) as pool:
        measuring = pool.submit(measure_channel_moments, model, calibration) if fast else None
        wanted = (options.bias_correction or options.error_feedback) and not options.lossless
        # Measured covariances replace the estimated ones: skip the W W^T of every convolution.
        moments = channel_moments(model, covariances=not fast) if wanted else {}
        folded = 0
        if fold_batchnorm and not options.lossless:
            result = fold_batchnorms(model)
            model, folded = result.model, result.count
            cache[FOLD_SCALES] = result.scales
            cache[FOLD_ROWS] = result.row_scaled
        if measuring is not None:
            cache[MEASURED_MOMENTS] = measuring.result()
    return PreparedModel(model, moments, folded, cache)


def compress_model(
    model: Model,
    options: EncodeOptions | None = None,
    original_bytes: int = 0,
    calibration: Inputs | None = None,
    progress: Progress | None = None,
    plan_cache: dict | None = None,
    moments: dict[str, ChannelMoments] | None = None,
) -> tuple[bytes, list[TensorReport]]:
    """Code an in-memory model into a complete bitstream (see `write_bitstream`)."""
    sink = io.BytesIO()
    summary = write_bitstream(model, sink, options, original_bytes, calibration, progress, plan_cache, moments)
    return sink.getvalue(), summary.tensors


def encode(
    model_path: str | os.PathLike,
    output_path: str | os.PathLike | None,
    options: EncodeOptions | None = None,
    pruning: PruneConfig | None = None,
    fold_batchnorm: bool = True,
    calibration: Inputs | None = None,
    progress: Progress | None = None,
    target: RateTarget | None = None,
    evaluation: ModelInputs | tuple[np.ndarray, np.ndarray] | None = None,
    verify: bool = True,
    min_snr_db: float | None = None,
    drop_optimizer_state: bool = False,
    floor_snr_db: float | None = None,
) -> EncodeReport:
    """Compress a model file into an nnc bitstream written atomically to `output_path`.

    `verify` (default on) decodes the result in memory and runs it beside the original on probe
    inputs (the first `calibration` samples, else inputs synthesised from the graph): a result
    whose outputs are non-finite, collapse far below what its steps predict, or fall below
    `min_snr_db` has the tensors responsible coded finer or exactly and is checked again
    (nnc_tool/verify.py). An unmet `min_snr_db` or outputs still non-finite raise CheckError and
    nothing is written. `floor_snr_db` is a fidelity the repair works toward the same way but
    that only warns when it cannot be reached: what `nnc encode` without --qp/--bits/a rate
    target asks for (verify.DEFAULT_FLOOR_DB); ignored under rate control, which chose the QP for
    its own target. ONNX models only (others report the check as not run); the report's
    `check` says what was measured and changed.

    `drop_optimizer_state` keeps only the model part of a training checkpoint (torch.save of a
    dict holding an optimizer's state_dict(), and LR-scheduler / GradScaler state, under any key):
    the decoded file is a checkpoint of the weights and the bookkeeping (epoch, step, ...). Without
    it that state is kept exactly and the report says what it costs. A model without such state
    is encoded as it is (the report's `dropped_optimizer_tensors` is then 0): a batch over a mix
    of checkpoints and plain models can pass the flag to all of them.

    `pruning` runs the pruning stage before quantization; `calibration` (model inputs, see
    `Inputs`: arrays named after the model's inputs) lets quantization measure each tensor's
    sensitivity and compensate rounding errors; inputs that do not fit the model are a UsageError
    before anything is written.
    `fold_batchnorm` folds ONNX
    BatchNormalization nodes into the preceding layer first (the decoded model computes the same
    function with fewer tensors; never with `lossless`). With `output_path=None` nothing is
    written (useful for measuring sizes). `progress(done, total)` is called after each tensor is coded.

    `target` (rate control) replaces `options.qp` by the QP that meets it: the finest QP whose
    bitstream fits a size or ratio target, the coarsest whose decoded model keeps an output SNR
    on `calibration` inputs or an accuracy on `evaluation` (ModelInputs with labels, or a tuple
    (inputs, labels)). Quality targets run the model in onnxruntime, so they need an ONNX model.
    """
    started = time.perf_counter()
    model_path = Path(model_path)
    if output_path is not None and same_file(model_path, output_path):
        raise UsageError(output_path, "output would overwrite the input model")
    model = read_model(model_path)
    calibration = calibration_inputs(calibration, model)
    if isinstance(evaluation, tuple):
        evaluation = ModelInputs({"x": np.asarray(evaluation[0])}, labels=None if evaluation[1] is None else np.asarray(evaluation[1]))
    evaluation = as_model_inputs(evaluation, model)
    original_bytes = model_file_bytes(model_path, model)
    dropped = None
    if drop_optimizer_state:
        model, dropped = drop_optimizer_tensors(model, model_path)
    optimizer_names = optimizer_state_tensors(model)
    prune_report = None
    if pruning is not None and (pruning.sparsity > 0 or pruning.method == "nm"):
        model, prune_report = prune(model, pruning)
    options = options or EncodeOptions()
    prepared = prepare_model(model, options, calibration, fold_batchnorm)
    model, moments, folded, plan_cache = prepared.model, prepared.moments, prepared.folded, prepared.plan_cache
    rate_report = None
    if target is not None:
        rate_report = _control_rate(model, model_path, options, target, original_bytes, calibration, evaluation, plan_cache, moments)
        options = replace(options, qp=rate_report.chosen_qp)
        floor_snr_db = None
    unchecked = None if options.lossless else _why_unchecked(model)
    checking = verify and not options.lossless and unchecked is None
    if min_snr_db is not None and not checking:
        reason = "lossless output is exact" if options.lossless else unchecked or "--no-check skips it"
        raise UsageError(model_path, f"--min-snr needs the self-check, and {reason}")
    check_report = None
    if verify and unchecked is not None:
        check_report = CheckReport.not_run(unchecked)
    with ThreadPoolExecutor(max_workers=1) as pool:
        # The probes, the checker's session and the reference run (onnxruntime releases the GIL)
        # overlap quantization and coding.
        checker = pool.submit(Checker, model, calibration) if checking else None
        rebuilt: list[Tensor] | None = [] if checking else None
        payloads: dict[str, tuple[tuple, bytes]] | None = {} if checking else None
        with ExitStack() as stack:
            if output_path is None:
                sink: BinaryIO = _CountingSink()
            else:
                tmp = stack.enter_context(atomic_output(output_path))
                sink = stack.enter_context(open(tmp, "wb"))
            summary = write_bitstream(
                model, sink, options, original_bytes, calibration, progress, plan_cache, moments, rebuilt=rebuilt,
                earlier=payloads,
            )
            if checker is not None:
                ready = _ready_checker(checker)
                if isinstance(ready, CheckReport):
                    if min_snr_db is not None:
                        raise CheckError(model_path, f"--min-snr cannot be checked: {ready.skipped}")
                    check_report = ready
                else:
                    summary, check_report = _checked(
                        ready, sink, rebuilt, summary, options, original_bytes, calibration, plan_cache,
                        moments, min_snr_db, model_path, floor_snr_db, payloads,
                    )
    # Why each tensor has its role, for the report (recomputed from the topology: not in the stream).
    explain_roles(model.format, model.topology, summary.tensors)
    return EncodeReport(
        input=str(model_path),
        output=None if output_path is None else str(output_path),
        format=model.format,
        original_bytes=original_bytes,
        bitstream_bytes=summary.bitstream_bytes,
        topology_bytes=summary.topology_bytes,
        tensor_count=len(model.tensors),
        parameter_count=model.parameter_count,
        seconds=time.perf_counter() - started,
        tensors=summary.tensors,
        pruning=prune_report,
        folded_batchnorms=folded,
        corrected_biases=len(summary.corrected_biases),
        feedback_layers=len(summary.feedback_layers),
        calibration_mode=summary.calibration_mode,
        qp=options.qp,
        rate_control=rate_report,
        check=check_report,
        optimizer_state_tensors=len(optimizer_names),
        optimizer_state_bytes=sum(t.coded_bytes for t in summary.tensors if t.name in optimizer_names),
        dropped_optimizer_tensors=dropped,
    )


def _why_unchecked(model: Model) -> str | None:
    """Why the self-check cannot run on `model`, or None when it can."""
    if not runnable(model):
        return f"the self-check runs ONNX models in onnxruntime; this is a {model.format} model"
    values = sum(t.array.size for t in model.tensors if t.is_float)
    if values > CHECK_MAX_VALUES:
        # It holds the rebuilt weights beside the model's: past this, memory would double.
        return f"the self-check holds a second copy of the weights; {values / 1e6:.0f} M values are over its {CHECK_MAX_VALUES // 10**6} M"
    return None


def _ready_checker(future) -> Checker | CheckReport:
    """The checker built beside the encode, or why the check cannot run: a model that does not
    run in onnxruntime as given (an op without a CPU kernel for its dtype, inputs no probe fits)
    is encoded all the same, and the report says it was not checked."""
    try:
        return future.result()
    except NncError as err:
        return CheckReport.not_run(err.problem)
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types for models it cannot run
        if not type(err).__module__.startswith("onnxruntime"):
            raise
        text = " ".join(str(err).split())
        return CheckReport.not_run(f"the original model does not run in onnxruntime ({text[:200]})")


def _checked(
    checker: Checker,
    sink: BinaryIO,
    rebuilt: list[Tensor],
    summary: StreamSummary,
    options: EncodeOptions,
    original_bytes: int,
    calibration: ModelInputs | None,
    plan_cache: dict,
    moments: dict[str, ChannelMoments],
    min_snr_db: float | None,
    model_path: Path,
    floor_snr_db: float | None = None,
    payloads: dict[str, tuple[tuple, bytes]] | None = None,
) -> tuple[StreamSummary, CheckReport]:
    """The self-check of what was just written, re-coding into `sink` while the repair asks for it."""
    started = time.perf_counter()
    latest = summary

    def recode(refinements: dict[str, int | None]) -> list[Tensor]:
        nonlocal latest
        again: list[Tensor] = []
        sink.seek(0)
        sink.truncate()
        latest = write_bitstream(
            checker.model, sink, options, original_bytes, calibration, None, plan_cache, moments,
            refinements=refinements, rebuilt=again, earlier=payloads,
        )
        return again

    result, chosen, rounds = repair(checker, recode, rebuilt, min_snr_db, floor_snr_db)
    rebuilt.clear()
    report = CheckReport(
        probes=checker.source,
        samples=len(checker.probes),
        output_snr_db=result.output_snr_db,
        predicted_snr_db=result.predicted_snr_db,
        top1_agreement=result.top1_agreement,
        passed=result.passed,
        seconds=time.perf_counter() - started,
        refined=describe_refinements(chosen),
        rounds=rounds,
        shortfall=None if result.passed else result.reason(),
    )
    # A demanded SNR is a contract; a collapse the repair could not fully undo is written (it is far
    # better than before the repair, and the report says how far it stays below the prediction)
    # unless its outputs are not even finite.
    if not result.passed and (min_snr_db is not None or not result.finite):
        changed = f" after coding {len(chosen)} tensors finer" if chosen else ""
        raise CheckError(model_path, f"self-check failed{changed}: {result.reason()} (--no-check writes it anyway)")
    return latest, report


def _control_rate(
    model: Model,
    model_path: Path,
    options: EncodeOptions,
    target: RateTarget,
    original_bytes: int,
    calibration: ModelInputs | None,
    evaluation: ModelInputs | None,
    plan_cache: dict,
    moments: dict[str, ChannelMoments],
) -> RateControlReport:
    if options.lossless or options.bits is not None:
        raise UsageError(None, "rate control chooses the QP: it does not combine with lossless or --bits")
    inputs = labels = None
    if target.snr_db is not None:
        if calibration is None:
            raise UsageError(None, "an SNR target needs calibration inputs (--calib) to measure the output on")
        inputs = calibration
    elif target.max_accuracy_drop is not None:
        if evaluation is None or evaluation.labels is None:
            raise UsageError(None, "an accuracy target needs labelled data (--data with the model's inputs and labels 'y')")
        inputs, labels = evaluation, evaluation.labels
    if inputs is not None and model.format != "onnx":
        raise UsageError(model_path, f"quality targets run the model in onnxruntime; this is a {model.format} model")
    reference = None if inputs is None else _all_outputs(model, inputs)

    def measure(qp: int) -> Trial:
        data, _ = compress_model(model, replace(options, qp=qp), original_bytes, calibration, plan_cache=plan_cache, moments=moments)
        trial = Trial(qp, len(data))
        if reference is not None:
            quality = compare_outputs(reference, _all_outputs(decompress_model(data), inputs), labels)
            trial.snr_db, trial.accuracy = quality.output_snr_db, quality.accuracy_rebuilt
        return trial

    original_accuracy = None if labels is None else compare_outputs(reference, reference, labels).accuracy_original
    try:
        return search_qp(target, measure, original_bytes, original_accuracy)
    except UsageError as err:
        raise UsageError(model_path, err.problem) from None


def _all_outputs(model: Model, inputs: ModelInputs) -> list[np.ndarray]:
    """Every output of the model on `inputs`, all samples in one run where they batch (as the
    calibration runs do; the reference and every trial see the same batching)."""
    return run_model(model, inputs, batch_size=max(len(inputs), 1))


class _CountingSink:
    """A sink that discards what it is given (encode without an output file: write_bitstream counts)."""

    def write(self, data: bytes) -> int:
        return len(data)

    def seek(self, offset: int) -> int:
        return offset

    def truncate(self) -> int:
        return 0
