"""Partial answers: a reduction over the chunks that succeeded, and a report of what is missing.

Off by default. `@lampy.sum(allow_partial=0.99)` is for users who prefer an answer now over a
perfect one later: chunks lost to the platform after every retry are left out of the merge, as
long as the chunks that succeeded cover at least that fraction of the rows. A user exception is
never skipped: it is a bug in the chunk, not a lost worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from lampy._errors import OptionError, RetriesExhausted
from lampy.runtime._plan import Rows


def check_fraction(allow_partial: float | None) -> None:
    """`allow_partial` is None (off) or the least fraction of rows an answer must cover."""
    if allow_partial is None:
        return
    if (
        isinstance(allow_partial, bool)
        or not isinstance(allow_partial, int | float)
        or not 0 < allow_partial <= 1
    ):
        raise OptionError(
            "allow_partial must be a fraction of the rows in (0, 1], e.g. allow_partial=0.99, "
            f"or None for exact answers only; got {allow_partial!r}"
        )


@dataclass(frozen=True)
class Coverage:
    """Which chunks a partial answer merged, and which were lost and why."""

    chunks: tuple[Rows, ...]  # every chunk of the call, by number
    lost: dict[int, RetriesExhausted] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(stop - start for start, stop in self.chunks)

    @property
    def rows_covered(self) -> int:
        lost = sum(self.chunks[c][1] - self.chunks[c][0] for c in self.lost)
        return self.rows - lost

    @property
    def fraction(self) -> float:
        """The fraction of rows whose chunks were merged (1.0 for an empty input)."""
        return self.rows_covered / self.rows if self.rows else 1.0

    @property
    def complete(self) -> bool:
        return not self.lost

    @property
    def merged(self) -> tuple[int, ...]:
        """The numbers of the chunks merged into the answer."""
        return tuple(c for c in range(len(self.chunks)) if c not in self.lost)

    def __str__(self) -> str:
        """
        >>> print(Coverage(((0, 3), (3, 4)), {1: RetriesExhausted("...")}))
        75.0% of rows (3 of 4), 1 of 2 chunks; lost: chunk 1 (rows 3:4)
        """
        text = (
            f"{self.fraction:.1%} of rows ({self.rows_covered} of {self.rows}), "
            f"{len(self.merged)} of {len(self.chunks)} chunks"
        )
        lost = ", ".join(
            f"chunk {c} (rows {self.chunks[c][0]}:{self.chunks[c][1]})" for c in sorted(self.lost)
        )
        return f"{text}; lost: {lost}" if lost else text


class Partial(NamedTuple):
    """What a call with `allow_partial` returns, complete or not: `value, coverage = f(x)`."""

    value: Any
    coverage: Coverage
