"""Measure what users care about: size, latency of original and rebuilt model, accuracy or fidelity."""
from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..formats import FORMATS, read_model
from ..inputs import ModelInputs, bind_inputs, probe_inputs, read_inputs
from ..model import Model
from ..verify import looks_like_logits

RUNNABLE_FORMATS = ("onnx", "torchscript", "torch-export")
Feeds = dict[str, np.ndarray]
# Samples per run when predicting on evaluation inputs that batch.
PREDICT_BATCH = 256
# Probe inputs bench synthesises without --data (nnc_tool.inputs.probe_inputs).
PROBE_SAMPLES = 64


@dataclass
class LatencyStats:
    batch_size: int
    runs: int
    median_ms: float
    p10_ms: float
    p90_ms: float


@dataclass
class QualityStats:
    samples: int
    accuracy_original: float | None = None  # top-1 in percent, when labels are given
    accuracy_rebuilt: float | None = None
    top1_agreement: float | None = None  # percent of samples where both models pick the same class
    output_snr_db: float | None = None


@dataclass
class BenchReport:
    model: str
    format: str
    original_bytes: int
    bitstream_bytes: int
    ratio: float
    encode_seconds: float | None
    decode_seconds: float
    weight_snr_db: float | None
    latency_original: LatencyStats | None = None
    latency_rebuilt: LatencyStats | None = None
    quality: QualityStats | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def load_eval_data(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """The one input array and optional labels `y` of a one-input model's .npz (legacy layout:
    `x` and `y`; see nnc_tool.inputs.read_inputs for files named after a model's inputs)."""
    inputs = read_inputs(path)
    if len(inputs.arrays) != 1:
        raise UsageError(path, f"data file has {len(inputs.arrays)} input arrays ({', '.join(inputs.names)}); one was expected")
    return inputs.single, inputs.labels


class ModelRunner:
    """Runs a model file: `run(feeds)` returns every output of one run (feeds by input name);
    calling it with a bare batch (a one-input model) returns the first output."""

    def __init__(self, run: Callable[[Feeds], list[np.ndarray]], input_names: list[str] | None) -> None:
        self.run = run
        self.input_names = input_names

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.input_names is not None and len(self.input_names) != 1:
            raise UsageError(None, f"this model has {len(self.input_names)} inputs: run it with named feeds")
        return np.asarray(self.run({self.input_names[0] if self.input_names else "x": batch})[0])


def make_runner(model_path: Path, fmt: str, threads: int = 1) -> ModelRunner:
    """A runner of a runnable model file (ONNX in onnxruntime, TorchScript / .pt2 in torch)."""
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(os.fspath(model_path), options, providers=["CPUExecutionProvider"])
        declared = {i.name: _ORT_TYPES.get(i.type) for i in session.get_inputs()}

        def run_onnx(feeds: Feeds) -> list[np.ndarray]:
            feeds = {n: a if declared.get(n) is None else a.astype(declared[n], copy=False) for n, a in feeds.items()}
            return [np.asarray(o) for o in session.run(None, feeds)]

        return ModelRunner(run_onnx, list(declared))

    import torch

    torch.set_num_threads(threads)
    if fmt == "torchscript":
        with warnings.catch_warnings():
            # torch 2.9+ flags TorchScript as deprecated; users with .pt files still need it run.
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(os.fspath(model_path), map_location="cpu").eval()
    elif fmt == "torch-export":
        module = torch.export.load(os.fspath(model_path)).module()
    else:
        raise UsageError(model_path, f"a {FORMATS[fmt].description} holds no runnable graph")

    def run_torch(feeds: Feeds) -> list[np.ndarray]:
        # PyTorch modules take their inputs by position: the arrays in the data file's order.
        with torch.inference_mode():
            output = module(*(torch.from_numpy(np.ascontiguousarray(a)) for a in feeds.values()))
        outputs = output if isinstance(output, (tuple, list)) else [output]
        return [o.detach().float().numpy() for o in outputs if isinstance(o, torch.Tensor)]

    return ModelRunner(run_torch, None)


_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64, "tensor(int64)": np.int64,
    "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
}


def measure_latency(run: ModelRunner | Callable, batch: np.ndarray | Feeds, runs: int, warmup: int,
                    batch_size: int | None = None) -> LatencyStats:
    """Timings of `run` on one batch: a bare array (a runner's call) or feeds by input name
    (`run.run`); `batch_size` is the samples the batch holds (default: its length)."""
    call = run.run if isinstance(batch, dict) and isinstance(run, ModelRunner) else run
    for _ in range(warmup):
        call(batch)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call(batch)
        times.append((time.perf_counter() - start) * 1000.0)
    times.sort()
    if batch_size is None:
        batch_size = len(next(iter(batch.values()))) if isinstance(batch, dict) else len(batch)
    return LatencyStats(
        batch_size=batch_size,
        runs=runs,
        median_ms=statistics.median(times),
        p10_ms=times[int(0.1 * (runs - 1))],
        p90_ms=times[int(0.9 * (runs - 1))],
    )


def predict(run: ModelRunner | Callable, inputs: np.ndarray | ModelInputs, batch_size: int = PREDICT_BATCH):
    """Outputs on all inputs: for a bare array the first output (concatenated batches); for
    ModelInputs every output, joined as nnc_tool.inputs.ModelInputs.combine says."""
    if not isinstance(inputs, ModelInputs):
        return np.concatenate([run(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])
    return inputs.combine([run.run(inputs.feeds(start, stop)) for start, stop in inputs.ranges(batch_size)])


def compare_outputs(original: np.ndarray | list[np.ndarray], rebuilt: np.ndarray | list[np.ndarray],
                    labels: np.ndarray | None) -> QualityStats:
    """Fidelity of `rebuilt` outputs to `original` (one array, or every output of the model):
    the output SNR over all float outputs; top-1 agreement and accuracy on `labels` from the
    first output when it looks like logits (float, one row of more than one score per sample)."""
    originals = [np.asarray(original)] if isinstance(original, np.ndarray) else [np.asarray(o) for o in original]
    rebuilts = [np.asarray(rebuilt)] if isinstance(rebuilt, np.ndarray) else [np.asarray(o) for o in rebuilt]
    noise = signal = 0.0
    for a, b in zip(originals, rebuilts):
        if not np.issubdtype(a.dtype, np.floating):
            continue
        a = a.reshape(max(len(a), 1) if a.ndim else 1, -1).astype(np.float64)
        b = b.reshape(a.shape).astype(np.float64)
        noise += float(((a - b) ** 2).sum())
        signal += float((a**2).sum())
    snr = float("inf") if noise == 0 else 10.0 * np.log10(signal / noise) if signal > 0 else float("-inf")
    first = originals[0]
    stats = QualityStats(samples=len(first) if first.ndim else 1, output_snr_db=snr)
    if looks_like_logits(first):
        scores = first.reshape(len(first), -1)
        other = rebuilts[0].reshape(scores.shape)
        stats.top1_agreement = 100.0 * float((scores.argmax(1) == other.argmax(1)).mean())
        if labels is not None:
            labels = labels.reshape(-1)
            stats.accuracy_original = 100.0 * float((scores.argmax(1) == labels).mean())
            stats.accuracy_rebuilt = 100.0 * float((other.argmax(1) == labels).mean())
    return stats


def weight_snr_db(original: Path | Model, rebuilt_path: Path) -> float | None:
    """SNR of all float tensors of the rebuilt model against the original, in dB.

    `original` is the original model file, or the Model already read from it (a sweep reads it once).
    None when the structure changed (structured or depth pruning): tensors then have no
    one-to-one counterpart and output fidelity is the meaningful measure.
    """
    tensors = (original if isinstance(original, Model) else read_model(original)).tensor_map()
    rebuilt = read_model(rebuilt_path).tensor_map()
    if any(name not in rebuilt or rebuilt[name].array.shape != t.array.shape for name, t in tensors.items()):
        return None
    signal = noise = 0.0
    for name, tensor in tensors.items():
        if not tensor.is_float:
            continue
        a = tensor.array.astype(np.float64)
        b = rebuilt[name].array.astype(np.float64)
        signal += float((a**2).sum())
        noise += float(((a - b) ** 2).sum())
    if signal == 0:
        return None
    return float("inf") if noise == 0 else 10.0 * float(np.log10(signal / noise))


def random_inputs(model_path: Path, fmt: str, samples: int, seed: int = 0) -> ModelInputs:
    """Probe inputs for an ONNX model file (nnc_tool.inputs.probe_inputs: shapes and value ranges from its graph)."""
    if fmt != "onnx":
        raise UsageError(model_path, "needs --data to know the inputs of a PyTorch model")
    return probe_inputs(read_model(model_path), samples=samples, seed=seed)


@dataclass
class Reference:
    """The original model, read, run and timed once: what every rebuilt model is compared with.

    A sweep builds one and measures dozens of rebuilt models against it, so the original's
    latency and outputs are not re-measured (and do not drift) from point to point.
    """

    path: Path
    format: str
    model: Model
    original_bytes: int
    runs: int
    warmup: int
    threads: int
    data_path: Path | None = None
    inputs: ModelInputs | None = None
    labels: np.ndarray | None = None
    batch: Feeds | None = None  # the latency batch, by input name
    batch_samples: int = 0  # samples in the latency batch
    outputs: list[np.ndarray] | None = None  # every output of the original on `inputs`
    latency: LatencyStats | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def runnable(self) -> bool:
        return self.format in RUNNABLE_FORMATS


def prepare_reference(
    model_path: str | os.PathLike,
    data_path: str | os.PathLike | None = None,
    runs: int = 50,
    warmup: int = 5,
    batch_size: int = 1,
    threads: int = 1,
) -> Reference:
    """Read MODEL, and if it is runnable, time it and record its outputs on the evaluation inputs."""
    from .. import api

    model_path = Path(model_path)
    if runs < 1 or batch_size < 1:
        raise UsageError(None, "runs and batch size must be at least 1")
    original = read_model(model_path)
    reference = Reference(
        path=model_path,
        format=original.format,
        model=original,
        original_bytes=api.model_file_bytes(model_path, original),
        runs=runs,
        warmup=warmup,
        threads=threads,
        data_path=None if data_path is None else Path(data_path),
    )
    if not reference.runnable:
        reference.notes.append(
            f"a {FORMATS[reference.format].description} holds no graph: latency and accuracy need ONNX, TorchScript or .pt2"
        )
        return reference
    if data_path is not None:
        reference.inputs = bind_inputs(read_inputs(data_path), original)
        if original.format != "onnx" and len(reference.inputs.arrays) != 1:
            reference.notes.append(f"PyTorch model: the data file's arrays are passed by position ({', '.join(reference.inputs.names)})")
        reference.labels = reference.inputs.labels
    else:
        reference.inputs = random_inputs(model_path, reference.format, samples=max(batch_size, PROBE_SAMPLES))
        reference.notes.append("no --data: fidelity measured on probe inputs synthesised from the graph's inputs")
    inputs = reference.inputs
    if not inputs.batchable and batch_size > 1:
        batch_size = 1
        reference.notes.append("latency at batch size 1: these inputs run one sample at a time")
    if len(inputs) < batch_size:
        inputs = inputs.repeat(batch_size // max(len(inputs), 1) + 1)
    reference.batch, reference.batch_samples = inputs.feeds(0, batch_size), batch_size
    run = make_runner(model_path, reference.format, threads)
    with _runtime_errors(data_path or model_path):
        reference.latency = measure_latency(run, reference.batch, runs, warmup, batch_size)
        reference.outputs = predict(run, reference.inputs)
    return reference


def measure_rebuild(
    reference: Reference,
    nnc_path: str | os.PathLike,
    encode_seconds: float | None = None,
    notes: list[str] | None = None,
) -> BenchReport:
    """Decode `nnc_path` and compare the rebuilt model with `reference`: size, latency, quality."""
    from .. import api

    fmt = reference.format
    with tempfile.TemporaryDirectory(prefix="nnc-bench-") as tmp:
        rebuilt_path = Path(tmp) / f"rebuilt{FORMATS[fmt].suffixes[0]}"
        decoded = api.decode(nnc_path, rebuilt_path)
        if decoded.format != fmt:
            raise UsageError(nnc_path, f"bitstream holds a {decoded.format} model but {reference.path} is {fmt}")
        report = BenchReport(
            model=str(reference.path),
            format=fmt,
            original_bytes=reference.original_bytes,
            bitstream_bytes=decoded.bitstream_bytes,
            ratio=reference.original_bytes / decoded.bitstream_bytes,
            encode_seconds=encode_seconds,
            decode_seconds=decoded.seconds,
            weight_snr_db=weight_snr_db(reference.model, rebuilt_path),
            notes=list(notes or []) + reference.notes,
        )
        if not reference.runnable:
            return report
        run_rebuilt = make_runner(rebuilt_path, fmt, reference.threads)
        with _runtime_errors(reference.data_path or reference.path):
            report.latency_rebuilt = measure_latency(run_rebuilt, reference.batch, reference.runs, reference.warmup,
                                                     reference.batch_samples)
            outputs_rebuilt = predict(run_rebuilt, reference.inputs)
        report.latency_original = reference.latency
        report.quality = compare_outputs(reference.outputs, outputs_rebuilt, reference.labels)
    return report


@contextlib.contextmanager
def _runtime_errors(blame: str | os.PathLike) -> Iterator[None]:
    try:
        yield
    except Exception as exc:  # the runtime's own message says which input did not fit
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(blame, f"the model cannot run on these inputs: {first_line}") from None


def encode_notes(encoded) -> list[str]:
    """What bench reports about an encode beyond sizes (today: how much pruning kept)."""
    if encoded.pruning is None:
        return []
    kept = encoded.pruning.parameters_after / max(encoded.pruning.parameters_before, 1)
    return [f"pruned ({encoded.pruning.method}): {100 * kept:.1f} % of parameters kept"]


def bench(
    model_path: str | os.PathLike,
    nnc_path: str | os.PathLike | None = None,
    data_path: str | os.PathLike | None = None,
    options=None,
    runs: int = 50,
    warmup: int = 5,
    batch_size: int = 1,
    threads: int = 1,
    pruning=None,
    fold_batchnorm: bool = True,
    calibration: ModelInputs | np.ndarray | None = None,
    progress: Callable[[int, int], None] | None = None,
    reference: Reference | None = None,
) -> BenchReport:
    """Encode (unless `nnc_path` is given), decode, and compare the rebuilt model with the original.

    `pruning` (a PruneConfig) prunes before quantization when this function encodes;
    `progress(done, total)` follows the encode tensor by tensor. Pass a `reference` from
    `prepare_reference` to measure several encodings against one measurement of the original
    (then `data_path`, `runs`, `warmup`, `batch_size` and `threads` come from it).
    """
    from .. import api

    if reference is None:
        reference = prepare_reference(model_path, data_path, runs, warmup, batch_size, threads)
    if nnc_path is not None:
        return measure_rebuild(reference, nnc_path)
    with tempfile.TemporaryDirectory(prefix="nnc-bench-") as tmp:
        nnc_path = Path(tmp) / "model.nnc"
        encoded = api.encode(reference.path, nnc_path, options, pruning=pruning, fold_batchnorm=fold_batchnorm,
                             calibration=calibration, progress=progress)
        return measure_rebuild(reference, nnc_path, encoded.seconds, encode_notes(encoded))
