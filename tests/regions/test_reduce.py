"""@lampy.reduce and @lampy.sum on every executor."""

from __future__ import annotations

import time

import numpy as np
import pytest

import lampy
from lampy.testing import assert_same


def moments(x: np.ndarray) -> dict[str, object]:
    return {"n": len(x), "s": x.sum(axis=0), "g": x.T @ x}


def mean_and_cov(p: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    mean = p["s"] / p["n"]
    return mean, p["g"] / p["n"] - np.outer(mean, mean)


@pytest.mark.parametrize("chunks", [1, 2, 5, 64])
def test_sum_of_integer_partials_is_exact(executor: str, chunks: int) -> None:
    x = np.random.default_rng(0).integers(-1000, 1000, size=(40, 3))
    result = lampy.sum(chunks=chunks)(moments)(x)
    assert_same(result, moments(x))


def test_sum_of_float_partials_is_close_with_finalize(executor: str) -> None:
    x = np.random.default_rng(1).random((1000, 4))
    f = lampy.sum(chunks=7, finalize=mean_and_cov)(moments)
    mean, cov = f(x)
    assert_same(mean, x.mean(axis=0), exact=False)
    assert_same(cov, np.cov(x.T, bias=True), exact=False)


def test_bare_sum_with_gram_matrix(executor: str) -> None:
    @lampy.sum
    def gram(x: np.ndarray) -> np.ndarray:
        return x.T @ x

    x = np.random.default_rng(2).random((300, 5))
    assert_same(gram(x), x.T @ x, exact=False)


def test_reduce_merges_as_an_ordered_tree(executor: str) -> None:
    merges: list[tuple[str, str]] = []

    def concat(a: str, b: str) -> str:
        merges.append((a, b))
        return a + b

    def label(x: np.ndarray) -> str:
        return "".join(chr(ord("a") + int(v)) for v in x)

    f = lampy.reduce(concat, chunks=4)(label)
    assert f(np.arange(8)) == "abcdefgh"
    # a tree: (ab+cd), (ef+gh), then the two halves; not a left fold
    assert merges == [("ab", "cd"), ("ef", "gh"), ("abcd", "efgh")]


def test_reduce_with_max_combine_and_shared(executor: str) -> None:
    def best(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return (x * weights).max(axis=0, initial=-np.inf)

    x = np.random.default_rng(3).random((50, 3))
    w = np.array([1.0, -1.0, 2.0])
    f = lampy.reduce(np.maximum, chunks=6, shared="weights")(best)
    assert_same(f(x, w), best(x, w))


def test_empty_input_reduces_once(executor: str) -> None:
    x = np.zeros((0, 3))
    assert_same(lampy.sum(chunks=4)(moments)(x), moments(x))


def test_auto_plan_is_kept_for_repeated_calls_on_a_started_pool() -> None:
    import cloudpickle

    from lampy.runtime import executors

    pool = executors.get("local", {})
    pool.start()
    deadline = time.monotonic() + 60
    while not pool.is_warm():  # started, then up: a pool still starting is never waited for
        assert time.monotonic() < deadline, "the pool did not start"
        time.sleep(0.01)
    f = lampy.sum(executor="local")(moments)
    x = np.random.default_rng(5).random((20_000, 8))
    first = f(x)
    plans = list(f.runner._plans.values())
    assert len(plans) == 1
    for _ in range(3):
        assert_same(f(x), first)  # bit for bit: the same chunks every time
    assert list(f.runner._plans.values()) == plans
    assert f.explain(x) == plans[0]
    assert cloudpickle.loads(cloudpickle.dumps(f)).runner._plans == {}
