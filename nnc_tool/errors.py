"""Errors users see as one line: the file and what is wrong with it."""
from __future__ import annotations

import os


class NncError(Exception):
    """A problem with user input. The CLI prints `str(err)` and exits with `exit_code`."""

    exit_code = 2

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class FormatError(NncError):
    """The input file is not a model we can read, or is damaged."""


class BitstreamError(NncError):
    """The bitstream is damaged, truncated, or of an unknown version."""


class UsageError(NncError):
    """Options that do not fit together or do not fit the input."""


class CheckError(NncError):
    """The encoder's self-check found a decoded model that does not keep the original's outputs."""
