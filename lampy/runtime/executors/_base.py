"""The executor interface: where the chunks of a job run.

An executor gets a `Job` and returns the chunks' outcomes by chunk index. A failed chunk is an
outcome, not a raise, so the caller decides how to report it:
- a user exception is the outcome's `error`, with the remote traceback;
- a chunk lost to the platform (a dead worker, a timeout, a refused call) is retried up to the
  executor's budget and then becomes an outcome whose `error` is a `RetriesExhausted` (an
  `ExecutionError`) naming the chunk with `job.label(chunk)` and every attempt's cause.
The executor may stop at the first failed chunk (the outcomes are then incomplete but include
it); with `job.keep_going` it runs every chunk that is not a user error, for partial answers.
Failures of the executor as a whole (unreachable, refused credentials) are raised.
Executors never look inside regions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

from lampy._errors import OptionError
from lampy.runtime._job import Job
from lampy.runtime._plan import Costs
from lampy.runtime._worker_side import Outcome


class Executor(ABC):
    """Runs the chunks of a job. One instance per (name, options), reused across calls."""

    name: ClassVar[str]
    #: Whether the function and arguments leave the process (so must pickle).
    needs_pickle: ClassVar[bool] = True
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
