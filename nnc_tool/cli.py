"""The `nnc` command: a thin shell over nnc_tool's Python API."""
from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict
from typing import TYPE_CHECKING

import click

from . import __version__
from .defaults import (
    ALLOCATIONS, CALIBRATION_MODES, DEFAULT_KERNEL_CORRELATION, FULL_CALIBRATION_PARAMETERS, IMPORTANCES,
    MAX_KERNEL_CORRELATION, METHODS, NM_GRANULARITIES, SCOPES,
)
from .errors import NncError, UsageError
from .progress import progress_bar
from .ratecontrol import RateTarget
from .units import format_size, parse_size, parse_sparsities

# Only what every command needs is imported here: `nnc --help`, `nnc info` and `nnc decode` start
# without the encoder's stack (onnxruntime, quantization, pruning), which each command that runs it
# imports itself.
if TYPE_CHECKING:
    from . import api
    from .bench.gates import Gates
    from .bench.runner import BenchReport
    from .bench.sweep import SweepReport
    from .prune import PruneConfig, PruneReport
    from .quantize.uniform import QuantSettings

_human = format_size


class SparsityList(click.ParamType):
    """One sparsity, or (for bench) a comma list such as 0,0.3,0.5 to sweep."""

    name = "sparsity"

    def convert(self, value, param, ctx) -> tuple[float, ...]:
        if isinstance(value, tuple):
            return value
        try:
            return parse_sparsities(str(value))
        except ValueError as err:
            self.fail(str(err), param, ctx)


class ByteSize(click.ParamType):
    name = "size"

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as err:
            self.fail(str(err), param, ctx)


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
        except BrokenPipeError:
            # The reader went away (`nnc info X.nnc | head`): end quietly, as a program killed by
            # SIGPIPE does, and keep the interpreter's final flush from failing again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(128 + signal.SIGPIPE)
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
                     help="Weight QP; the step is 2^(QP/4) (NNCodec's convention). encode without --qp, --bits or a"
                          " rate target also keeps 40 dB output SNR on the self-check's probes, coding finer where"
                          " they need it."),
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
        click.option("--no-error-feedback", is_flag=True,
                     help="Round each weight to nearest instead of compensating rounding errors across input"
                          " channels (GPTQ: on --calib data, else on covariances estimated from BatchNorm statistics)."),
        click.option("--no-bias-correction", is_flag=True,
                     help="Keep biases as they are instead of cancelling the mean output shift of rounded weights"
                          " (estimated from BatchNorm statistics)."),
        click.option("--dq", is_flag=True,
                     help="Dependent (trellis) quantization of weights, as in NNC, instead of kernel feedback: about"
                          " 1 dB more weight SNR at equal entropy, a slower encode."),
        click.option("--kernel-correlation", type=click.FloatRange(0.0, MAX_KERNEL_CORRELATION), default=DEFAULT_KERNEL_CORRELATION,
                     show_default=True, metavar="RHO",
                     help="Round conv kernels tap by tap with error feedback for this assumed correlation of"
                          " neighbouring inputs (0 = round to nearest); --calib's measured feedback replaces it."),
        click.option("--calib-mode", type=click.Choice(CALIBRATION_MODES), default="auto", show_default=True,
                     help="What --calib data does for quantization (ONNX). full: measured tensor sensitivities and GPTQ on"
                          " every layer's input Hessian (smallest, seconds on large models). fast: one pass measuring each"
                          " layer's input channel statistics for error feedback (~0.1 s)."
                          f" auto: full up to {FULL_CALIBRATION_PARAMETERS / 1e6:g} M weights, and beyond while its"
                          " sensitivity runs stay cheap (counted multiply-accumulates)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def pruning_options(command):
    options = [
        click.option("--prune", "prune_method", type=click.Choice(METHODS), default=None,
                     help="Pruning before quantization: single weights, k-out-of-n, whole channels, or whole residual branches."),
        click.option("--sparsity", "sparsities", type=SparsityList(), default="0.5", show_default=True,
                     metavar="F[,F...]",
                     help="Fraction of weights, channels or branches removed, in [0, 1); bench takes a comma list "
                          "(0,0.3,0.5) to sweep, 0 = no pruning."),
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
                     help=".npz with calibration inputs (a few hundred samples), arrays named after the model's inputs"
                          " ('x' for a one-input model), first axis = samples: pruning ranks and refits with it,"
                          " quantization measures tensor sensitivities and compensates rounding errors."),
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


def _pruning(prune_method: str | None, sparsities: tuple[float, ...], scope: str, nm: str, nm_granularity: str, importance: str,
             allocation: str, calib: str | None, no_refit: bool, shapley_permutations: int, seed: int,
             channel_multiple: int, calibration=None) -> PruneConfig | None:
    if prune_method is None:
        return None
    sparsity = sparsities[0]
    try:
        k, n = (int(part) for part in nm.split(":"))
    except ValueError:
        raise UsageError(None, f"--nm expects K:N such as 2:4, got {nm!r}") from None
    from .inputs import read_inputs
    from .prune import PruneConfig

    if calibration is None and calib:
        calibration = read_inputs(calib)
    try:
        return PruneConfig(method=prune_method, sparsity=sparsity, scope=scope, nm=(k, n), nm_granularity=nm_granularity,
                           importance=importance, allocation=allocation, calibration=calibration, refit=not no_refit,
                           shapley_permutations=shapley_permutations, seed=seed, channel_multiple=channel_multiple)
    except ValueError as err:
        raise UsageError(None, str(err)) from None


def _settings(qp: int, nonweight_qp: int | None, bits: int | None, per_channel: bool, lossless: bool,
              uniform_qp: bool = False, rdo: float = 0.0, no_error_feedback: bool = False,
              no_bias_correction: bool = False, dq: bool = False,
              kernel_correlation: float = DEFAULT_KERNEL_CORRELATION, calib_mode: str = "auto") -> QuantSettings:
    from .quantize.uniform import QuantSettings

    return QuantSettings(qp=qp, nonweight_qp=nonweight_qp, bits=bits, per_channel=per_channel, lossless=lossless,
                         allocate=not uniform_qp, rdo=rdo, error_feedback=not no_error_feedback,
                         bias_correction=not no_bias_correction, dependent=dq, kernel_correlation=kernel_correlation,
                         calibration_mode=calib_mode)


def rate_control_options(command):
    options = [
        click.option("--target-size", type=ByteSize(), default=None, metavar="SIZE",
                     help="Rate control: the finest QP whose bitstream fits SIZE (300000, 200KB, 1.5MB, 64KiB)."),
        click.option("--target-ratio", type=click.FloatRange(0.0, min_open=True), default=None, metavar="R",
                     help="Rate control: the finest QP that compresses at least R times."),
        click.option("--target-snr", type=float, default=None, metavar="DB",
                     help="Rate control: the coarsest QP whose output SNR on the --calib inputs is at least DB (ONNX)."),
        click.option("--max-acc-drop", type=click.FloatRange(0.0, 100.0), default=None, metavar="P",
                     help="Rate control: the coarsest QP losing at most P accuracy points on --data (ONNX)."),
        click.option("--data", type=click.Path(dir_okay=False), default=None,
                     help=".npz for --max-acc-drop: inputs named after the model's inputs ('x' for a one-input"
                          " model) and labels 'y'."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _rate_target(target_size: int | None, target_ratio: float | None, target_snr: float | None,
                 max_acc_drop: float | None) -> RateTarget | None:
    given = [v for v in (target_size, target_ratio, target_snr, max_acc_drop) if v is not None]
    if not given:
        return None
    if len(given) > 1:
        raise UsageError(None, "give one of --target-size, --target-ratio, --target-snr, --max-acc-drop")
    return RateTarget(size=target_size, ratio=target_ratio, snr_db=target_snr, max_accuracy_drop=max_acc_drop)


# click >= 8.2 raises this for a group called without a command (older releases print and exit).
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class _OneLineErrors(click.Group):
    """click reports a bad option value or a missing argument with a usage block; scripts and CI
    logs get the same one line (and exit code 2) as every other nnc error instead."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NO_ARGS_IS_HELP as err:  # bare `nnc`: the help text, as click would show it
            click.echo(err.ctx.get_help() if err.ctx is not None else err.format_message(), err=True)
            sys.exit(2)
        except click.UsageError as err:
            command = err.ctx.command_path if err.ctx is not None else "nnc"
            _fail(f"{err.format_message()} (see '{command} --help')", err.exit_code)
        except click.ClickException as err:
            _fail(err.format_message(), err.exit_code)
        except click.exceptions.Abort:
            _fail("interrupted", 130)
        sys.exit(result if isinstance(result, int) else 0)


@click.group(name="nnc", cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nnc")
def main() -> None:
    """Compress neural networks (ONNX, PyTorch, safetensors) into compact NNC-style bitstreams."""
    # SIGTERM (a CI job cancelled, a container stopped) unwinds like Ctrl-C, so temporary
    # outputs are removed instead of left behind half written.
    signal.signal(signal.SIGTERM, _terminate)


def _terminate(signum: int, frame) -> None:
    raise KeyboardInterrupt


def _quiet_and_verbose(quiet: bool, verbose: bool) -> None:
    if quiet and verbose:
        raise UsageError(None, "--quiet and --verbose contradict each other: choose one")


@main.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False), metavar="MODEL...")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Bitstream to write (.nnc), for one MODEL.")
@click.option("-d", "--output-dir", type=click.Path(file_okay=False), default=None,
              help="Directory for any number of MODELs, written as DIR/<name>.nnc (created if missing).")
@click.option("-j", "--jobs", type=click.IntRange(0, 256), default=1, show_default=True,
              help="With -d: encode this many models at once in worker processes (0 = one per CPU).")
@quantization_options
@rate_control_options
@pruning_options
@click.option("--no-fold-bn", is_flag=True, help="Keep ONNX BatchNormalization nodes instead of folding them into the layer before.")
@click.option("--drop-optimizer-state", is_flag=True,
              help="Keep only the model of a training checkpoint: drop optimizer, LR-scheduler and GradScaler state "
                   "(kept exactly otherwise). Models without such state are encoded as they are.")
@click.option("--min-snr", "min_snr", type=float, default=None, metavar="DB",
              help="Self-check: demand at least this output SNR of the decoded model on the probe inputs (--calib, else"
                   " synthesised); tensors are coded finer until it holds, else the encode fails and writes nothing.")
@click.option("--no-check", is_flag=True,
              help="Skip the self-check (by default every ONNX encode runs its decoded model beside the original on"
                   " probe inputs and codes finer the tensors that make it collapse).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (with -d: a list, one entry per MODEL).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary lines (errors and --json still print).")
@click.option("-v", "--verbose", is_flag=True, help="List every tensor.")
@handle_errors
def encode(models: tuple[str, ...], output: str | None, output_dir: str | None, jobs: int, qp: int,
           nonweight_qp: int | None, bits: int | None, per_channel: bool, lossless: bool, uniform_qp: bool, rdo: float,
           no_error_feedback: bool, no_bias_correction: bool, dq: bool, kernel_correlation: float, calib_mode: str,
           target_size: int | None, target_ratio: float | None, target_snr: float | None,
           max_acc_drop: float | None, data: str | None, no_fold_bn: bool, drop_optimizer_state: bool,
           min_snr: float | None, no_check: bool, as_json: bool, quiet: bool, verbose: bool, **prune_options) -> None:
    """Compress MODEL into an nnc bitstream (-o), or many MODELs into a directory (-d).

    With -d, a file that fails is reported (one line on stderr) and skipped, the others are
    still encoded, and the exit code is 2 if any failed.
    """
    from . import api
    from .inputs import read_inputs

    _quiet_and_verbose(quiet, verbose)
    if output is not None and output_dir is not None:
        raise UsageError(None, "-o and -d cannot be used together: -o names one bitstream, -d a directory for many")
    if output is None and output_dir is None:
        raise UsageError(None, "give -o OUT.nnc for one model or -d DIR for any number of models")
    if output is not None and len(models) > 1:
        raise UsageError(None, f"-o names one bitstream but {len(models)} models were given: use -d DIR")
    if len(prune_options["sparsities"]) > 1:
        raise UsageError(None, "--sparsity takes one value when encoding; measure several with nnc bench --sparsity A,B,C")
    target = _rate_target(target_size, target_ratio, target_snr, max_acc_drop)
    if data is not None and max_acc_drop is None:
        raise UsageError(data, "--data is only used by --max-acc-drop when encoding")
    calibration = read_inputs(prune_options["calib"]) if prune_options["calib"] else None
    evaluation = read_inputs(data) if data is not None else None
    settings = _settings(qp, nonweight_qp, bits, per_channel, lossless, uniform_qp, rdo, no_error_feedback,
                         no_bias_correction, dq, kernel_correlation, calib_mode)
    pruning = _pruning(calibration=calibration, **prune_options)
    if no_check and min_snr is not None:
        raise UsageError(None, "--min-snr is measured by the self-check: it does not combine with --no-check")
    check = {"verify": not no_check, "min_snr_db": min_snr, "floor_snr_db": _default_floor(qp_given=_given("qp"),
                                                                                       bits=bits, target=target)}
    if output_dir is not None:
        _encode_batch(models, output_dir, jobs, settings, pruning, not no_fold_bn, calibration, as_json, quiet, verbose,
                      target, evaluation, drop_optimizer_state, check)
        return
    with progress_bar(f"encode {os.path.basename(models[0])}", quiet) as bar:
        report = api.encode(models[0], output, settings, pruning=pruning, fold_batchnorm=not no_fold_bn,
                            calibration=calibration, progress=bar, target=target, evaluation=evaluation,
                            drop_optimizer_state=drop_optimizer_state, **check)
    if as_json:
        _print_json(report.to_dict())
    elif not quiet:
        _echo_encode(report, verbose)


def _encode_batch(models: tuple[str, ...], output_dir: str, jobs: int, settings: QuantSettings,
                  pruning: PruneConfig | None, fold_batchnorm: bool, calibration, as_json: bool, quiet: bool,
                  verbose: bool, target: RateTarget | None = None, evaluation=None,
                  drop_optimizer_state: bool = False, check: dict | None = None) -> None:
    from .batch import encode_many

    started = time.perf_counter()
    jobs = jobs or os.cpu_count() or 1
    with progress_bar("encode", quiet) as bar:
        done = 0

        def on_done(outcome) -> None:
            nonlocal done
            done += 1
            if not outcome.ok:
                bar.echo(f"nnc: error: {outcome.error}", err=True)
            elif not (quiet or as_json):
                bar.echo(_encode_line(outcome.report))
                if verbose:
                    _echo_encode_details(outcome.report, bar.echo)
                elif outcome.report.rate_control is not None:
                    rate = outcome.report.rate_control
                    bar.echo(f"  rate control ({rate.target}): QP {rate.chosen_qp}, {rate.achieved}")
            bar(done, len(models))

        result = encode_many(models, output_dir, settings, pruning, fold_batchnorm, calibration, jobs, on_done,
                             target=target, evaluation=evaluation, drop_optimizer_state=drop_optimizer_state,
                             **(check or {}))
    if as_json:
        _print_json([o.to_dict() for o in result.outcomes])
    elif not quiet:
        reports = [o.report for o in result.outcomes if o.ok]
        original = sum(r.original_bytes for r in reports)
        coded = sum(r.bitstream_bytes for r in reports)
        ratio = f", ratio {original / coded:.2f}x" if coded else ""
        failed = f", {len(result.failed)} failed" if result.failed else ""
        click.echo(f"encoded {len(reports)} of {len(models)} models: {_human(original)} -> {_human(coded)}{ratio}"
                   f"{failed}, {time.perf_counter() - started:.2f} s")
    if result.exit_code:
        sys.exit(result.exit_code)


def _encode_line(report: api.EncodeReport) -> str:
    return (
        f"{report.input} ({report.format}): {_human(report.original_bytes)} -> {report.output}: "
        f"{_human(report.bitstream_bytes)}, ratio {report.ratio:.2f}x, {report.tensor_count} tensors, "
        f"{report.seconds:.2f} s"
    )


def _echo_encode_details(report: api.EncodeReport, echo=click.echo, verbose: bool = True) -> None:
    if report.pruning is not None:
        _echo_pruning(report.pruning, verbose, echo)
    for line in _optimizer_state_lines(report):
        echo(line)
    if report.folded_batchnorms:
        echo(f"folded {report.folded_batchnorms} BatchNormalization node(s) into the layers before them")
    if report.calibration_mode == "fast":
        echo("calibration: fast, one pass measured every layer's input statistics"
             " (--calib-mode full also measures sensitivities and layer Hessians: smaller, slower)")
    elif report.calibration_mode == "full":
        echo("calibration: full, measured tensor sensitivities and layer Hessians")
    if report.feedback_layers:
        echo(f"error feedback: {report.feedback_layers} layer(s) rounded with GPTQ for their input statistics")
    if report.corrected_biases:
        echo(f"bias correction: {report.corrected_biases} layer(s) absorb the mean shift of their rounded weights")
    for line in _check_lines(report.check, verbose):
        echo(line)
    rate = report.rate_control
    if rate is not None:
        echo(f"rate control ({rate.target}): QP {rate.chosen_qp} after {len(rate.trials)} trial encodes, {rate.achieved}")
        if verbose:
            for trial in rate.trials:
                quality = "".join(
                    f", {label} {value:.2f}" for label, value in (("SNR dB", trial.snr_db), ("accuracy %", trial.accuracy))
                    if value is not None
                )
                echo(f"  qp {trial.qp:4d}: {trial.bitstream_bytes:>10} B{quality}")
    if verbose:
        for t in report.tensors:
            step = f"step {t.step:.3g}" if t.step is not None else "lossless"
            echo(f"  {t.name:<40} {t.role:<9} {str(list(t.shape)):<18} {step:<14} {t.coded_bytes:>10} B{_reason(t)}")


def _given(parameter: str) -> bool:
    """Whether the user set this option (on the command line or through the environment)."""
    source = click.get_current_context().get_parameter_source(parameter)
    return source not in (None, click.core.ParameterSource.DEFAULT)


def _default_floor(qp_given: bool, bits: int | None, target) -> float | None:
    """The fidelity a plain `nnc encode MODEL` keeps (verify.DEFAULT_FLOOR_DB): a --qp, --bits or
    rate target the user chose is what they get (the check still repairs collapses)."""
    from .verify import DEFAULT_FLOOR_DB

    return None if qp_given or bits is not None or target is not None else DEFAULT_FLOOR_DB


def _reason(tensor: api.TensorReport) -> str:
    """The tensor's role reason as the listings end their row with it."""
    return f"  [{tensor.reason}]" if tensor.reason else ""


def _check_lines(check, verbose: bool) -> list[str]:
    if check is None:
        return []
    if check.skipped:
        return [f"self-check: not run, {check.skipped}"]
    agreement = f", top-1 agreement {check.top1_agreement:.1f} %" if check.top1_agreement is not None else ""
    lines = [f"self-check: output SNR {check.output_snr_db:.1f} dB on {check.samples} {check.probes} inputs"
             f" (steps predict {check.predicted_snr_db:.1f} dB){agreement}"]
    if not check.passed:
        lines.append(f"self-check: warning: after the repair, {check.shortfall or 'the check still fails'};"
                     " a finer --qp or --calib may help")
    if check.refined:
        lines.append(f"self-check: {len(check.refined)} tensor(s) coded finer in {check.rounds} re-encode(s) to keep the outputs")
        shown = check.refined if verbose else check.refined[:5]
        lines += [f"  {line}" for line in shown]
        if len(shown) < len(check.refined):
            lines.append(f"  ... {len(check.refined) - len(shown)} more (-v lists them)")
    return lines


def _optimizer_state_lines(report: api.EncodeReport) -> list[str]:
    if report.dropped_optimizer_tensors == 0:
        return ["--drop-optimizer-state: the model holds no optimizer state, nothing to drop"]
    if report.dropped_optimizer_tensors:
        return [f"dropped optimizer state: {report.dropped_optimizer_tensors} tensor(s); the decoded checkpoint holds the model"]
    if report.optimizer_state_tensors:
        return [f"optimizer state: {_human(report.optimizer_state_bytes)} of the {_human(report.bitstream_bytes)} bitstream "
                f"({report.optimizer_state_tensors} tensors, kept exactly); --drop-optimizer-state keeps only the model"]
    return []


def _echo_encode(report: api.EncodeReport, verbose: bool) -> None:
    _echo_encode_details(report, click.echo, verbose)
    click.echo(_encode_line(report))


def _echo_pruning(report: PruneReport, verbose: bool, echo=click.echo) -> None:
    kept = report.parameters_after / report.parameters_before if report.parameters_before else 1.0
    echo(
        f"pruned ({report.method}): {report.parameters_before} -> {report.parameters_after} parameters "
        f"({100 * kept:.1f} % kept), {report.zeros_after} zeros"
    )
    if verbose:
        for layer in report.layers:
            echo(f"  {layer.name:<40} {layer.before:>8} -> {layer.after}")
    for skipped in report.skipped:
        echo(f"  left alone: {skipped}")
    for note in report.notes:
        echo(f"  note: {note}")


@main.command()
@click.argument("bitstream", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Model to write; its suffix must fit the stored format.")
@click.option("-q", "--quiet", is_flag=True, help="No summary line (errors still print).")
@handle_errors
def decode(bitstream: str, output: str, quiet: bool) -> None:
    """Rebuild a runnable model from BITSTREAM in the format it came from."""
    from .decoder import decode as decode_bitstream

    report = decode_bitstream(bitstream, output)
    if quiet:
        return
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
    """List the units, tensors, steps and sizes of BITSTREAM, and why each tensor has its role."""
    from .decoder import info as describe_bitstream

    stream = describe_bitstream(bitstream, entropy=entropy)
    if as_json:
        _print_json(asdict(stream))
        return
    p = stream.parameters
    click.echo(f"{stream.path}: nnc bitstream {stream.version[0]}.{stream.version[1]}, {_human(stream.size)}")
    click.echo(f"  format {p.get('format')}, {p.get('tensor_count')} tensors, original {_human(p.get('original_bytes', 0))}")
    click.echo(f"  settings {json.dumps(p.get('settings', {}), sort_keys=True)}")
    for unit in stream.units:
        if unit.tensor is None:
            packed = f"  {len(unit.packed)} tensors" if unit.packed else ""
            click.echo(f"  @{unit.offset:<8} {unit.type:<14} {unit.size:>10} B{packed}")
            for t in unit.packed:
                click.echo(f"  {'':<9} packed {t.name:<38} {t.role:<9} {t.dtype:<8} {str(list(t.shape)):<18} "
                           f"{'packed':>12}{_reason(t)}")
            continue
        t = unit.tensor
        detail = t.coding if t.step is None else f"step {t.step:.4g}" + (f" (qp {t.qp})" if t.qp is not None else "")
        if t.zero_rows:
            detail += f", {t.zero_rows} zero rows skipped"
        click.echo(
            f"  @{unit.offset:<8} data {t.name:<40} {t.role:<9} {t.dtype:<8} {str(list(t.shape)):<18} "
            f"{unit.size:>10} B  {detail}{_reason(t)}"
        )
    if stream.entropy is not None:
        from .coding.report import describe_entropy_report

        click.echo(describe_entropy_report(stream.entropy))



@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--nnc", "nnc_path", type=click.Path(dir_okay=False), default=None,
              help="Bitstream of MODEL to measure (default: encode MODEL with the options below).")
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help=".npz with inputs named after the model's inputs ('x' for a one-input model), first axis ="
                   " samples, and optional integer labels 'y' (default: probe inputs synthesised from the graph).")
@quantization_options
@pruning_options
@click.option("--no-fold-bn", is_flag=True, help="Keep ONNX BatchNormalization nodes.")
@click.option("--sweep", "sweep_spec", default=None, metavar="qp=START:STOP:STEP|qp=A,B,C",
              help="Encode, decode and measure MODEL at every QP (STOP included), crossed with every --sparsity; "
                   "prints a table.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, metavar="FILE.png",
              help="With a sweep: draw rate vs quality and latencies to FILE (.png, .svg or .pdf; needs matplotlib).")
@click.option("--runs", type=click.IntRange(1, 100000), default=50, show_default=True, help="Timed runs per model.")
@click.option("--warmup", type=click.IntRange(0, 10000), default=5, show_default=True, help="Untimed runs first.")
@click.option("--batch-size", type=click.IntRange(1, 65536), default=1, show_default=True, help="Batch for latency.")
@click.option("--threads", type=click.IntRange(1, 256), default=1, show_default=True, help="Inference threads.")
@click.option("--fail-below-accuracy", type=click.FloatRange(0.0, 100.0), default=None, metavar="PERCENT",
              help="Gate: exit 1 if the rebuilt model's top-1 accuracy on --data (with labels) is below PERCENT.")
@click.option("--fail-above-size", type=ByteSize(), default=None, metavar="SIZE",
              help="Gate: exit 1 if the bitstream is larger than SIZE (300000, 200KB, 1.5MB, 64KiB).")
@click.option("--fail-above-latency-ratio", type=click.FloatRange(0.0, min_open=True), default=None, metavar="R",
              help="Gate: exit 1 if rebuilt / original median latency exceeds R.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("-q", "--quiet", is_flag=True,
              help="No progress bar and no report text: only errors, gate failures and --json.")
@click.option("-v", "--verbose", is_flag=True, help="With a sweep: add a weight-SNR column and list every point's notes.")
@handle_errors
def bench(model: str, nnc_path: str | None, data: str | None, qp: int, nonweight_qp: int | None, bits: int | None,
          per_channel: bool, lossless: bool, uniform_qp: bool, rdo: float, no_error_feedback: bool,
          no_bias_correction: bool, dq: bool, kernel_correlation: float, calib_mode: str, no_fold_bn: bool,
          sweep_spec: str | None,
          plot_path: str | None, runs: int, warmup: int, batch_size: int, threads: int,
          fail_below_accuracy: float | None, fail_above_size: int | None, fail_above_latency_ratio: float | None,
          as_json: bool, quiet: bool, verbose: bool, **prune_options) -> None:
    """Measure size, latency and accuracy (or fidelity) of MODEL against its nnc-coded rebuild.

    With --sweep (or several --sparsity values), measure every combination against one
    measurement of the original. Gates (--fail-*) make the command exit 1 with a one-line
    reason after the report; with a sweep, every point must pass.
    """
    from .bench import bench as run_bench
    from .bench.gates import Gates, check_report  # noqa: F811 - the type hints' name, at run time
    from .bench.sweep import parse_sweep
    from .inputs import read_inputs

    _quiet_and_verbose(quiet, verbose)
    gates = Gates(fail_below_accuracy, fail_above_size, fail_above_latency_ratio)
    if fail_below_accuracy is not None:
        if data is None:
            raise UsageError(None, "--fail-below-accuracy needs --data with labels 'y'")
        if read_inputs(data).labels is None:
            raise UsageError(data, "--fail-below-accuracy needs labels 'y' in the data file")
    sparsities = prune_options["sparsities"]
    method = prune_options["prune_method"]
    if len(sparsities) > 1 and method is None:
        raise UsageError(None, "several --sparsity values need a pruning method (--prune KIND)")
    if len(sparsities) > 1 and method == "nm":
        raise UsageError(None, "--prune nm is set by --nm K:N, not by --sparsity: sweep structured, unstructured or depth")
    sweeping = sweep_spec is not None or len(sparsities) > 1
    if sweeping and nnc_path is not None:
        raise UsageError(None, "--nnc measures one bitstream; a sweep encodes its own")
    if plot_path is not None:
        if not sweeping:
            raise UsageError(None, "--plot draws a sweep: add --sweep qp=START:STOP:STEP or several --sparsity values")
        from .bench.plot import check_plot_target

        check_plot_target(plot_path)  # before the sweep, not after minutes of work
    calibration = read_inputs(prune_options["calib"]) if prune_options["calib"] else None
    settings = _settings(qp, nonweight_qp, bits, per_channel, lossless, uniform_qp, rdo, no_error_feedback,
                         no_bias_correction, dq, kernel_correlation, calib_mode)
    pruning = _pruning(calibration=calibration, **prune_options)
    if sweeping:
        qps = parse_sweep(sweep_spec).values if sweep_spec is not None else (qp,)
        _bench_sweep(model, qps, sparsities if method is not None else (0.0,), settings, pruning, data, runs, warmup,
                     batch_size, threads, not no_fold_bn, calibration, gates, plot_path, as_json, quiet, verbose)
        return
    with progress_bar("encode", quiet) as bar:
        report = run_bench(model, nnc_path, data, settings, runs=runs, warmup=warmup, batch_size=batch_size,
                           threads=threads, pruning=pruning, fold_batchnorm=not no_fold_bn, calibration=calibration,
                           progress=bar)
    failures = check_report(report, gates) if gates.active else []
    if as_json:
        _print_json(_with_gates(report.to_dict(), gates, failures))
    elif not quiet:
        _echo_bench(report)
    _exit_on_gates(failures)


def _bench_sweep(model: str, qps: tuple[int, ...], sparsities: tuple[float, ...], settings: QuantSettings,
                 pruning: PruneConfig | None, data: str | None, runs: int, warmup: int, batch_size: int, threads: int,
                 fold_batchnorm: bool, calibration, gates: Gates, plot_path: str | None, as_json: bool, quiet: bool,
                 verbose: bool) -> None:
    from .bench.gates import check_sweep, summarize
    from .bench.sweep import sweep

    with progress_bar(f"sweep {os.path.basename(model)}", quiet) as bar:
        report = sweep(model, qps, sparsities, settings, pruning, data, runs=runs, warmup=warmup,
                       batch_size=batch_size, threads=threads, fold_batchnorm=fold_batchnorm, calibration=calibration,
                       progress=bar)
    failures = check_sweep(report, gates) if gates.active else []
    if plot_path is not None:
        from .bench.plot import plot_sweep

        plot_sweep(report, plot_path)
    if as_json:
        _print_json(_with_gates(report.to_dict(), gates, failures))
    elif not quiet:
        _echo_sweep(report, verbose)
        if plot_path is not None:
            click.echo(f"plot written to {plot_path}")
    if failures:
        failures = [f"{len(failures)} of {len(report.points)} points fail: {summarize(failures)}"]
    _exit_on_gates(failures)


def _with_gates(data: dict, gates: Gates, failures: list[str]) -> dict:
    if gates.active:
        data["gates"] = {"passed": not failures, "failures": failures}
    return data


def _exit_on_gates(failures: list[str]) -> None:
    if failures:
        from .bench.gates import summarize

        click.echo(f"nnc: gate failed: {summarize(failures)}", err=True)
        sys.exit(1)


def _echo_bench(report: BenchReport) -> None:
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


def _echo_sweep(report: SweepReport, verbose: bool) -> None:
    """A fixed-width table, one row per point, after a line describing the original."""
    head = f"{report.model} ({report.format}): {_human(report.original_bytes)}"
    if report.accuracy_original is not None:
        head += f", accuracy {report.accuracy_original:.2f} % on {report.samples} samples"
    lo = report.latency_original
    if lo is not None:
        head += (f", latency {lo.median_ms:.3f} ms (p10-p90 {lo.p10_ms:.3f}-{lo.p90_ms:.3f}, "
                 f"median of {lo.runs}, batch {lo.batch_size})")
    click.echo(head)
    pruned = report.prune_method is not None
    quality = any(p.bench.quality is not None for p in report.points)
    columns = [("qp", 5)] + ([("sparsity", 8)] if pruned else []) + [
        ("bitstream", 11), ("ratio", 7), ("enc s", 6), ("dec s", 6)]
    if lo is not None:
        columns += [("lat ms", 8), ("p10-p90 ms", 13), ("x orig", 6)]
    if quality:
        columns += ([("acc %", 7)] if report.labelled else []) + [("agree %", 7), ("SNR dB", 7)]
    if verbose or not quality:
        columns += [("w SNR dB", 8)]
    click.echo("  ".join(f"{name:>{width}}" for name, width in columns))
    for point in report.points:
        b, q, lat = point.bench, point.bench.quality, point.bench.latency_rebuilt
        cells = [f"{point.qp}"] + ([f"{point.sparsity:g}"] if pruned else []) + [
            _human(b.bitstream_bytes), f"{b.ratio:.2f}x", f"{b.encode_seconds:.2f}", f"{b.decode_seconds:.2f}"]
        if lo is not None:
            cells += [f"{lat.median_ms:.3f}", f"{lat.p10_ms:.3f}-{lat.p90_ms:.3f}", f"{point.latency_ratio:.2f}"]
        if quality:
            cells += ([f"{q.accuracy_rebuilt:.2f}"] if report.labelled else []) + [
                _number(q.top1_agreement, ".2f"), _number(q.output_snr_db, ".1f")]
        if verbose or not quality:
            cells += [_number(b.weight_snr_db, ".1f")]
        click.echo("  ".join(f"{cell:>{width}}" for cell, (_, width) in zip(cells, columns)))
    for note in report.notes:
        click.echo(f"note: {note}")
    seen = set()
    for point in report.points:
        for note in point.bench.notes:
            key = note if not verbose else (point.qp, point.sparsity, note)
            if key not in seen:
                seen.add(key)
                where = f"qp {point.qp}, sparsity {point.sparsity:g}" if verbose else (
                    f"sparsity {point.sparsity:g}" if pruned else f"qp {point.qp}")
                click.echo(f"note: {where}: {note}")


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _print_json(data: dict | list) -> None:
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
