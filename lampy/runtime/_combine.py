"""Combining chunk results: concatenation for elemwise regions, tree merges for reductions.

Results may be arrays or tuples, lists and dicts of them; combining goes leaf by leaf. Where the
joined array goes is the caller's choice: memory by default, or a `Destination` it is given
(an executor's result sink: a memory-mapped file, an array server).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from lampy._errors import ResultError
from lampy.runtime._tree import describe, zip_leaves


class Destination(Protocol):
    """Somewhere other than memory that an elemwise result is joined into."""

    def assemble(self, parts: Sequence[Any]) -> Any:
        """The parts joined along axis 0 there, with the dtype and values np.concatenate gives."""


def concatenate(results: Sequence[Any], destination: Destination | None = None) -> Any:
    """Join elemwise chunk results along axis 0, leaf by leaf; one result is returned as is."""
    if destination is not None:
        return destination.assemble(results)
    if len(results) == 1:
        return results[0]
    return zip_leaves(results, _join)


def _join(parts: list[Any], where: str) -> np.ndarray:
    for i, part in enumerate(parts):
        if not isinstance(part, np.ndarray) or part.ndim == 0:
            raise ResultError(
                f"an elemwise region must return arrays with a leading axis to concatenate "
                f"(or tuples/dicts of them); chunk {i} returned {describe(part)}"
                f"{f' at {where}' if where else ''}. "
                "Use @lampy.reduce or @lampy.sum for functions that reduce over rows."
            )
    return np.concatenate(parts, axis=0)


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
    return zip_leaves([a, b], lambda pair, where: pair[0] + pair[1])
