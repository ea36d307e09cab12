"""The worker entry: run one chunk and capture what happened.

Every executor runs chunks through `run_chunk`: the inline executor in the caller's process, the
local pool in its worker processes, the OpenLambda handler in a sandbox. It knows nothing of
executors or transports: it takes a function and its arguments and returns an `Outcome`.
"""

from __future__ import annotations

import pickle
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lampy.errors import RemoteError


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
