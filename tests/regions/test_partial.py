"""Partial answers: off by default, checked options, and never a way around a user error."""

from __future__ import annotations

import numpy as np
import pytest

import lampy
from lampy.testing import assert_same


def moments(x: np.ndarray) -> dict[str, np.ndarray]:
    return {"n": np.array(len(x)), "s": x.sum(0)}


def test_complete_answer_is_a_partial_with_full_coverage(executor: str) -> None:
    x = np.arange(60).reshape(30, 2)
    value, coverage = lampy.sum(chunks=3, allow_partial=0.9)(moments)(x)
    assert_same(value, moments(x))
    assert coverage.complete and coverage.fraction == 1.0 and coverage.merged == (0, 1, 2)
    assert str(coverage) == "100.0% of rows (30 of 30), 3 of 3 chunks"


def test_without_allow_partial_the_value_comes_back_alone(executor: str) -> None:
    x = np.arange(10)
    assert_same(lampy.sum(chunks=2)(moments)(x), moments(x))


def fails_on_row_7(x: np.ndarray) -> np.ndarray:
    if 7 in x:
        raise KeyError("row 7")
    return x.sum(0)


def test_user_errors_are_raised_even_with_allow_partial(executor: str) -> None:
    f = lampy.sum(chunks=4, allow_partial=0.5)(fails_on_row_7)
    with pytest.raises(KeyError, match="row 7"):
        f(np.arange(20))


def test_finalize_sees_the_merged_partial(executor: str) -> None:
    f = lampy.sum(chunks=2, allow_partial=1.0, finalize=lambda p: p["s"] / p["n"])(moments)
    value, _ = f(np.arange(10.0))
    assert value == 4.5


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5, "0.9", True, float("nan")])
def test_allow_partial_must_be_a_fraction(fraction: object) -> None:
    with pytest.raises(lampy.OptionError, match=r"allow_partial must be a fraction .*\(0, 1\]"):
        lampy.sum(allow_partial=fraction)(moments)  # type: ignore[call-overload]


def test_elemwise_takes_no_allow_partial() -> None:
    with pytest.raises(TypeError, match="allow_partial"):
        lampy.elemwise(allow_partial=0.9)(np.negative)  # type: ignore[call-overload]
