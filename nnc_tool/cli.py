"""The `nnc` command: a thin shell over nnc_tool's Python API."""
from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
from dataclasses import asdict

import click

from . import __version__, api
from .bench import bench as run_bench
from .bench.runner import load_eval_data
from .coding.report import describe_entropy_report
from .errors import NncError, UsageError
from .prune import PruneConfig, PruneReport
from .prune.config import ALLOCATIONS, IMPORTANCES, METHODS, NM_GRANULARITIES, SCOPES
from .quantize.uniform import QuantSettings


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1000.0
    return f"{size} B"


def _fail(message: str, code: int) -> None:
    click.echo(f"nnc: error: {message}", err=True)
    sys.exit(code)


def handle_errors(command):
    """Turn every failure into one line on stderr and a non-zero exit code, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except NncError as err:
            _fail(str(err), err.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except OSError as err:
            _fail(f"{err.filename or ''}: {err.strerror or err}".lstrip(": "), 2)
        except Exception as err:  # noqa: BLE001 - the promise is one line, not a traceback
            if os.environ.get("NNC_DEBUG"):
                raise
            _fail(f"internal error: {type(err).__name__}: {err} (set NNC_DEBUG=1 for a traceback)", 1)

    return wrapper


def quantization_options(command):
    options = [
        click.option("--qp", type=click.IntRange(-256, 255), default=-38, show_default=True,
                     help="Weight QP; the step is 2^(QP/4) (NNCodec's convention)."),
        click.option("--nonweight-qp", type=click.IntRange(-256, 255), default=None,
                     help="QP of 1-D tensors (biases, norm parameters); default: 16 below --qp."),
        click.option("--bits", type=click.IntRange(2, 31), default=None,
                     help="Derive each weight tensor's step from its range for this many bits (overrides --qp)."),
        click.option("--per-channel", is_flag=True, help="One step per output channel."),
        click.option("--lossless", is_flag=True, help="Code every tensor bit-exactly."),
        click.option("--uniform-qp", is_flag=True,
                     help="Same QP for every weight tensor (default: per-tensor QPs by sensitivity)."),
        click.option("--rdo", type=click.FloatRange(0.0, 16.0), default=0.0, show_default=True,
                     help="Rate-aware rounding strength (0 = round to nearest)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def pruning_options(command):
    options = [
        click.option("--prune", "prune_method", type=click.Choice(METHODS), default=None,
                     help="Pruning before quantization: single weights, k-out-of-n, whole channels, or whole residual branches."),
        click.option("--sparsity", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.5, show_default=True,
                     help="Fraction of weights, channels or branches removed."),
        click.option("--scope", type=click.Choice(SCOPES), default="layer", show_default=True,
                     help="Unstructured: same fraction per layer, or one global threshold."),
        click.option("--nm", default="2:4", show_default=True, metavar="K:N",
                     help="k-out-of-n pruning: keep K of every N consecutive weights."),
        click.option("--nm-granularity", type=click.Choice(NM_GRANULARITIES), default="weight", show_default=True,
                     help="k-out-of-n over single weights or whole kernels."),
        click.option("--importance", type=click.Choice(IMPORTANCES), default="l1", show_default=True,
                     help="How channels are ranked (activation and shapley need --calib)."),
        click.option("--allocation", type=click.Choice(ALLOCATIONS), default="uniform", show_default=True,
                     help="How much each layer loses (sensitivity needs --calib)."),
        click.option("--calib", type=click.Path(dir_okay=False), default=None,
                     help=".npz with calibration inputs 'x' (a few hundred samples): pruning ranks and refits with "
                          "it, quantization measures tensor sensitivities and compensates rounding errors."),
        click.option("--no-refit", is_flag=True, help="Do not refit the next layers by least squares after pruning."),
        click.option("--shapley-permutations", type=click.IntRange(1, 10000), default=16, show_default=True,
                     help="Budget of the Shapley estimator: permutations per layer."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of random ranking and sampling."),
        click.option("--channel-multiple", type=click.IntRange(1, 1024), default=8, show_default=True,
                     help="Structured: keep a multiple of this many channels per layer (fast kernels); 1 = exact."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _pruning(prune_method: str | None, sparsity: float, scope: str, nm: str, nm_granularity: str, importance: str,
             allocation: str, calib: str | None, no_refit: bool, shapley_permutations: int, seed: int,
             channel_multiple: int, calibration=None) -> PruneConfig | None:
    if prune_method is None:
        return None
    try:
        k, n = (int(part) for part in nm.split(":"))
    except ValueError:
        raise UsageError(None, f"--nm expects K:N such as 2:4, got {nm!r}") from None
    if calibration is None and calib:
        calibration = load_eval_data(calib)[0]
    try:
        return PruneConfig(method=prune_method, sparsity=sparsity, scope=scope, nm=(k, n), nm_granularity=nm_granularity,
                           importance=importance, allocation=allocation, calibration=calibration, refit=not no_refit,
                           shapley_permutations=shapley_permutations, seed=seed, channel_multiple=channel_multiple)
    except ValueError as err:
        raise UsageError(None, str(err)) from None


def _settings(qp: int, nonweight_qp: int | None, bits: int | None, per_channel: bool, lossless: bool,
              uniform_qp: bool = False, rdo: float = 0.0) -> QuantSettings:
    return QuantSettings(qp=qp, nonweight_qp=nonweight_qp, bits=bits, per_channel=per_channel, lossless=lossless,
                         allocate=not uniform_qp, rdo=rdo)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nnc")
def main() -> None:
    """Compress neural networks (ONNX, PyTorch, safetensors) into compact NNC-style bitstreams."""
    # SIGTERM (a CI job cancelled, a container stopped) unwinds like Ctrl-C, so temporary
    # outputs are removed instead of left behind half written.
    signal.signal(signal.SIGTERM, _terminate)


def _terminate(signum: int, frame) -> None:
    raise KeyboardInterrupt


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Bitstream to write (.nnc).")
@quantization_options
@pruning_options
@click.option("--no-fold-bn", is_flag=True, help="Keep ONNX BatchNormalization nodes instead of folding them into the layer before.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("-v", "--verbose", is_flag=True, help="List every tensor.")
@handle_errors
def encode(model: str, output: str, qp: int, nonweight_qp: int | None, bits: int | None, per_channel: bool,
           lossless: bool, uniform_qp: bool, rdo: float, no_fold_bn: bool, as_json: bool, verbose: bool,
           **prune_options) -> None:
    """Compress MODEL into an nnc bitstream."""
    calibration = load_eval_data(prune_options["calib"])[0] if prune_options["calib"] else None
    report = api.encode(model, output, _settings(qp, nonweight_qp, bits, per_channel, lossless, uniform_qp, rdo),
                        _pruning(calibration=calibration, **prune_options), fold_batchnorm=not no_fold_bn,
                        calibration=calibration)
    if as_json:
        _print_json(report.to_dict())
        return
    if report.pruning is not None:
        _echo_pruning(report.pruning, verbose)
    if report.folded_batchnorms:
        click.echo(f"folded {report.folded_batchnorms} BatchNormalization node(s) into the layers before them")
    if verbose:
        for t in report.tensors:
            step = f"step {t.step:.3g}" if t.step is not None else "lossless"
            click.echo(f"  {t.name:<40} {t.role:<9} {str(list(t.shape)):<18} {step:<14} {t.coded_bytes:>10} B")
    click.echo(
        f"{report.input} ({report.format}): {_human(report.original_bytes)} -> {report.output}: "
        f"{_human(report.bitstream_bytes)}, ratio {report.ratio:.2f}x, {report.tensor_count} tensors, "
        f"{report.seconds:.2f} s"
    )


def _echo_pruning(report: PruneReport, verbose: bool) -> None:
    kept = report.parameters_after / report.parameters_before if report.parameters_before else 1.0
    click.echo(
        f"pruned ({report.method}): {report.parameters_before} -> {report.parameters_after} parameters "
        f"({100 * kept:.1f} % kept), {report.zeros_after} zeros"
    )
    if verbose:
        for layer in report.layers:
            click.echo(f"  {layer.name:<40} {layer.before:>8} -> {layer.after}")
    for skipped in report.skipped:
        click.echo(f"  left alone: {skipped}")
    for note in report.notes:
        click.echo(f"  note: {note}")


@main.command()
@click.argument("bitstream", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Model to write; its suffix must fit the stored format.")
@handle_errors
def decode(bitstream: str, output: str) -> None:
    """Rebuild a runnable model from BITSTREAM in the format it came from."""
    report = api.decode(bitstream, output)
    click.echo(
        f"{report.input}: {_human(report.bitstream_bytes)} -> {report.output} ({report.format}): "
        f"{_human(report.output_bytes)}, {report.tensor_count} tensors, {report.seconds:.2f} s"
    )


@main.command()
@click.argument("bitstream", type=click.Path(dir_okay=False))
@click.option("--entropy", is_flag=True,
              help="Also decode every payload and compare the size with its models' entropy plus side information.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@handle_errors
def info(bitstream: str, entropy: bool, as_json: bool) -> None:
    """List the units, tensors, steps and sizes of BITSTREAM."""
    stream = api.info(bitstream, entropy=entropy)
    if as_json:
        _print_json(asdict(stream))
        return
    p = stream.parameters
    click.echo(f"{stream.path}: nnc bitstream {stream.version[0]}.{stream.version[1]}, {_human(stream.size)}")
    click.echo(f"  format {p.get('format')}, {p.get('tensor_count')} tensors, original {_human(p.get('original_bytes', 0))}")
    click.echo(f"  settings {json.dumps(p.get('settings', {}), sort_keys=True)}")
    for unit in stream.units:
        if unit.tensor is None:
            click.echo(f"  @{unit.offset:<8} {unit.type:<14} {unit.size:>10} B")
            continue
        t = unit.tensor
        detail = t.coding if t.step is None else f"step {t.step:.4g}" + (f" (qp {t.qp})" if t.qp is not None else "")
        if t.zero_rows:
            detail += f", {t.zero_rows} zero rows skipped"
        click.echo(
            f"  @{unit.offset:<8} data {t.name:<40} {t.role:<9} {t.dtype:<8} {str(list(t.shape)):<18} "
            f"{unit.size:>10} B  {detail}"
        )
    if stream.entropy is not None:
        click.echo(describe_entropy_report(stream.entropy))


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--nnc", "nnc_path", type=click.Path(dir_okay=False), default=None,
              help="Bitstream of MODEL to measure (default: encode MODEL with the options below).")
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help=".npz with inputs 'x' and optional integer labels 'y'.")
@quantization_options
@pruning_options
@click.option("--no-fold-bn", is_flag=True, help="Keep ONNX BatchNormalization nodes.")
@click.option("--runs", type=click.IntRange(1, 100000), default=50, show_default=True, help="Timed runs per model.")
@click.option("--warmup", type=click.IntRange(0, 10000), default=5, show_default=True, help="Untimed runs first.")
@click.option("--batch-size", type=click.IntRange(1, 65536), default=1, show_default=True, help="Batch for latency.")
@click.option("--threads", type=click.IntRange(1, 256), default=1, show_default=True, help="Inference threads.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@handle_errors
def bench(model: str, nnc_path: str | None, data: str | None, qp: int, nonweight_qp: int | None, bits: int | None,
          per_channel: bool, lossless: bool, uniform_qp: bool, rdo: float, no_fold_bn: bool, runs: int, warmup: int,
          batch_size: int, threads: int, as_json: bool, **prune_options) -> None:
    """Measure size, latency and accuracy (or fidelity) of MODEL against its nnc-coded rebuild."""
    calibration = load_eval_data(prune_options["calib"])[0] if prune_options["calib"] else None
    report = run_bench(model, nnc_path, data, _settings(qp, nonweight_qp, bits, per_channel, lossless, uniform_qp, rdo),
                       runs=runs, warmup=warmup, batch_size=batch_size, threads=threads,
                       pruning=_pruning(calibration=calibration, **prune_options), fold_batchnorm=not no_fold_bn,
                       calibration=calibration)
    if as_json:
        _print_json(report.to_dict())
        return
    click.echo(f"{report.model} ({report.format})")
    click.echo(f"  size        {_human(report.original_bytes)} -> {_human(report.bitstream_bytes)}  (ratio {report.ratio:.2f}x)")
    if report.encode_seconds is not None:
        click.echo(f"  coding      encode {report.encode_seconds:.3f} s, decode {report.decode_seconds:.3f} s")
    if report.weight_snr_db is not None:
        click.echo(f"  weight SNR  {report.weight_snr_db:.1f} dB")
    if report.latency_original and report.latency_rebuilt:
        lo, lr = report.latency_original, report.latency_rebuilt
        click.echo(
            f"  latency     original {lo.median_ms:.3f} ms, rebuilt {lr.median_ms:.3f} ms "
            f"(median of {lo.runs}, batch {lo.batch_size}; p10-p90 {lo.p10_ms:.3f}-{lo.p90_ms:.3f} / "
            f"{lr.p10_ms:.3f}-{lr.p90_ms:.3f} ms)"
        )
    q = report.quality
    if q is not None:
        if q.accuracy_original is not None:
            click.echo(
                f"  accuracy    original {q.accuracy_original:.2f} %, rebuilt {q.accuracy_rebuilt:.2f} % "
                f"({q.accuracy_rebuilt - q.accuracy_original:+.2f} points, {q.samples} samples)"
            )
        if q.top1_agreement is not None:
            click.echo(f"  agreement   {q.top1_agreement:.2f} % top-1")
        click.echo(f"  output SNR  {q.output_snr_db:.1f} dB")
    for note in report.notes:
        click.echo(f"  note: {note}")


def _print_json(data: dict) -> None:
    """Strict JSON for pipelines: infinite SNRs (lossless) become the strings "inf"/"-inf"."""

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    click.echo(json.dumps(clean(data), indent=2, allow_nan=False))


if __name__ == "__main__":
    main()
