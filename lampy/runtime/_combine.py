"""Combining chunk results: concatenation for elemwise regions, tree merges for reductions.

Results may be arrays or tuples, lists and dicts of them; combining goes leaf by leaf.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lampy._errors import ResultError
from lampy.runtime.remote._results import Sink


def concatenate(results: Sequence[Any], sink: Sink | None = None) -> Any:
    """Join elemwise chunk results along axis 0, leaf by leaf; one result is returned as is.

    A sink other than "auto" (the openlambda executor's `results` option) writes the joined
    array into a memory-mapped file or onto the client's array server instead.
    """
    if sink is not None and sink.mode != "auto":
        return sink.assemble(results)
    if len(results) == 1:
        return results[0]
    first = results[0]
    if isinstance(first, tuple | list):
        _same_structure(results, len(first), type(first))
        joined = [concatenate([r[i] for r in results]) for i in range(len(first))]
        return type(first)(joined)
    if isinstance(first, dict):
        _same_structure(results, first.keys(), dict)
        return {k: concatenate([r[k] for r in results]) for k in first}
    for i, r in enumerate(results):
        if not isinstance(r, np.ndarray) or r.ndim == 0:
            raise ResultError(
                f"an elemwise region must return arrays with a leading axis to concatenate "
                f"(or tuples/dicts of them); chunk {i} returned {_describe(r)}. "
                "Use @lampy.reduce or @lampy.sum for functions that reduce over rows."
            )
    return np.concatenate(results, axis=0)


def tree_merge(partials: Sequence[Any], combine: Callable[[Any, Any], Any]) -> Any:
    """Merge partials pairwise as a balanced tree, keeping their order (combine is associative)."""
    level = list(partials)
    while len(level) > 1:
        merged = [combine(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            merged.append(level[-1])
        level = merged
    return level[0]


def add(a: Any, b: Any) -> Any:
    """Add two partials leaf by leaf (the combine rule of @lampy.sum)."""
    if isinstance(a, tuple | list):
        _same_structure([a, b], len(a), type(a))
        return type(a)(add(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        _same_structure([a, b], a.keys(), dict)
        return {k: add(a[k], b[k]) for k in a}
    return a + b


def _same_structure(results: Sequence[Any], key: Any, kind: type) -> None:
    for i, r in enumerate(results):
        if not isinstance(r, kind) or (r.keys() if isinstance(r, dict) else len(r)) != key:  # type: ignore[arg-type]
            raise ResultError(
                f"chunk results differ in structure: the first is {_describe(results[0])}, "
                f"result {i} is {_describe(r)}; every chunk must return the same structure"
            )


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape}"
    if isinstance(value, dict):
        return f"a dict with keys {sorted(map(str, value))}"
    if isinstance(value, tuple | list):
        return f"a {type(value).__name__} of length {len(value)}"
    return f"a {type(value).__name__}"
