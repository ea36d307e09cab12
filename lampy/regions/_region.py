"""A parallel region: a numpy function, its hint, and the rules that make its answer.

What a decorator says about a function: how its results combine (concatenated rows for
elemwise, a tree of `combine` for reductions, then `finalize`), which arguments are shared,
and the options its calls default to. How a call runs is the runner's job (`_runner.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lampy._errors import OptionError
from lampy.regions._binding import parameter_names
from lampy.regions._partial import Coverage, Partial, check_fraction
from lampy.runtime import executors
from lampy.runtime._combine import Destination, concatenate, tree_merge
from lampy.runtime._job import chunk_label
from lampy.runtime._plan import Rows
from lampy.runtime._settings import Chunks, check_chunks


@dataclass(frozen=True)
class Region:
    """What a decorator says about a function. `combine` None means elemwise."""

    function: Callable[..., Any]
    combine: Callable[[Any, Any], Any] | None = None
    finalize: Callable[[Any], Any] | None = None
    shared: frozenset[str] = frozenset()
    chunks: Chunks | None = None
    executor: str | None = None
    allow_partial: float | None = None  # reductions only: see lampy.regions._partial

    def __post_init__(self) -> None:
        if not callable(self.function):
            raise OptionError(f"a region must decorate a callable; got {self.function!r}")
        for role in ("combine", "finalize"):
            value = getattr(self, role)
            if value is not None and not callable(value):
                raise OptionError(f"{role} must be callable, like combine(a, b); got {value!r}")
        if self.chunks is not None:
            check_chunks(self.chunks)
        check_fraction(self.allow_partial)
        if self.executor is not None:
            executors.check_name(self.executor)
        names = parameter_names(self.function)
        unknown = sorted(self.shared - names) if names is not None else []
        if unknown:
            raise OptionError(
                f"shared names {unknown} are not parameters of {self.function.__qualname__}; "
                f"its parameters: {sorted(names or ())}"
            )

    def merge(
        self,
        results: list[Any],
        chunks: Sequence[Rows],
        merged: Sequence[int],
        destination: Destination | None = None,
        split: bool = True,
    ) -> Any:
        """The results of chunks `merged` (numbers into the call's `chunks`) combined into
        what the undecorated call returns (an elemwise result joined into `destination` when
        the executor has a result sink). `split` False: the call split no array."""
        if self.combine is None:
            labels = [chunk_label(c, len(chunks), chunks[c]) for c in merged]
            rows = [chunks[c][1] - chunks[c][0] for c in merged] if split else None
            return concatenate(results, labels, rows, destination)
        return self.finish(tree_merge(results, self.combine))

    def answer(self, value: Any, coverage: Coverage) -> Any:
        """The call's return value: `Partial(value, coverage)` when partial answers are on."""
        return value if self.allow_partial is None else Partial(value, coverage)

    def finish(self, partial: Any) -> Any:
        return self.finalize(partial) if self.finalize is not None else partial
