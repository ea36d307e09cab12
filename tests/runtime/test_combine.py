"""Combine rules: concatenation leaf by leaf, ordered tree merges, leaf-wise addition."""

from __future__ import annotations

import numpy as np
import pytest

from lampy._errors import ResultError
from lampy.runtime._combine import add, concatenate, tree_merge


def test_concatenate_nested_structures() -> None:
    parts = [({"a": np.arange(2)}, [np.ones((1, 2))]), ({"a": np.arange(3)}, [np.zeros((2, 2))])]
    joined = concatenate(parts, ["chunk 0", "chunk 1"], None)
    np.testing.assert_array_equal(joined[0]["a"], [0, 1, 0, 1, 2])
    assert joined[1][0].shape == (3, 2)


def test_single_result_is_returned_without_copy() -> None:
    only = np.arange(4)
    assert concatenate([only], ["chunk 0"], [4]) is only


def test_mismatched_structures_are_named() -> None:
    with pytest.raises(ResultError, match="result 1 is a dict"):
        concatenate([(np.arange(2),), {"a": np.arange(2)}], ["c0", "c1"], [2, 2])
    with pytest.raises(ResultError, match="result 1 is a dict with keys \\['b'\\]"):
        add({"a": 1}, {"b": 2})


@pytest.mark.parametrize("n", range(1, 12))
def test_tree_merge_keeps_order(n: int) -> None:
    items = [chr(ord("a") + i) for i in range(n)]
    assert tree_merge(items, lambda a, b: a + b) == "".join(items)


def test_add_is_leafwise() -> None:
    assert add({"n": 1, "s": (1, 2)}, {"n": 2, "s": (3, 4)}) == {"n": 3, "s": (4, 6)}


LABELS = ["chunk 0 of 2 (rows 0:3)", "chunk 1 of 2 (rows 3:5)"]


def test_a_chunk_returning_other_than_one_row_per_row_is_named() -> None:
    with pytest.raises(ResultError, match=r"chunk 1 of 2 \(rows 3:5\) returned 8 rows for its 2"):
        concatenate([np.ones((3, 8)), np.ones((8,))], LABELS, [3, 2])


def test_trailing_shapes_and_dtypes_must_agree() -> None:
    with pytest.raises(ResultError, match=r"rows of shape \(2,\) float64, chunk 1 .* \(3,\)"):
        concatenate([np.ones((3, 2)), np.ones((2, 3))], LABELS, [3, 2])
    with pytest.raises(ResultError, match="int64"):
        concatenate([np.ones((3, 2)), np.ones((2, 2), dtype=np.int64)], LABELS, [3, 2])


def test_subclasses_are_refused_and_byte_order_kept() -> None:
    masked = np.ma.masked_array(np.ones(2), [0, 1])
    with pytest.raises(ResultError, match=r"numpy.ma.*MaskedArray.*np.asarray"):
        concatenate([np.ones(3), masked], LABELS, [3, 2])
    big = np.arange(5, dtype=">f8")
    joined = concatenate([big[:3], big[3:]], LABELS, [3, 2])
    assert joined.dtype == np.dtype(">f8") and joined.tolist() == big.tolist()
