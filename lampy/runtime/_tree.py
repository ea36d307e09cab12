"""The one walk over results: tuples, lists and dicts of leaves, several structures in step.

Chunk results, partials and test answers are arrays or nested tuples, lists and dicts of them;
every step that goes leaf by leaf (concatenating, adding, storing, comparing) walks them here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lampy._errors import ResultError


def map_leaves(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """`value` with every leaf replaced by `leaf(it)`; tuples, lists and dicts keep their shape.

    >>> map_leaves({"a": (1, 2), "b": 3}, lambda x: x * 10)
    {'a': (10, 20), 'b': 30}
    """
    return zip_leaves([value], lambda leaves, where: leaf(leaves[0]))


def leaves(value: Any) -> list[Any]:
    """The leaves of `value`, in order.

    >>> leaves(([1, 2], {"k": 3}))
    [1, 2, 3]
    """
    found: list[Any] = []
    zip_leaves([value], lambda items, where: found.append(items[0]))
    return found


def zip_leaves(
    values: Sequence[Any], leaf: Callable[[list[Any], str], Any], where: str = ""
) -> Any:
    """Walk several structures in step: `leaf(items, where)` gets the matching leaf of each
    and its path ("[0]['s']"). Structures that differ raise `ResultError` naming which one.

    >>> zip_leaves([(1, 2), (10, 20)], lambda items, where: sum(items))
    (11, 22)
    """
    first = values[0]
    if isinstance(first, tuple | list):
        _same_structure(values, len(first), type(first), where)
        joined = [
            zip_leaves([v[i] for v in values], leaf, f"{where}[{i}]") for i in range(len(first))
        ]
        return type(first)(joined)
    if isinstance(first, dict):
        _same_structure(values, first.keys(), dict, where)
        return {k: zip_leaves([v[k] for v in values], leaf, f"{where}[{k!r}]") for k in first}
    return leaf(list(values), where)


def describe(value: Any) -> str:
    """A value as messages name it: "an array of shape (3, 2)", "a dict with keys [...]"."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"an array of shape {tuple(value.shape)}"
    if isinstance(value, dict):
        return f"a dict with keys {sorted(map(str, value))}"
    if isinstance(value, tuple | list):
        return f"a {type(value).__name__} of length {len(value)}"
    return f"a {type(value).__name__}"


def _same_structure(values: Sequence[Any], key: Any, kind: type, where: str) -> None:
    for i, v in enumerate(values):
        if not isinstance(v, kind) or (v.keys() if isinstance(v, dict) else len(v)) != key:  # type: ignore[arg-type]
            at = f" at {where}" if where else ""
            raise ResultError(
                f"chunk results differ in structure{at}: the first is {describe(values[0])}, "
                f"result {i} is {describe(v)}; every chunk must return the same structure"
            )
