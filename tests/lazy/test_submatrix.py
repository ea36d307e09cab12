"""`run(submatrix=(r, c))`: 2-D element-wise work cut into blocks on both axes, equal to numpy."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lampy.lazy as lazy
from lampy._errors import OptionError
from lampy.lazy._graph import schedule
from lampy.regions._runner import RegionRunner
from lampy.testing import assert_same
from tests.lazy.test_lazy import DATA, Expr, both, expressions

blocks = st.tuples(st.integers(1, 4), st.integers(1, 5))


@settings(max_examples=15)
@given(expr=expressions, submatrix=blocks)
def test_random_trees_by_blocks_are_bit_identical(
    executor: str, expr: Expr, submatrix: tuple[int, int]
) -> None:
    result, expected = both(expr)
    assert_same(result.run(submatrix=submatrix), expected)


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[list[tuple[int, ...]]]:
    """Each region call's array argument shapes, as the region received them."""
    calls: list[list[tuple[int, ...]]] = []
    original = RegionRunner.run

    def spying(self: RegionRunner, args: tuple[Any, ...], *rest: Any, **kwargs: Any) -> Any:
        calls.append([np.shape(getattr(a, "value", a)) for a in args])
        return original(self, args, *rest, **kwargs)

    monkeypatch.setattr(RegionRunner, "run", spying)
    return calls


def test_blocks_cut_columns_and_leave_broadcast_operands_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wide = np.random.default_rng(1).uniform(-1, 1, (8, 7))
    a, col, row = lazy.array(wide), lazy.array(wide[:, :1]), lazy.array(wide[0])
    expr = np.exp(a * col) - row
    calls = _spy(monkeypatch)
    got = expr.run(executor="inline", submatrix=(2, 3))
    assert_same(got, np.exp(wide * wide[:, :1]) - wide[0])
    # one region call per column block (7 columns: 3, 2, 2); the (8, 1) column stays whole
    assert sorted(calls) == sorted([[(8, w), (8, 1), (w,)] for w in (3, 2, 2)]), calls


def test_more_blocks_than_columns_or_rows_stop_at_one_each() -> None:
    x = np.arange(6.0).reshape(3, 2)
    assert_same((lazy.array(x) * 3).run(executor="inline", submatrix=(5, 9)), x * 3)


def test_other_steps_run_with_rows_times_columns_chunks(
    executor: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = lazy.array(DATA["a"]), lazy.array(DATA["b"])
    x, y = DATA["a"], DATA["b"]
    cases = [
        (np.sum(a * b, axis=0), np.sum(x * y, axis=0), False),
        ((a + b).max(), (x + y).max(), True),
        (a.reshape(7, 3, 1) * 2, x.reshape(7, 3, 1) * 2, True),  # 3-D: rows only
        (np.exp(a).sum(axis=1), np.exp(x).sum(axis=1), True),  # not column-separable
    ]
    for got, expected, exact in cases:
        assert_same(got.run(submatrix=(2, 2)), expected, exact=exact)
    assert not [s for s in schedule(np.exp(a).sum(axis=1).node) if s.by_blocks]


def test_explain_names_the_blocks() -> None:
    a, b = lazy.array(DATA["a"]), lazy.array(DATA["b"])
    plan = (a + b).explain(executor="local", submatrix=(2, 3))
    assert "up to 2x3 blocks per region" in str(plan)
    assert plan.prewarm("local") == min(6, plan.workers["local"])


@pytest.mark.parametrize(
    ("submatrix", "chunks", "message"),
    [
        ((0, 2), None, "at least one block on each axis"),
        ((2,), None, r"two ints like \(2, 2\); got \(2,\)"),
        ("2x2", None, "got '2x2'"),
        ((2.0, 2), None, r"got \(2.0, 2\)"),
        ((True, 2), None, r"got \(True, 2\)"),
        ((2, 2), 4, r"give chunks= or submatrix=, not both.*chunks=4"),
    ],
)
def test_bad_submatrix_fails_before_running(
    submatrix: Any, chunks: int | None, message: str
) -> None:
    a = lazy.array(DATA["a"])
    with pytest.raises(OptionError, match=message):
        (a + 1).run(executor="inline", chunks=chunks, submatrix=submatrix)
    with pytest.raises(OptionError, match=message):
        (a + 1).explain(executor="inline", chunks=chunks, submatrix=submatrix)
