"""A progress bar on stderr for long work, drawn only for a person watching a terminal.

Pipelines and log files get nothing: the bar is off when stderr is not a TTY or with --quiet,
so captured output stays exactly the report and the error lines.
"""
from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

import click


class ProgressBar:
    """`bar(done, total)` redraws one `\\r`-rewritten line; fits `api.encode(progress=...)`.

    Nothing is drawn until `delay` seconds have passed, so work that finishes quickly does
    not flash a bar. Use as a context manager: leaving it (also by an exception or Ctrl-C)
    erases the bar, so the next line (a report, an error) starts on a clean line.
    """

    def __init__(self, label: str, enabled: bool = True, stream: TextIO | None = None, delay: float = 0.25,
                 interval: float = 0.1) -> None:
        self.label = label
        self.enabled = enabled
        self._stream = stream
        self._delay = delay
        self._interval = interval
        self._started = time.monotonic()
        self._last_draw = -float("inf")
        self._drawn_width = 0
        self._state: tuple[int, int] | None = None

    @property
    def stream(self) -> TextIO:
        # Looked up when used, not when created, so a redirected sys.stderr (tests) is honoured.
        return self._stream if self._stream is not None else sys.stderr

    def __call__(self, done: int, total: int) -> None:
        self._state = (done, total)
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._started < self._delay:
            return
        if done < total and now - self._last_draw < self._interval:
            return
        self._draw(now)

    def _draw(self, now: float) -> None:
        if self._state is None:
            return
        done, total = self._state
        columns = max(shutil.get_terminal_size(fallback=(80, 24)).columns - 1, 20)
        elapsed = _clock(now - self._started)
        if total > 0:
            counter = f" {done}/{total} {100 * done // total:3d}% {elapsed}"
            width = max(min(40, columns - len(self.label) - len(counter) - 3), 5)
            filled = width * done // total
            line = f"{self.label} [{'#' * filled}{'.' * (width - filled)}]{counter}"
        else:
            line = f"{self.label} {done} {elapsed}"
        line = line[:columns]
        padding = " " * max(self._drawn_width - len(line), 0)
        # Recorded before writing: an interrupt that lands right after the write must still
        # find the bar to erase.
        self._drawn_width = len(line) + len(padding)
        self._last_draw = now
        self.stream.write("\r" + line + padding)
        self.stream.flush()

    def clear(self) -> None:
        """Erase the bar (it is drawn again by the next update)."""
        if self._drawn_width:
            self.stream.write("\r" + " " * self._drawn_width + "\r")
            self.stream.flush()
            self._drawn_width = 0

    def echo(self, message: str, err: bool = False) -> None:
        """Print a line (to stdout, or stderr with `err`) without mangling the bar."""
        was_drawn = self._drawn_width > 0
        self.clear()
        click.echo(message, err=err)
        if was_drawn:
            self._draw(time.monotonic())

    def close(self) -> None:
        self.clear()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}:{seconds:02d}"


def progress_bar(label: str, quiet: bool = False, stream: TextIO | None = None, delay: float = 0.25) -> ProgressBar:
    """A bar that draws only when stderr (or `stream`) is a terminal and `quiet` is off."""
    target = stream if stream is not None else sys.stderr
    enabled = not quiet and _isatty(target)
    return ProgressBar(label, enabled=enabled, stream=stream, delay=delay)


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False
