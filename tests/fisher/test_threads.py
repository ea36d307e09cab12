"""The pipeline's small products past the features run on one BLAS thread in the caller."""

from typing import Any

import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from examples.fisher import diarize, features, flsd, threads
from examples.fisher.audio import read_wav

from .conftest import SAMPLE_WAV


def _blas_threads() -> list[int]:
    return [int(lib["num_threads"]) for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_one_blas_thread_inside_and_the_old_counts_after() -> None:
    with threadpool_limits(2, user_api="blas"):
        before = _blas_threads()
        assert before and max(before) == 2
        with threads.one_blas_thread():
            assert _blas_threads() == [1] * len(before)
        assert _blas_threads() == before


def test_diarize_runs_its_small_products_on_one_blas_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The features and the FLsD stage (scatter matrices, eigenproblem) see one BLAS thread;
    the caller's count is back after the call."""
    seen: list[list[int]] = []

    def spy(module: Any, name: str) -> None:
        function = getattr(module, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            seen.append(_blas_threads())
            return function(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    spy(features, "short_term_features")
    spy(flsd, "flsd_projection")
    signal, rate = read_wav(SAMPLE_WAV)
    with threadpool_limits(2, user_api="blas"):
        before = _blas_threads()
        diarize(signal, rate, n_speakers=2)
        assert _blas_threads() == before
    assert len(seen) == 2 and all(count == 1 for counts in seen for count in counts)


def test_without_threadpoolctl_the_block_runs_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "_controller", lambda: None)
    with threadpool_limits(2, user_api="blas"):
        before = _blas_threads()
        with threads.one_blas_thread():
            assert _blas_threads() == before
