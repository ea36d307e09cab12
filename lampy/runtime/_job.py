"""A job: one decorated call, cut into chunks, as executors see it.

Array arguments are replaced by placeholders in the argument template: `Part(i)` stands for the
chunk's rows of split array i, `Whole(i)` for shared array i. Each executor decides how the
arrays travel (in-process views, shared memory, frames over HTTP); the template stays the same.

A split array may also be a `RowSource`: rows that whoever runs the chunk reads itself (a
`lampy.remote` reference is one). The core knows only this protocol, never a transport.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol, runtime_checkable

import numpy as np

from lampy.runtime._codec import dumps
from lampy.runtime._plan import Rows


@runtime_checkable
class RowSource(Protocol):
    """Rows of an array kept elsewhere: sliced by rows without reading, read by `fetch()`."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype[Any]: ...

    @property
    def nbytes(self) -> int: ...

    def __getitem__(self, rows: slice) -> Any: ...

    def fetch(self) -> np.ndarray: ...


SplitArray = np.ndarray | RowSource


def is_row_source(value: object) -> bool:
    """Whether `value` is rows to read later rather than data here (ndarrays are data)."""
    return not isinstance(value, np.ndarray) and isinstance(value, RowSource)


def read(value: SplitArray) -> np.ndarray:
    """The array itself, or a row source's rows read."""
    return value if isinstance(value, np.ndarray) else value.fetch()


def aligned(array: Any) -> Any:
    """An ndarray numpy calls aligned (a copy if needed); other values as they are.

    Arrays decoded from a transport may sit at odd addresses in its buffers (Dask's do); numpy
    runs other loops on unaligned data, which round differently from the caller's numpy.
    """
    if isinstance(array, np.ndarray) and not array.flags.aligned:
        return array.copy()
    return array


@dataclass(frozen=True)
class Part:
    """Placeholder for the chunk's rows of split array `index`."""

    index: int


@dataclass(frozen=True)
class Whole:
    """Placeholder for shared array `index`, which every chunk receives whole."""

    index: int


def fill(
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    split: Sequence[Any],
    whole: Sequence[Any],
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The argument template with every top-level placeholder replaced by its value."""

    def one(value: Any) -> Any:
        if isinstance(value, Part):
            return split[value.index]
        return whole[value.index] if isinstance(value, Whole) else value

    return tuple(one(a) for a in args), {k: one(v) for k, v in kwargs.items()}


def chunk_label(number: int, total: int, rows: Rows) -> str:
    """How every message names a chunk: its number within the call, and its rows."""
    return f"chunk {number} of {total} (rows {rows[0]}:{rows[1]})"


@dataclass(frozen=True, eq=False)
class Job:
    """Everything an executor needs to run the chunks of one call."""

    function: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    split: tuple[SplitArray, ...]
    whole: tuple[np.ndarray, ...]
    chunks: tuple[Rows, ...]
    #: Keep running the other chunks when one is lost to platform failures (partial answers);
    #: otherwise the executor may stop at the first failed chunk of any kind.
    keep_going: bool = False
    #: The call's number of this job's chunk 0 (the caller may have run earlier chunks itself).
    first: int = 0
    #: The region's combine rule (None: elemwise), for executors that merge partials where the
    #: chunks run (lampy.runtime._combine.Merged); others ignore it.
    combine: Callable[[Any, Any], Any] | None = None
    #: The chunks' results are rows to join along axis 0 (an elemwise region splitting arrays):
    #: an executor may assemble them in place (the local pool writes them into one output).
    joins_rows: bool = False
    #: Seconds per row the caller expects a chunk to take where it runs (an auto plan's, from
    #: its probe), or None: an executor that judges stragglers by an earlier job's pace goes by
    #: this one until it has timed the function itself (a first job's dropped call).
    pace: float | None = None
    #: Rows per call of the function within an elemwise chunk (an auto plan's `block_rows`),
    #: or None: one call per chunk. The local pool honours it (each block's rows are written
    #: into the output while they are in cache); other executors call once per chunk.
    block_rows: int | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def label(self, chunk: int) -> str:
        """How messages name a chunk: its number within the call, and its rows.

        >>> Job(print, (), {}, (), (), ((0, 5), (5, 9)), first=1).label(1)
        'chunk 2 of 3 (rows 5:9)'
        """
        return chunk_label(self.first + chunk, self.first + len(self.chunks), self.chunks[chunk])

    def rows(self, chunk: int) -> tuple[SplitArray, ...]:
        """The chunk's rows of each split array: views, or narrower row sources (nothing read)."""
        start, stop = self.chunks[chunk]
        return tuple(a[start:stop] for a in self.split)

    @cached_property
    def template(self) -> bytes:
        """The pickled function and argument template, the same for every chunk: modules the
        workers can import travel by name (executors whose workers lack the caller's modules
        pickle their own: openlambda's `template_of`)."""
        return dumps((self.function, self.args, dict(self.kwargs)))
