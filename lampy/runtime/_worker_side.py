"""The worker side: how any worker runs one chunk, and keeps the jobs it has seen.

Every executor runs chunks through `run_task`: the inline executor and the auto probe in the
caller's process, the local pool in its worker processes, the OpenLambda handler in a sandbox,
Dask on its workers. It fills the argument template (reading a row source's rows, so an
unreadable reference is the chunk's error everywhere), calls the user's function, encodes the
value the way the transport sends it, and captures whatever went wrong as the chunk's outcome.
A worker keeps the unpickled templates of its last `TEMPLATES_KEPT` jobs in `Templates`.
It knows nothing of executors or transports.
"""

from __future__ import annotations

import threading
import traceback
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lampy._errors import RemoteError
from lampy.runtime._codec import Positional, dumps, loads
from lampy.runtime._job import SplitArray, aligned, fill, read

Call = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]
TEMPLATES_KEPT = 8  # jobs a worker keeps unpickled: a few calls interleave (lazy graphs, threads)


@dataclass
class Outcome(Positional):
    """What one chunk produced: a value, or the exception user code raised and its traceback."""

    value: Any = None
    error: BaseException | None = None
    traceback: str = ""

    def portable(self) -> Outcome:
        """This outcome with an error that survives a pickle round trip (else a RemoteError)."""
        if self.error is None:
            return self
        try:  # cloudpickle: exception classes that came by value with the function travel too
            loads(dumps(self.error))
            return self
        except Exception:
            text = f"{type(self.error).__qualname__}: {self.error}"
            return Outcome(error=RemoteError(text), traceback=self.traceback)


@dataclass(frozen=True)
class Loaded:
    """A job as a worker keeps it: its call (or why it could not be unpickled) and the
    transport's own per-job data (shared arrays, where the arrays are)."""

    call: Call | Outcome
    extras: Any = None


class Templates:
    """The jobs a worker has seen, most recent last; the oldest is forgotten past `kept`."""

    def __init__(self, kept: int = TEMPLATES_KEPT) -> None:
        self.kept = kept
        self._jobs: OrderedDict[str, Loaded] = OrderedDict()
        self._lock = threading.Lock()  # Dask runs tasks in threads

    def load(self, job_id: str, template: bytes, extras: Any = None) -> Loaded:
        """Unpickle a job's template (once) and keep it; a failure is kept as its outcome."""
        with self._lock:
            if job_id in self._jobs:
                self._jobs.move_to_end(job_id)
                return self._jobs[job_id]
        try:
            call: Call | Outcome = loads(template)
        except Exception as exc:
            call = Outcome(error=exc, traceback=traceback.format_exc())
        loaded = Loaded(call, extras)
        with self._lock:
            self._jobs[job_id] = loaded
            while len(self._jobs) > self.kept:
                self._jobs.popitem(last=False)
        return loaded

    def get(self, job_id: str) -> Loaded | None:
        """The job if this worker still keeps it."""
        with self._lock:
            if job_id in self._jobs:
                self._jobs.move_to_end(job_id)
            return self._jobs.get(job_id)


def run_task(
    call: Call | Outcome,
    split: Sequence[SplitArray],
    whole: Sequence[Any],
    encode: Callable[[Any], Any] | None = None,
) -> Outcome:
    """Run one chunk: `split` holds its rows of each split array, `whole` the shared arrays.

    With `encode` (a worker in another process), arrays are aligned first and the value is
    encoded here, so a value that cannot travel is the chunk's error, and errors are made
    portable. Exceptions that end a
    process (SystemExit and the like) are the chunk's outcome too: a worker never dies of them.
    """
    if isinstance(call, Outcome):
        return call.portable() if encode is not None else call
    function, args, kwargs = call
    decoded: Callable[[Any], Any] = aligned if encode is not None else _same
    try:
        rows = [decoded(read(a)) for a in split]
        filled = fill(args, kwargs, rows, [decoded(a) for a in whole])
        value = function(*filled[0], **filled[1])
        if encode is not None:
            value = encode(value)
    except BaseException as exc:
        outcome = Outcome(error=exc, traceback=traceback.format_exc())
        return outcome.portable() if encode is not None else outcome
    return Outcome(value=value)


def decoded(
    payload: bytes | memoryview, buffers: Sequence[Any], then: Callable[[Any], Any] | None = None
) -> Outcome:
    """The caller's side of an encoded value: unpickled, then `then(value)`. A value that
    cannot be read here (a class the worker has and this process has not, a stored result
    gone) is the chunk's error, like any other."""
    try:
        value = loads(payload, buffers)
        return Outcome(value=value if then is None else then(value))
    except Exception as exc:
        return Outcome(error=exc, traceback=traceback.format_exc())


def _same(value: Any) -> Any:
    return value
