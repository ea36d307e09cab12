"""The caller's probe runs with one BLAS thread, and the caller's count comes back after."""

from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest

import lampy
from lampy.runtime import _blas as blas


def openblas_threads() -> int:
    """The calling thread's OpenBLAS thread count, read from numpy's own OpenBLAS."""
    path = next(p for p in blas._loaded_libraries() if "openblas" in os.path.basename(p))
    library = ctypes.CDLL(path)
    getter = next(
        getattr(library, name)
        for name in ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads")
        if hasattr(library, name)
    )
    return int(getter())


needs_openblas = pytest.mark.skipif(
    not blas._local_setters(), reason="numpy here is not linked to an OpenBLAS >= 0.3.27"
)


@needs_openblas
def test_one_thread_inside_and_the_old_count_after() -> None:
    before = openblas_threads()
    with blas.one_thread():
        assert openblas_threads() == 1
    assert openblas_threads() == before


SEEN: list[int] = []


def record_threads(x: np.ndarray) -> np.ndarray:
    if os.getpid() == CALLER:  # the probe runs here; the other chunks in worker processes
        SEEN.append(openblas_threads())
    return x @ np.eye(x.shape[1])


CALLER = os.getpid()


@needs_openblas
def test_the_auto_probe_runs_with_one_blas_thread() -> None:
    before = openblas_threads()
    SEEN.clear()
    x = np.ones((4096, 64))
    np.testing.assert_array_equal(lampy.elemwise(executor="local")(record_threads)(x), x)
    assert SEEN[:3] == [1, 1, 1]  # the probe's calls (a job too small to fan out then runs
    assert openblas_threads() == before  # here whole, with the caller's own thread count)
