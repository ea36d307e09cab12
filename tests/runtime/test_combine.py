"""Combine rules: concatenation leaf by leaf, ordered tree merges, leaf-wise addition."""

from __future__ import annotations

import numpy as np
import pytest

from lampy._errors import ResultError
from lampy.runtime._combine import add, concatenate, tree_merge


def test_concatenate_nested_structures() -> None:
    parts = [({"a": np.arange(2)}, [np.ones((1, 2))]), ({"a": np.arange(3)}, [np.zeros((2, 2))])]
    joined = concatenate(parts)
    np.testing.assert_array_equal(joined[0]["a"], [0, 1, 0, 1, 2])
    assert joined[1][0].shape == (3, 2)


def test_single_result_is_returned_without_copy() -> None:
    only = np.arange(4)
    assert concatenate([only]) is only


def test_mismatched_structures_are_named() -> None:
    with pytest.raises(ResultError, match="result 1 is a dict"):
        concatenate([(np.arange(2),), {"a": np.arange(2)}])
    with pytest.raises(ResultError, match="result 1 is a dict with keys \\['b'\\]"):
        add({"a": 1}, {"b": 2})


@pytest.mark.parametrize("n", range(1, 12))
def test_tree_merge_keeps_order(n: int) -> None:
    items = [chr(ord("a") + i) for i in range(n)]
    assert tree_merge(items, lambda a, b: a + b) == "".join(items)


def test_add_is_leafwise() -> None:
    assert add({"n": 1, "s": (1, 2)}, {"n": 2, "s": (3, 4)}) == {"n": 3, "s": (4, 6)}
