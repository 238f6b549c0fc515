"""Run torch on one intra-op thread for the duration of a block.

Recurrent models step through time with small matrix products; on this 2-core machine, beside any
other job, a second torch thread only adds contention (measured 4x to 25x slower for the LSTMs here).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def single_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
