"""Encode many models into one directory, in parallel processes, without one bad file stopping the rest.

    result = encode_many(["a.onnx", "b.pt"], "out/", EncodeOptions(qp=-36), jobs=4)
    for outcome in result.outcomes:
        print(outcome.input, outcome.report or outcome.error)

Every file is one `api.encode` call. Failures come back as text (an NncError does not survive
pickling: its constructor takes two arguments but pickle replays only the message), so the
batch reports each and carries on. Interrupting (SIGINT, SIGTERM) stops the workers, which
unwind like the single-file CLI: outputs are written through a temporary file, so none is
left half written.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import api
from .errors import NncError, UsageError
from .inputs import ModelInputs


@dataclass
class Outcome:
    """One file of a batch: its report, or the one-line error (`FILE: problem`) and exit code."""

    input: str
    output: str
    report: api.EncodeReport | None = None
    error: str | None = None
    exit_code: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        if self.report is not None:
            return self.report.to_dict()
        return {"input": self.input, "output": self.output, "error": self.error}


@dataclass
class BatchResult:
    outcomes: list[Outcome]  # in the order of the inputs

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def exit_code(self) -> int:
        """0 when every file was encoded; else the most serious failure's (2 = bad input)."""
        return max((o.exit_code for o in self.failed), default=0)


def output_paths(inputs: Sequence[str | os.PathLike], output_dir: str | os.PathLike) -> list[Path]:
    """OUTDIR/<stem>.nnc for every input; UsageError when two inputs would write the same file.

    Names are compared case-insensitively: on macOS and Windows `Net.onnx` and `net.pt` would
    overwrite each other.
    """
    outputs = [Path(output_dir) / f"{Path(p).stem}.nnc" for p in inputs]
    seen: dict[str, int] = {}
    for index, output in enumerate(outputs):
        key = output.name.casefold()
        if key in seen:
            first = inputs[seen[key]]
            raise UsageError(
                None, f"{first} and {inputs[index]} would both be written to {output}: rename one or encode them separately"
            )
        seen[key] = index
    return outputs


Job = Callable[..., Outcome]


def encode_one(
    model_path: str,
    output_path: str,
    options: api.EncodeOptions | None = None,
    pruning=None,
    fold_batchnorm: bool = True,
    calibration: ModelInputs | np.ndarray | None = None,
    progress: api.Progress | None = None,
    target: api.RateTarget | None = None,
    evaluation: ModelInputs | tuple[np.ndarray, np.ndarray] | None = None,
    drop_optimizer_state: bool = False,
    verify: bool = True,
    min_snr_db: float | None = None,
    floor_snr_db: float | None = None,
) -> Outcome:
    """Encode one file; every failure but an interrupt becomes the Outcome's error text."""
    try:
        report = api.encode(model_path, output_path, options, pruning=pruning, fold_batchnorm=fold_batchnorm,
                            calibration=calibration, progress=progress, target=target, evaluation=evaluation,
                            drop_optimizer_state=drop_optimizer_state, verify=verify, min_snr_db=min_snr_db,
                            floor_snr_db=floor_snr_db)
    except NncError as err:
        # Name the model first when the error is about another file (e.g. calibration data that
        # does not fit this model's inputs): in a batch it tells which model failed.
        if err.path is None:
            message = f"{model_path}: {err.problem}"
        elif err.path in (model_path, output_path):
            message = str(err)
        else:
            message = f"{model_path}: {err}"
        return Outcome(model_path, output_path, error=message, exit_code=err.exit_code)
    except OSError as err:
        return Outcome(model_path, output_path, error=f"{err.filename or model_path}: {err.strerror or err}", exit_code=2)
    except Exception as err:  # noqa: BLE001 - one broken file must not end the batch
        return Outcome(model_path, output_path, error=f"{model_path}: internal error: {type(err).__name__}: {err}",
                       exit_code=1)
    return Outcome(model_path, output_path, report=report)


def encode_many(
    inputs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    options: api.EncodeOptions | None = None,
    pruning=None,
    fold_batchnorm: bool = True,
    calibration: ModelInputs | np.ndarray | None = None,
    jobs: int = 1,
    on_done: Callable[[Outcome], None] | None = None,
    job: Job = encode_one,
    target: api.RateTarget | None = None,
    evaluation: ModelInputs | tuple[np.ndarray, np.ndarray] | None = None,
    drop_optimizer_state: bool = False,
    verify: bool = True,
    min_snr_db: float | None = None,
    floor_snr_db: float | None = None,
) -> BatchResult:
    """Encode every input to OUTDIR/<stem>.nnc, `jobs` at a time in worker processes.

    `target` (rate control) is met by each model on its own, e.g. every bitstream within a size.

    `on_done(outcome)` is called in this process as each file finishes (in completion order);
    the result lists outcomes in input order. `job` must be a module-level function with
    `encode_one`'s signature (it is pickled by name to the workers).
    """
    inputs = [os.fspath(p) for p in inputs]
    outputs = [os.fspath(p) for p in output_paths(inputs, output_dir)]
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    # The progress slot stays empty: a worker's progress cannot reach this process.
    arguments = [
        (i, o, options, pruning, fold_batchnorm, calibration, None, target, evaluation, drop_optimizer_state, verify,
         min_snr_db, floor_snr_db)
        for i, o in zip(inputs, outputs)
    ]
    results: dict[int, Outcome] = {}

    def finish(index: int, outcome: Outcome) -> None:
        results[index] = outcome
        if on_done is not None:
            on_done(outcome)

    jobs = max(1, min(jobs, len(inputs)))
    if jobs == 1:
        for index, args in enumerate(arguments):
            finish(index, job(*args))
    else:
        _run_in_pool(arguments, jobs, job, finish)
    return BatchResult([results[i] for i in range(len(inputs))])


def _run_in_pool(arguments: list[tuple], jobs: int, job: Job, finish: Callable[[int, Outcome], None]) -> None:
    pending = list(range(len(arguments)))
    isolate = False
    while pending:
        # After a worker process died (a crash, the OOM killer), nobody knows which of the files
        # in flight killed it: the rest are retried one per fresh process, so only that file fails.
        batches = [[i] for i in pending] if isolate else [pending]
        pending = []
        for batch in batches:
            died = _run_batch(arguments, batch, 1 if isolate else jobs, job, finish)
            if isolate:
                for index in died:
                    finish(index, Outcome(arguments[index][0], arguments[index][1],
                                          error=f"{arguments[index][0]}: the worker process encoding it died", exit_code=1))
            else:
                pending = died
        isolate = True


def _run_batch(arguments: list[tuple], indices: list[int], jobs: int, job: Job,
               finish: Callable[[int, Outcome], None]) -> list[int]:
    """Run `indices` in a fresh pool; return those that did not finish because a worker died."""
    # spawn, not fork: a fork of a process that has started torch's or onnxruntime's thread pools
    # can deadlock in the child.
    context = multiprocessing.get_context("spawn")
    executor = concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_worker_init)
    futures: dict[concurrent.futures.Future, int] = {}
    try:
        # Workers are started by submit(). They must ignore SIGINT from birth (it is inherited
        # through exec), or a Ctrl-C while they import would print their tracebacks; this process
        # forwards interrupts to them as SIGTERM instead. A Ctrl-C in this short window is lost.
        with _sigint_ignored():
            for index in indices:
                futures[executor.submit(_guarded, job, *arguments[index])] = index
        died = []
        for future in concurrent.futures.as_completed(futures):
            index = futures[future]
            try:
                finish(index, future.result())
            except BrokenProcessPool:
                died.append(index)
        return died
    except BaseException:
        _stop_workers(executor)
        raise
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop_workers(executor: concurrent.futures.ProcessPoolExecutor) -> None:
    # The executor has no public way to interrupt running calls; its worker table is the only
    # handle on the processes (stable since Python 3.2).
    for process in list(getattr(executor, "_processes", {}).values()):
        if process.is_alive():
            try:
                os.kill(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


_busy = False
_stopping = False


def _worker_init() -> None:
    global _busy, _stopping
    _busy = _stopping = False
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_terminate)


def _worker_terminate(signum: int, frame) -> None:
    global _stopping
    _stopping = True
    if _busy:
        # Unwinds the encode like Ctrl-C does in the CLI: the temporary output is removed.
        raise KeyboardInterrupt


def _guarded(job: Job, *args) -> Outcome:
    """Run `job` in a worker, marking it busy so that SIGTERM interrupts it (and only it)."""
    global _busy
    if _stopping:
        return Outcome(args[0], args[1], error=f"{args[0]}: interrupted", exit_code=130)
    _busy = True
    try:
        return job(*args)
    finally:
        _busy = False
