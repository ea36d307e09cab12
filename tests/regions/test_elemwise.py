"""@lampy.elemwise on every executor: the same answer as the undecorated function."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import lampy
from lampy.testing import assert_same


def affine(x: np.ndarray, y: np.ndarray, k: float = 2.0) -> np.ndarray:
    return x * k + y


def convolve_rows(x: np.ndarray, window: np.ndarray) -> np.ndarray:
    return np.stack([np.convolve(row, window, mode="same") for row in x]) if len(x) else x


def stats(x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    return x.sum(axis=1), {"max": x.max(axis=1, initial=-np.inf), "first": x[:, :1]}


@pytest.mark.parametrize("chunks", [1, 2, 3, 7, 50])
def test_split_arguments_and_keywords(executor: str, chunks: int) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.random((23, 4)), rng.random((23, 4))
    f = lampy.elemwise(chunks=chunks)(affine)
    assert_same(f(x, y, k=3.5), affine(x, y, k=3.5))
    assert_same(f(x, y=y), affine(x, y=y))


def test_auto_chunks(executor: str) -> None:
    x = np.random.default_rng(1).random((5000, 16))
    assert_same(lampy.elemwise(affine)(x, x), affine(x, x))


def test_shared_on_decorator_and_at_call(executor: str) -> None:
    x = np.random.default_rng(2).random((10, 32))
    window = np.array([0.25, 0.5, 0.25])
    on_decorator = lampy.elemwise(shared=("window",), chunks=3)(convolve_rows)
    at_call = lampy.elemwise(chunks=3)(convolve_rows)
    expected = convolve_rows(x, window)
    assert_same(on_decorator(x, window), expected)
    assert_same(at_call(x, lampy.shared(window)), expected)


def test_tuple_and_dict_results_concatenate_leaf_by_leaf(executor: str) -> None:
    x = np.random.default_rng(3).random((17, 5))
    assert_same(lampy.elemwise(chunks=4)(stats)(x), stats(x))


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.zeros((0, 3)),
        lambda: np.arange(3.0).reshape(1, 3),
        lambda: np.arange(60.0).reshape(6, 10)[:, ::3],
        lambda: np.asfortranarray(np.arange(40.0).reshape(8, 5)),
        lambda: np.arange(100, dtype=np.int32)[::-2],
    ],
    ids=["empty", "one-row", "strided", "fortran", "reversed-1d"],
)
def test_unusual_layouts(executor: str, make: object) -> None:
    x = make()  # type: ignore[operator]
    f = lampy.elemwise(chunks=3)(affine)
    assert_same(f(x, x), affine(x, x))


def test_inputs_are_not_modified_by_in_place_chunks(executor: str) -> None:
    def centre(x: np.ndarray) -> np.ndarray:
        x -= x.mean(axis=1, keepdims=True)
        return x

    x = np.random.default_rng(4).random((12, 6))
    expected = centre(x.copy())
    result = lampy.elemwise(chunks=3)(centre)(x.copy())
    assert_same(result, expected)


def test_non_array_arguments_reach_every_chunk(executor: str) -> None:
    def tag(x: np.ndarray, label: str, table: dict[str, int]) -> np.ndarray:
        return x + table[label]

    x = np.arange(10)
    assert_same(lampy.elemwise(chunks=4)(tag)(x, "b", {"a": 1, "b": 2}), x + 2)


def test_var_positional_and_keyword_arrays_are_split(executor: str) -> None:
    def total(*arrays: np.ndarray, **more: np.ndarray) -> np.ndarray:
        return sum(arrays, start=np.zeros_like(arrays[0])) + sum(more.values())

    a, b, c = (np.arange(9.0) * i for i in (1, 2, 3))
    assert_same(lampy.elemwise(chunks=2)(total)(a, b, extra=c), a + b + c)


def test_methods_can_be_regions(executor: str) -> None:
    class Scaler:
        def __init__(self, k: float) -> None:
            self.k = k

        @lampy.elemwise(chunks=2)
        def apply(self, x: np.ndarray) -> np.ndarray:
            return x * self.k

    x = np.arange(8.0)
    assert_same(Scaler(3.0).apply(x), x * 3.0)


def test_aio_inside_a_running_loop(executor: str) -> None:
    f = lampy.elemwise(chunks=2)(affine)
    x = np.arange(20.0).reshape(10, 2)

    async def main() -> tuple[np.ndarray, np.ndarray]:
        awaited = await f.aio(x, x)
        plain = f(x, x)  # a plain call works while a loop runs (as in Jupyter)
        return awaited, plain

    awaited, plain = asyncio.run(main())
    assert_same(awaited, affine(x, x))
    assert_same(plain, affine(x, x))


def test_explain_describes_the_plan(executor: str) -> None:
    x = np.zeros((100, 4))
    plan = lampy.elemwise(chunks=4)(affine).explain(x, x)
    assert isinstance(plan, lampy.Plan)
    assert plan.executor == executor
    assert plan.chunks == ((0, 25), (25, 50), (50, 75), (75, 100))
    assert plan.bytes_per_chunk == [25 * 64] * 4
    assert "chunks=4 was asked for" in str(plan)
    auto = lampy.elemwise(affine).explain(x, x)
    assert auto.reason and str(auto)
