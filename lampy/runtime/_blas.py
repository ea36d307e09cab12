"""One BLAS thread for work the caller runs itself while workers are about to start.

OpenBLAS threads busy-wait for a while after a multi-threaded call. After the auto probe (a few
rows run in the caller) they kept one of this machine's two cores from the worker processes that
start right then: `chunks="auto"` reached only 1.3-1.5x numpy on bench_core's compute-heavy
region against 2.0x with OPENBLAS_NUM_THREADS=1. Workers run one BLAS thread each, so a
one-thread probe also times a chunk the way the workers will run it.

OpenBLAS >= 0.3.27 (numpy's wheels) has a per-thread setting, which leaves other threads of the
caller alone; without it (another BLAS, another platform) this does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

SetThreads = Callable[[int], int]


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the block with one BLAS thread in this thread; the previous count comes back after."""
    setters = _local_setters()
    previous = [setter(1) for setter in setters]
    try:
        yield
    finally:
        for setter, count in zip(setters, previous, strict=True):
            setter(count)


@functools.cache
def _local_setters() -> tuple[SetThreads, ...]:
    """`openblas_set_num_threads_local` of every OpenBLAS loaded in this process."""
    setters = []
    for path in _loaded_libraries():
        if "openblas" in os.path.basename(path).lower():
            try:
                function = ctypes.CDLL(path).openblas_set_num_threads_local
            except (OSError, AttributeError):  # an older OpenBLAS: no per-thread setting
                continue
            function.argtypes, function.restype = [ctypes.c_int], ctypes.c_int
            setters.append(function)
    return tuple(setters)


def _loaded_libraries() -> list[str]:
    """Shared libraries mapped into this process (Linux; elsewhere none are found)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if ".so" in line}
    except OSError:
        return []
    return sorted(p for p in paths if os.path.isabs(p))
