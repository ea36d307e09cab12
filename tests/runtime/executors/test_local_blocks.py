"""The local pool runs an elemwise chunk as calls on blocks of its rows (`Job.block_rows`):
each block's rows go into the output; rows that cannot go there come back as the chunk's one
call, and an error in any block is the chunk's."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lampy.regions._binding import bind
from lampy.runtime import executors
from lampy.runtime._job import Job
from lampy.runtime._plan import split_rows
from lampy.runtime.executors._local import LocalExecutor

X = np.arange(2000.0)
CHUNKS = ((0, 1000), (1000, 2000))


def pool() -> LocalExecutor:
    executor = executors.get("local", {})
    assert isinstance(executor, LocalExecutor)
    return executor


def job(function: Any, block_rows: int | None) -> Job:
    return bind(function, frozenset(), (X,), {}).job(
        function, CHUNKS, joins_rows=True, block_rows=block_rows
    )


def rows_per_call(x: np.ndarray) -> np.ndarray:
    return np.full(x.shape[0], float(x.shape[0])) + x * 0


def values(outcomes: dict[int, Any]) -> list[Any]:
    for chunk in sorted(outcomes):
        assert outcomes[chunk].error is None, outcomes[chunk].traceback
    return [outcomes[chunk].value for chunk in sorted(outcomes)]


@pytest.mark.parametrize(("block_rows", "seen"), [(None, 1000), (300, 250), (999, 500)])
def test_each_chunk_runs_as_calls_on_even_blocks_of_at_most_block_rows(
    block_rows: int | None, seen: int
) -> None:
    got = values(pool().run(job(rows_per_call, block_rows)))
    for value in got:
        np.testing.assert_array_equal(value, np.full(1000, float(seen)))


def spectra(x: np.ndarray) -> np.ndarray:
    frames = np.stack([x, x * 0.5, np.sqrt(x)], axis=1)
    return np.abs(np.fft.rfft(frames, axis=1)) @ np.arange(6.0).reshape(2, 3)


def test_blocks_give_the_rows_one_call_gives() -> None:
    got = np.concatenate(values(pool().run(job(spectra, 128))))
    np.testing.assert_array_equal(got, spectra(X))


def dtype_changes_at_row_500(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32 if x[0] >= 500 else np.float64)


def test_a_block_whose_rows_differ_in_kind_sends_the_chunk_back_as_one_call() -> None:
    first, second = values(pool().run(job(dtype_changes_at_row_500, 250)))
    assert first.dtype == np.float64, "chunk 0 as one call: its first row decides"
    np.testing.assert_array_equal(first, X[:1000])
    np.testing.assert_array_equal(second, X[1000:].astype(np.float64))


def not_rows(x: np.ndarray) -> list[int]:
    return [int(x.shape[0])]


def test_a_result_that_is_not_rows_comes_back_from_one_call_per_chunk() -> None:
    assert values(pool().run(job(not_rows, 250))) == [[1000], [1000]]


def fails_at_row_600(x: np.ndarray) -> np.ndarray:
    if 600 in x:
        raise ValueError("row 600 is bad")
    return x + 1


def test_an_error_in_a_later_block_is_its_chunks_error() -> None:
    # the job stops at its first error: chunk 1 may or may not have answered by then
    outcomes = pool().run(job(fails_at_row_600, 250))
    error = outcomes[0].error
    assert isinstance(error, ValueError) and "row 600" in str(error)
    assert "fails_at_row_600" in outcomes[0].traceback
    if 1 in outcomes:
        np.testing.assert_array_equal(outcomes[1].value, X[1000:] + 1)


def scaled_norms(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.abs(x)) * np.linalg.norm(x, axis=-1, keepdims=True)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 3000),
    width=st.integers(1, 5),
    chunks=st.integers(1, 9),
    block_rows=st.one_of(st.none(), st.integers(1, 700)),
)
def test_any_chunks_and_blocks_give_numpys_rows(
    rows: int, width: int, chunks: int, block_rows: int | None
) -> None:
    x = np.random.default_rng(rows * 7 + width).standard_normal((rows, width))
    cuts = split_rows(rows, chunks)
    made = bind(scaled_norms, frozenset(), (x,), {}).job(
        scaled_norms, cuts, joins_rows=True, block_rows=block_rows
    )
    got = np.concatenate(values(pool().run(made)))
    np.testing.assert_array_equal(got, scaled_norms(x))
