"""Every kind of argument, on every executor: the undecorated call's exact answer, or a typed
error before any work is sent. Never a wrong answer whose shape or values depend on chunking."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lampy
from lampy.testing import assert_same

Maker = Callable[[int, Path], Any]


def _plain(rows: int, dtype: str = "f8") -> np.ndarray:
    return (np.arange(rows * 3).reshape(rows, 3) % 7 - 3).astype(dtype)


def _memmap(rows: int, where: Path) -> np.ndarray:
    data = np.lib.format.open_memmap(where / f"m{rows}.npy", "w+", np.float64, (rows, 3))
    data[:] = _plain(rows)
    return data


def _structured(rows: int, where: Path) -> np.ndarray:
    out = np.zeros(rows, dtype=[("a", "<i4"), ("b", ">f8")])
    out["a"], out["b"] = np.arange(rows), np.arange(rows) / 3
    return out


#: Arguments that lampy must run exactly: the answer equals the undecorated call's.
EXACT: dict[str, Maker] = {
    "float64": lambda rows, _: _plain(rows),
    "big-endian": lambda rows, _: _plain(rows, ">f8"),
    "int8": lambda rows, _: _plain(rows, "i1"),
    "float16": lambda rows, _: _plain(rows, "f2"),
    "complex64": lambda rows, _: _plain(rows, "c8") * (1 + 1j),
    "bool": lambda rows, _: _plain(rows) > 0,
    "strided view": lambda rows, _: _plain(2 * rows)[::2],
    "fortran order": lambda rows, _: np.asfortranarray(_plain(rows)),
    "3-d, sliced columns": lambda rows, _: _plain(rows).reshape(rows, 3, 1)[:, 1:],
    "memmap": _memmap,
    "structured": _structured,
}
#: Arguments lampy cannot split without losing something: refused, typed, before any work.
REFUSED: dict[str, Maker] = {
    "masked": lambda rows, _: np.ma.masked_greater(_plain(rows), 1),
    "matrix": lambda rows, _: np.asmatrix(_plain(max(rows, 1))),
    "recarray": lambda rows, _: _structured(rows, _).view(np.recarray),
    "object": lambda rows, _: _plain(rows).astype(object),
}


def rows_copied(x: np.ndarray) -> np.ndarray:
    return x[::-1][::-1].copy()


def doubled_rows(x: np.ndarray) -> Any:
    return x if x.dtype.names else x + x


def largest(x: np.ndarray) -> Any:
    return x.max(axis=0) if len(x) else np.full(x.shape[1:], -128, x.dtype)


@settings(max_examples=12)
@given(kind=st.sampled_from(sorted(EXACT)), rows=st.integers(0, 30), chunks=st.integers(1, 5))
def test_elemwise_equals_numpy_on_every_argument_kind(
    executor: str, tmp_path: Path, kind: str, rows: int, chunks: int
) -> None:
    x = EXACT[kind](rows, tmp_path)
    for function in (rows_copied, doubled_rows):
        assert_same(lampy.elemwise(chunks=chunks)(function)(x), function(x))


@settings(max_examples=8)
@given(
    kind=st.sampled_from(["float64", "big-endian", "int8", "bool", "strided view", "memmap"]),
    rows=st.integers(1, 30),
    chunks=st.integers(1, 5),
)
def test_an_order_free_reduction_equals_numpy_exactly(
    executor: str, tmp_path: Path, kind: str, rows: int, chunks: int
) -> None:
    x = EXACT[kind](rows, tmp_path)
    assert_same(lampy.reduce(np.maximum, chunks=chunks)(largest)(x), largest(x))


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_subclasses_and_objects_are_refused_before_any_work(executor: str, kind: str) -> None:
    x = REFUSED[kind](12, Path("."))
    with pytest.raises(lampy.UnsplittableError, match="argument 'x'"):
        lampy.elemwise(chunks=3)(rows_copied)(x)


def test_a_shared_masked_array_travels_whole_with_its_mask(executor: str) -> None:
    window = np.ma.masked_greater(np.arange(3.0), 1)

    def weighted(x: np.ndarray, window: np.ma.MaskedArray) -> np.ndarray:
        return np.asarray((x * window).filled(0))

    x = _plain(10)
    assert_same(lampy.elemwise(chunks=3)(weighted)(x, lampy.shared(window)), weighted(x, window))


def column_means(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=0)


def masked_rows(x: np.ndarray) -> np.ndarray:
    return np.ma.masked_greater(x, 1)


@pytest.mark.parametrize("chunks", [1, 4])
def test_results_that_depend_on_the_cut_are_refused(executor: str, chunks: int) -> None:
    x = np.ones((1000, 8))
    with pytest.raises(lampy.ResultError, match=r"returned 8 rows for its \d+ input rows"):
        lampy.elemwise(chunks=chunks)(column_means)(x)
    with pytest.raises(lampy.ResultError, match="MaskedArray"):
        lampy.elemwise(chunks=chunks)(masked_rows)(x)


def grows_columns(x: np.ndarray) -> np.ndarray:
    return np.ones((len(x), int(x[0, 0]) + 1))


def test_chunks_with_different_trailing_shapes_are_a_result_error(executor: str) -> None:
    x = np.repeat(np.arange(4.0), 5)[:, None]  # chunk i sees rows of value i
    with pytest.raises(lampy.ResultError, match="chunk results differ"):
        lampy.elemwise(chunks=4)(grows_columns)(x)


@pytest.mark.parametrize("kind", [SystemExit, KeyboardInterrupt, GeneratorExit])
def test_process_ending_exceptions_are_the_users_error_everywhere(
    executor: str, kind: type[BaseException]
) -> None:
    def leaves(x: np.ndarray) -> np.ndarray:
        if (x == 7).any():
            raise kind("from the user's code")
        return x

    with pytest.raises(kind) as raised:
        lampy.elemwise(chunks=3)(leaves)(np.arange(12))
    assert "raised in lampy chunk 1 of 3 (rows 4:8)" in getattr(raised.value, "__notes__", [])
