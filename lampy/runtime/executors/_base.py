"""The executor interface: where the chunks of a job run.

An executor gets a `Job` and returns the chunks' outcomes by chunk index. It starts chunks on
its workers, where `run_task` (the worker side) runs them, and reports how each attempt ended
to a `ChunkScheduler`, which owns the rules every executor shares: a user exception is the
chunk's outcome (never retried); a chunk lost to the platform runs again up to the attempt
budget, then its outcome is a `RetriesExhausted`; the job stops at the first failed chunk
unless `job.keep_going`. Failures of the executor as a whole (unreachable, refused
credentials) are raised. Executors never look inside regions.

What an executor can do beyond running jobs it declares here, rather than being probed:
`can_prewarm` (then `prewarm(n)` works), `result_sink` (where elemwise results are joined, if
not in memory), `is_warm()` (whether a call now pays no start-up).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from lampy._errors import OptionError, UsageError
from lampy.runtime._combine import Destination
from lampy.runtime._job import Job
from lampy.runtime._plan import Costs
from lampy.runtime._worker_side import Outcome


class Executor(ABC):
    """Runs the chunks of a job. One instance per (name, options), reused across calls."""

    name: ClassVar[str]
    #: Whether the function and arguments leave the process (so must pickle).
    needs_pickle: ClassVar[bool] = True
    #: Whether `prewarm(n)` can start workers ahead of a fan-out.
    can_prewarm: ClassVar[bool] = False
    #: Option names the constructor takes, with their types (used to parse env strings).
    option_types: ClassVar[Mapping[str, type]] = {}

    @classmethod
    def parse_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Check option names and convert strings (from the environment) to their types."""
        parsed: dict[str, Any] = {}
        for key, value in options.items():
            kind = cls.option_types.get(key)
            if kind is None:
                known = ", ".join(sorted(cls.option_types)) or "none"
                raise OptionError(
                    f"the {cls.name} executor has no option {key!r}; its options: {known}"
                )
            try:
                parsed[key] = _parse(kind, value) if isinstance(value, str) else value
            except ValueError:
                raise OptionError(
                    f"option {key!r} of the {cls.name} executor must be {kind.__name__}; "
                    f"got {value!r}"
                ) from None
        return parsed

    @abstractmethod
    def costs(self) -> Costs:
        """How the planner should model this executor right now (workers, overheads)."""

    @abstractmethod
    def run(self, job: Job) -> dict[int, Outcome]:
        """Run the chunks of `job`; outcomes by chunk index."""

    def start(self) -> None:  # noqa: B027 (executors without start-up cost have nothing to do)
        """Begin starting workers without waiting, so a later call finds them warm."""

    def import_ahead(self, modules: Iterable[str]) -> None:  # noqa: B027 (no workers to start)
        """Have the workers started from now on import these modules (the regions' own)
        before they are ready, so a first job waits for no import."""

    def is_warm(self) -> bool:
        """Whether a call now pays no start-up (so an auto plan made now holds for later)."""
        return True

    @property
    def result_sink(self) -> Destination | None:
        """Where elemwise results are joined when not into memory (an executor option)."""
        return None

    def prewarm(self, n: int) -> int:
        """Start `n` workers ahead of a fan-out; returns how many answered."""
        raise UsageError(f"the {self.name} executor cannot pre-warm workers")

    def close(self) -> None:  # noqa: B027 (most executors hold nothing to release)
        """Release workers and connections; the executor may be used again afterwards."""


_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True}
_BOOLEANS |= {"0": False, "false": False, "no": False, "off": False}


def _parse(kind: type, text: str) -> Any:
    """An option's value from its environment string ("false" is False, not bool("false"))."""
    if kind is bool:
        if text.strip().lower() not in _BOOLEANS:
            raise ValueError(text)
        return _BOOLEANS[text.strip().lower()]
    return kind(text)
