"""Property-based: random shapes, dtypes and chunk counts give numpy's answer on every executor."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import lampy
from lampy.testing import assert_same

DTYPES = st.sampled_from([np.bool_, np.int32, np.int64, np.float32, np.float64, np.complex128])


@st.composite
def arrays_and_chunks(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    dtype = draw(DTYPES)
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=12))
    elements: dict[str, Any] = {"min_value": -1e6, "max_value": 1e6}
    if np.dtype(dtype).kind == "c":
        elements = {"max_magnitude": 1e6, "allow_nan": False, "allow_infinity": False}
    elif np.dtype(dtype).kind in "iu":
        elements = {"min_value": -1000, "max_value": 1000}
    elif np.dtype(dtype).kind == "b":
        elements = {}
    array = draw(hnp.arrays(dtype, shape, elements=elements))
    if draw(st.booleans()) and array.ndim > 1:
        array = np.asfortranarray(array)
    chunks = draw(st.integers(min_value=1, max_value=shape[0] + 3))
    return array, chunks


def double_and_square(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x + x, x * x


def partial_sums(x: np.ndarray) -> dict[str, Any]:
    return {"n": len(x), "s": x.sum(axis=0, dtype=x.dtype if x.dtype != np.bool_ else None)}


@settings(max_examples=40)
@given(case=arrays_and_chunks())
def test_elemwise_is_exact(executor: str, case: tuple[np.ndarray, int]) -> None:
    x, chunks = case
    assert_same(lampy.elemwise(chunks=chunks)(double_and_square)(x), double_and_square(x))


@settings(max_examples=40)
@given(case=arrays_and_chunks())
def test_sum_is_exact_for_integers_and_close_for_floats(
    executor: str, case: tuple[np.ndarray, int]
) -> None:
    x, chunks = case
    result, expected = lampy.sum(chunks=chunks)(partial_sums)(x), partial_sums(x)
    if x.dtype.kind in "biu":
        assert_same(result, expected)
        return
    assert result["n"] == expected["n"] and result["s"].dtype == expected["s"].dtype
    # Summing in another order moves each sum by a few rounding steps of its terms' magnitude
    # (not of the sum's own, which cancellation can make tiny).
    tolerance = 4 * np.finfo(x.dtype).eps * np.abs(x).sum(axis=0) * max(1, len(x))
    assert np.all(np.abs(result["s"] - expected["s"]) <= tolerance)


@settings(max_examples=20)
@given(case=arrays_and_chunks(), other=st.integers(-5, 5))
def test_shared_and_constant_arguments(
    executor: str, case: tuple[np.ndarray, int], other: int
) -> None:
    x, chunks = case

    def shifted(x: np.ndarray, ref: np.ndarray, k: int) -> np.ndarray:
        return x * k + ref.shape[0]  # every chunk must see all of ref

    f = lampy.elemwise(chunks=chunks, shared=("ref",))(shifted)
    assert_same(f(x, x, other), shifted(x, x, other))
