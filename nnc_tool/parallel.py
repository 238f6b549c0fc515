"""Threads for coding work that releases the GIL (zlib, numpy, onnxruntime): one pool per level.

Two levels, two pools: tensors of a model are coded side by side (`ordered_map` over
TENSOR_POOL), and inside one tensor its chunks (coding/float_groups.py over CHUNK_POOL). A tensor
job waits for its chunks, so they must not queue behind it in the same pool. Results come back in
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
    """The process-wide pool of one level ("tensors" or "chunks"), made on first use."""
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
