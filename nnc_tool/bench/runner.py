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

from ..errors import NncError, UsageError
from ..formats import FORMATS, read_model
from ..model import Model

RUNNABLE_FORMATS = ("onnx", "torchscript", "torch-export")
Runner = Callable[[np.ndarray], np.ndarray]


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
    """Arrays `x` (inputs) and optional `y` (integer labels) from an .npz file, never unpickling."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive.files:
                raise UsageError(path, f"data file has no array 'x' (found: {', '.join(archive.files) or 'none'})")
            inputs = archive["x"]
            labels = archive["y"] if "y" in archive.files else None
    except NncError:
        raise
    except (OSError, ValueError) as exc:
        raise UsageError(path, f"cannot read data file ({exc})") from None
    if labels is not None and len(labels) != len(inputs):
        raise UsageError(path, f"'x' has {len(inputs)} samples but 'y' has {len(labels)}")
    return inputs, labels


def make_runner(model_path: Path, fmt: str, threads: int = 1) -> Runner:
    """A callable that maps a batch of inputs to outputs (the first output) for a runnable model."""
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(os.fspath(model_path), options, providers=["CPUExecutionProvider"])
        input_meta = session.get_inputs()
        if len(input_meta) != 1:
            raise UsageError(model_path, f"bench supports models with one input; this one has {len(input_meta)}")
        name = input_meta[0].name
        element_type = _ORT_TYPES.get(input_meta[0].type, np.float32)

        def run_onnx(batch: np.ndarray) -> np.ndarray:
            return np.asarray(session.run(None, {name: batch.astype(element_type, copy=False)})[0])

        return run_onnx

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

    def run_torch(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            output = module(torch.from_numpy(np.ascontiguousarray(batch)))
        if isinstance(output, (tuple, list)):
            output = output[0]
        return output.detach().float().numpy()

    return run_torch


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def measure_latency(run: Runner, batch: np.ndarray, runs: int, warmup: int) -> LatencyStats:
    for _ in range(warmup):
        run(batch)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(batch)
        times.append((time.perf_counter() - start) * 1000.0)
    times.sort()
    return LatencyStats(
        batch_size=len(batch),
        runs=runs,
        median_ms=statistics.median(times),
        p10_ms=times[int(0.1 * (runs - 1))],
        p90_ms=times[int(0.9 * (runs - 1))],
    )


def predict(run: Runner, inputs: np.ndarray, batch_size: int = 256) -> np.ndarray:
    return np.concatenate([run(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])


def compare_outputs(original: np.ndarray, rebuilt: np.ndarray, labels: np.ndarray | None) -> QualityStats:
    original = original.reshape(len(original), -1).astype(np.float64)
    rebuilt = rebuilt.reshape(len(rebuilt), -1).astype(np.float64)
    noise = float(((original - rebuilt) ** 2).sum())
    signal = float((original**2).sum())
    snr = float("inf") if noise == 0 else 10.0 * np.log10(signal / noise) if signal > 0 else float("-inf")
    stats = QualityStats(samples=len(original), output_snr_db=snr)
    if original.shape[1] > 1:
        stats.top1_agreement = 100.0 * float((original.argmax(1) == rebuilt.argmax(1)).mean())
        if labels is not None:
            labels = labels.reshape(-1)
            stats.accuracy_original = 100.0 * float((original.argmax(1) == labels).mean())
            stats.accuracy_rebuilt = 100.0 * float((rebuilt.argmax(1) == labels).mean())
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


def random_inputs(model_path: Path, fmt: str, samples: int, seed: int = 0) -> np.ndarray:
    """Standard-normal inputs shaped like the ONNX model's input (dynamic dimensions become 1)."""
    if fmt != "onnx":
        raise UsageError(model_path, "needs --data to know the input shape of a PyTorch model")
    import onnxruntime as ort

    session = ort.InferenceSession(os.fspath(model_path), providers=["CPUExecutionProvider"])
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in session.get_inputs()[0].shape]
    shape[0] = samples
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


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
    inputs: np.ndarray | None = None
    labels: np.ndarray | None = None
    batch: np.ndarray | None = None  # the latency batch
    outputs: np.ndarray | None = None
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
        reference.inputs, reference.labels = load_eval_data(data_path)
    else:
        reference.inputs = random_inputs(model_path, reference.format, samples=max(batch_size, 64))
        reference.notes.append("no --data: fidelity measured on random inputs")
    batch = reference.inputs[:batch_size]
    if len(batch) < batch_size:
        batch = np.concatenate([batch] * (batch_size // max(len(batch), 1) + 1))[:batch_size]
    reference.batch = batch
    run = make_runner(model_path, reference.format, threads)
    with _runtime_errors(data_path or model_path):
        reference.latency = measure_latency(run, batch, runs, warmup)
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
            report.latency_rebuilt = measure_latency(run_rebuilt, reference.batch, reference.runs, reference.warmup)
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
    calibration: np.ndarray | None = None,
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
