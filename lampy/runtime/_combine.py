"""Combining chunk results: concatenation for elemwise regions, tree merges for reductions.

Results may be arrays or tuples, lists and dicts of them; combining goes leaf by leaf. Where the
joined array goes is the caller's choice: memory by default, or a `Destination` it is given
(an executor's result sink: a memory-mapped file, an array server).

An executor may also assemble the rows itself: the local pool's workers write their rows
straight into one shared output (described by a `Leaf` per array, from `spec_of`), and its
chunk results are views of it, adjacent in order. Joining those is free: the joined array is a
view of the output (`lampy.runtime._shm.join_in_place`), never a copy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from lampy._errors import ResultError
from lampy.runtime._codec import Positional
from lampy.runtime._shm import join_in_place
from lampy.runtime._tree import describe, leaves, map_leaves, zip_leaves


@dataclass(frozen=True)
class Leaf:
    """One array of an elemwise chunk's result, as rows: what one row holds."""

    trailing: tuple[int, ...]
    dtype: np.dtype[Any]

    @property
    def row_bytes(self) -> int:
        return self.dtype.itemsize * int(np.prod(self.trailing, dtype=np.int64))


def spec_of(value: Any, rows: int) -> Any:
    """`value`'s structure with a `Leaf` per array, when every leaf is rows that can be written
    into shared memory (a plain ndarray with `rows` rows, no Python objects, at least one byte
    per row); otherwise None (the value then travels as it is, and joining checks it)."""
    try:
        spec = map_leaves(value, lambda leaf: _leaf(leaf, rows))
    except ResultError:
        return None
    return spec if all(leaf is not None for leaf in leaves(spec)) else None


def _leaf(value: Any, rows: int) -> Leaf | None:
    if type(value) not in (np.ndarray, np.memmap) or value.ndim == 0 or value.shape[0] != rows:
        return None
    leaf = Leaf(tuple(value.shape[1:]), value.dtype)
    return leaf if not value.dtype.hasobject and leaf.row_bytes > 0 else None


class Destination(Protocol):
    """Somewhere other than memory that an elemwise result is joined into."""

    def assemble(self, parts: Sequence[Any]) -> Any:
        """The parts joined along axis 0 there, with the dtype and values np.concatenate gives."""


def concatenate(
    results: Sequence[Any],
    labels: Sequence[str],
    rows: Sequence[int] | None,
    destination: Destination | None = None,
) -> Any:
    """Join elemwise chunk results along axis 0, leaf by leaf, into what one call over all the
    rows returns; `labels` name the chunks and `rows` are their row counts (None when the call
    split no array, so rows mean nothing).

    Each chunk must return one row per input row, as plain ndarrays of one trailing shape and
    dtype: anything else would make the answer depend on how the rows were cut, so it is a
    `ResultError` naming the chunk. The joined array keeps the chunks' dtype, byte order
    included.
    """
    zip_leaves(list(results), lambda parts, where: _check(parts, where, labels, rows))
    if destination is not None:
        return destination.assemble(results)
    if len(results) == 1:
        return results[0]
    return zip_leaves(list(results), _join)


def _check(parts: list[Any], where: str, labels: Sequence[str], rows: Sequence[int] | None) -> None:
    at = f" (at result{where})" if where else ""
    first = parts[0]
    for i, (part, label) in enumerate(zip(parts, labels, strict=True)):
        if not isinstance(part, np.ndarray) or part.ndim == 0:
            raise ResultError(
                f"an elemwise region must return arrays with a leading axis to concatenate "
                f"(or tuples/dicts of them); {label} returned {describe(part)}{at}. "
                "Use @lampy.reduce or @lampy.sum for functions that reduce over rows."
            )
        if type(part) not in (np.ndarray, np.memmap):
            raise ResultError(
                f"{label} returned a {type(part).__module__}.{type(part).__qualname__}{at}; "
                "lampy joins plain ndarrays and would drop what the subclass adds (a mask, "
                "matrix rules): return np.asarray(...) or the parts (data and mask) as arrays"
            )
        if rows is not None and part.shape[0] != rows[i]:
            raise ResultError(
                f"{label} returned {part.shape[0]} rows for its {rows[i]} input rows{at}; an "
                "elemwise region must return one row per input row (its result would depend "
                "on how the rows were cut). Use @lampy.reduce or @lampy.sum for functions "
                "that combine rows."
            )
        if (part.shape[1:], part.dtype) != (first.shape[1:], first.dtype):
            raise ResultError(
                f"chunk results differ{at}: {labels[0]} returned rows of shape "
                f"{first.shape[1:]} {first.dtype}, {label} rows of shape {part.shape[1:]} "
                f"{part.dtype}; every chunk must return the same trailing shape and dtype"
            )


def _join(parts: list[Any], where: str) -> np.ndarray:
    joined = join_in_place(parts)  # rows the local pool wrote into one output: a view of it
    if joined is not None:
        return joined
    return np.concatenate(parts, axis=0, dtype=parts[0].dtype)  # keeps the byte order


@dataclass(frozen=True)
class Merged(Positional):
    """Partials already merged elsewhere (a tree reduced where the chunks ran): `value` is the
    subtree over `width` consecutive partials, as `tree_merge` would have built it there.

    Only subtrees of the tree `tree_merge` builds keep the answer bit-identical:
    `subtrees(first, total)` names the ones a merger that lacks the first partials may build.
    """

    value: Any
    width: int


def tree_merge(partials: Sequence[Any], combine: Callable[[Any, Any], Any]) -> Any:
    """Merge partials pairwise as a balanced tree, keeping their order (combine is associative).

    The tree pairs 0+1, 2+3, ... then those pairs, carrying an odd last one up, so its root
    over [lo, hi) joins [lo, lo + P) and [lo + P, hi), P the largest power of two below
    hi - lo. A `Merged` item stands for its subtree's partials (see `subtrees`).
    """
    if not any(isinstance(p, Merged) for p in partials):
        level = list(partials)
        while len(level) > 1:
            merged = [combine(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
            if len(level) % 2:
                merged.append(level[-1])
            level = merged
        return level[0]
    spans: dict[tuple[int, int], Any] = {}
    start = 0
    for item in partials:
        width = item.width if isinstance(item, Merged) else 1
        spans[(start, start + width)] = item.value if isinstance(item, Merged) else item
        start += width

    def node(lo: int, hi: int) -> Any:
        if (lo, hi) in spans:
            return spans[(lo, hi)]
        if hi - lo < 2:
            raise ResultError(f"merged partials do not cover position {lo} of the tree")
        half = 1 << ((hi - lo - 1).bit_length() - 1)
        return combine(node(lo, lo + half), node(lo + half, hi))

    return node(0, start)


def subtrees(first: int, total: int) -> list[tuple[int, int]]:
    """The largest subtrees [lo, hi) of `tree_merge`'s tree over `total` partials that hold
    none of the first `first`, in order: what a merger lacking those may build alone.

    >>> subtrees(0, 5), subtrees(1, 5), subtrees(1, 8)
    ([(0, 5)], [(1, 2), (2, 4), (4, 5)], [(1, 2), (2, 4), (4, 8)])
    """
    found: list[tuple[int, int]] = []

    def visit(lo: int, hi: int) -> None:
        if lo >= first:
            found.append((lo, hi))
        elif hi - lo > 1:
            half = 1 << ((hi - lo - 1).bit_length() - 1)
            visit(lo, lo + half)
            visit(lo + half, hi)

    if total > first:
        visit(0, total)
    return found


def add(a: Any, b: Any) -> Any:
    """Add two partials leaf by leaf (the combine rule of @lampy.sum)."""
    return zip_leaves([a, b], lambda pair, where: pair[0] + pair[1])
