"""A job: one decorated call, cut into chunks, as executors see it.

Array arguments are replaced by placeholders in the argument template: `Part(i)` stands for the
chunk's rows of split array i, `Whole(i)` for shared array i. Each executor decides how the
arrays travel (in-process views, shared memory, frames over HTTP); the template stays the same.
A split array may be a `RemoteArray` (lampy.remote): a reference whose rows each chunk reads itself.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from lampy.runtime._codec import dumps
from lampy.runtime.remote._reference import RemoteArray, materialize

Rows = tuple[int, int]


@dataclass(frozen=True)
class Part:
    """Placeholder for the chunk's rows of split array `index`."""

    index: int


@dataclass(frozen=True)
class Whole:
    """Placeholder for shared array `index`, which every chunk receives whole."""

    index: int


Placeholder = Part | Whole


def fill(
    args: tuple[Any, ...], kwargs: Mapping[str, Any], lookup: Callable[[Placeholder], Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Replace every top-level placeholder in an argument template by `lookup(placeholder)`."""

    def one(value: Any) -> Any:
        return lookup(value) if isinstance(value, Part | Whole) else value

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
    split: tuple[np.ndarray | RemoteArray, ...]
    whole: tuple[np.ndarray, ...]
    chunks: tuple[Rows, ...]
    #: Keep running the other chunks when one is lost to platform failures (partial answers);
    #: otherwise the executor may stop at the first failed chunk of any kind.
    keep_going: bool = False
    #: The call's number of this job's chunk 0 (the caller may have run earlier chunks itself).
    first: int = 0
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def label(self, chunk: int) -> str:
        """How messages name a chunk: its number within the call, and its rows.

        >>> Job(print, (), {}, (), (), ((0, 5), (5, 9)), first=1).label(1)
        'chunk 2 of 3 (rows 5:9)'
        """
        return chunk_label(self.first + chunk, self.first + len(self.chunks), self.chunks[chunk])

    def arguments(self, chunk: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The chunk's arguments as in-process views of the caller's arrays (no copies);
        references are read here, just the chunk's rows."""
        start, stop = self.chunks[chunk]

        def lookup(p: Placeholder) -> Any:
            if isinstance(p, Part):
                return materialize(self.split[p.index][start:stop])
            return self.whole[p.index]

        return fill(self.args, self.kwargs, lookup)

    @cached_property
    def template(self) -> bytes:
        """The pickled function and argument template, the same for every chunk."""
        return dumps((self.function, self.args, dict(self.kwargs)))
