"""The worker entry: run one chunk and capture what happened.

Every executor runs chunks through `run_chunk`: the inline executor in the caller's process, the
local pool in its worker processes, the OpenLambda handler in a sandbox. It knows nothing of
executors or transports: it takes a function and its arguments (or an argument template and
how to look up its placeholders) and returns an `Outcome`.
"""

from __future__ import annotations

import pickle
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lampy._errors import RemoteArrayError, RemoteError
from lampy.runtime._job import Placeholder, fill


@dataclass
class Outcome:
    """What one chunk produced: a value, or the exception user code raised and its traceback."""

    value: Any = None
    error: BaseException | None = None
    traceback: str = ""

    def portable(self) -> Outcome:
        """This outcome with an error that survives a pickle round trip (else a RemoteError)."""
        if self.error is None:
            return self
        try:
            pickle.loads(pickle.dumps(self.error))
            return self
        except Exception:
            text = f"{type(self.error).__qualname__}: {self.error}"
            return Outcome(error=RemoteError(text), traceback=self.traceback)


def run_chunk(
    function: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> Outcome:
    """Call `function(*args, **kwargs)`; an exception becomes part of the outcome, never escapes."""
    try:
        return Outcome(value=function(*args, **kwargs))
    except Exception as exc:
        return Outcome(error=exc, traceback=traceback.format_exc())


def run_filled(
    function: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    lookup: Callable[[Placeholder], Any],
) -> Outcome:
    """Fill the argument template with `lookup`, then `run_chunk`. A reference's rows that
    cannot be read (lampy.remote) are this chunk's error as well, reported the same way."""
    try:
        arguments = fill(args, kwargs, lookup)
    except RemoteArrayError as exc:
        return Outcome(error=exc, traceback=traceback.format_exc())
    return run_chunk(function, *arguments)
