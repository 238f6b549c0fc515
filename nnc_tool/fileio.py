"""Writing outputs so that nothing is ever left half written."""
from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temporary file lives in the destination directory so the final rename is atomic on
    the same file system. On any exception (including KeyboardInterrupt) it is removed.
    """
    final = Path(path)
    directory = final.parent if str(final.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates owner-only files; give the output the permissions a plain open() would.
    os.chmod(tmp, 0o666 & ~_current_umask())
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when both paths name the same existing file (guards against overwriting the input)."""
    try:
        return os.path.samefile(a, b)
    except FileNotFoundError:
        return False


def map_file(path: str | os.PathLike) -> mmap.mmap:
    """The whole file mapped read-only; arrays viewing it load pages on demand.

    Large external weight files are read through such a mapping so a model is never held in
    memory twice; `release_pages` lets the pipeline drop a tensor's pages once it is coded.
    """
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return mmap.mmap(-1, 1)  # an empty file cannot be mapped; nothing will be read from it
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)


def release_pages(array: np.ndarray) -> None:
    """Drop the resident pages of an array that views a read-only file mapping (a no-op otherwise).

    Pages of a mapped file count towards the process's resident memory once touched; after a
    tensor has been coded nothing reads it again, and the kernel reloads the pages should anything
    do so. Only whole pages inside the array's own range are dropped.
    """
    base = array
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    if not isinstance(base, mmap.mmap) or not hasattr(base, "madvise") or array.size == 0:
        return
    start = array.__array_interface__["data"][0] - np.frombuffer(base, dtype=np.uint8, count=1).__array_interface__["data"][0]
    end = start + array.nbytes
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if first < last:
        base.madvise(mmap.MADV_DONTNEED, first, last - first)
