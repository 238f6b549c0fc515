"""Threads for work that releases the GIL (zstd, numpy, onnxruntime): one pool per level.

Each level has its own pool: tensors of a model coded side by side ("tensors"), the chunks inside
one tensor (coding/float_groups.py, "chunks"), the self-check's model runs ("checks"). A tensor job
waits for its chunks, so they must not queue behind it in the same pool. Results come back in
input order and the bytes never depend on the number of threads.
"""
from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

WORKERS = max(1, os.cpu_count() or 1)
_pools: dict[str, ThreadPoolExecutor] = {}


def pool(level: str) -> ThreadPoolExecutor:
    """The process-wide pool of one level ("tensors", "chunks", "checks"), made on first use."""
    if level not in _pools:
        _pools[level] = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix=f"nnc-{level}")
    return _pools[level]


def ordered_map(function: Callable[[T], R], items: Iterable[T], level: str | None, ahead: int = WORKERS) -> Iterator[R]:
    """`function` over `items` on the level's pool, at most `ahead` in flight (memory stays near
    that many results), yielded in input order. With one worker or no level, everything runs on
    the caller."""
    if WORKERS == 1 or level is None:
        yield from map(function, items)
        return
    executor = pool(level)
    pending: deque[Future] = deque()
    for item in items:
        pending.append(executor.submit(function, item))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
